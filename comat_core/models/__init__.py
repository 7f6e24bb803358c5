"""Models: the offline tiny zoo (``tiny``) and loaders by Hub id, local folder or ``tiny://<kind>`` (``loader``).

The names below are resolved on first use (PEP 562), so importing a submodule to name or fingerprint
a model does not import torch, diffusers and transformers.
"""

import importlib

_EXPORTS = {
    "cache_dir": "loader", "load_captioner": "loader", "load_clip": "loader", "load_grounding_dino": "loader",
    "load_sam": "loader", "load_sd_pipeline": "loader", "load_tokenizer": "loader", "load_vqa": "loader",
    "model_fingerprint": "loader", "resolve_model": "loader", "TINY_KINDS": "tiny", "build_tiny": "tiny",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
