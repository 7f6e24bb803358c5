"""PEFT LoRA on a diffusers UNet: injection, checkpoint state, and the diffusers-loadable export.

docs/method.md §1: LoRA of rank r and alpha (scale alpha / r) on ``to_q``, ``to_k``, ``to_v``,
``to_out.0`` of every attention module; the base weights stay frozen in the weight dtype (bf16 or
fp16 on GPU) and the LoRA weights are kept in fp32. The A matrices start Gaussian (std 1/r) and
the B matrices at zero, like the reference's LoRA layers, so the model starts unchanged.

Two serialisations:

* checkpoints: ``lora_state_dict`` / ``load_lora_state_dict`` (PEFT key names, exact round trip);
* export: ``export_lora`` writes ``pytorch_lora_weights.safetensors`` with the pipeline class's
  ``save_lora_weights`` (diffusers key names plus the adapter config as metadata, so alpha != rank
  survives), which ``pipe.load_lora_weights(folder)`` loads.
"""

from __future__ import annotations

from pathlib import Path

import torch

ADAPTER = "default"
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"


def add_lora(unet: torch.nn.Module, rank: int, alpha: float, target_modules: list[str]) -> list[torch.nn.Parameter]:
    """Inject a LoRA adapter into ``unet`` (in place) and return its trainable parameters, in fp32."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules))
    unet.add_adapter(config, adapter_name=ADAPTER)
    cast_training_params(unet, dtype=torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"LoRA target modules {target_modules} matched nothing in the UNet")
    return params


def lora_named_parameters(unet: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The LoRA parameters by module name (stable order: the UNet's module order)."""
    return {n: p for n, p in unet.named_parameters() if "lora_" in n}


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights in PEFT naming (for checkpoints)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER).items()}


def load_lora_state_dict(unet: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy checkpointed LoRA weights into the injected adapter; every key must match."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", []) or []
    missing = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k]
    if unexpected or missing:
        raise ValueError(f"LoRA checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def export_lora(unet: torch.nn.Module, pipeline_class: type, out_dir: str | Path) -> Path:
    """Write the LoRA in the format ``pipe.load_lora_weights(out_dir)`` reads; returns the weights file."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=ADAPTER))
    layers = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in layers.items()}
    # sets (target_modules) in sorted order: a set's order changes with each process's hash seed
    metadata = {k: sorted(v) if isinstance(v, (set, frozenset)) else v
                for k, v in unet.peft_config[ADAPTER].to_dict().items()}
    pipeline_class.save_lora_weights(out_dir, unet_lora_layers=layers, safe_serialization=True,
                                     unet_lora_adapter_metadata=metadata)
    sort_safetensors_metadata(out_dir / LORA_WEIGHTS_FILE)
    return out_dir / LORA_WEIGHTS_FILE


def sort_safetensors_metadata(path: str | Path) -> None:
    """Rewrite a safetensors header with its metadata keys sorted, in place; tensors untouched.

    safetensors writes the metadata map in hash order, which changes from process to process, so
    the same weights would get different bytes (and sha256) on every run; downstream stage keys
    hash those bytes. The header keeps its length (padded with spaces, as the format allows).
    """
    import json
    import struct

    path = Path(path)
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    if len(header.get("__metadata__") or {}) < 2:
        return
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    width = max(size, (len(text) + 7) // 8 * 8)
    path.write_bytes(struct.pack("<Q", width) + text.ljust(width, b" ") + data[8 + size:])
