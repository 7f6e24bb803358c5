"""Models: the offline tiny zoo (``tiny``) and loaders by Hub id, local folder or ``tiny://<kind>`` (``loader``)."""

from comat_core.models.loader import (
    cache_dir,
    load_captioner,
    load_clip,
    load_grounding_dino,
    load_sam,
    load_sd_pipeline,
    load_tokenizer,
    load_vqa,
    model_fingerprint,
    resolve_model,
)
from comat_core.models.tiny import TINY_KINDS, build_tiny

__all__ = [
    "TINY_KINDS",
    "build_tiny",
    "cache_dir",
    "load_captioner",
    "load_clip",
    "load_grounding_dino",
    "load_sam",
    "load_sd_pipeline",
    "load_tokenizer",
    "load_vqa",
    "model_fingerprint",
    "resolve_model",
]
