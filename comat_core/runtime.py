"""Where and in what precision the models run: ``runtime.device`` and ``runtime.mixed_precision``.

One place for every stage (data, trainer, evaluate, pre-finetune): the device (``auto`` picks the
GPU when there is one), the accelerate ``mixed_precision`` mode and the frozen models' weight
dtype (fp32 on CPU whatever is configured; ``auto`` is bf16 on GPUs that support it, else fp16),
and ``free_memory`` to hand dropped models' memory back between phases.
"""

from __future__ import annotations

import gc
from typing import Literal

import torch

from comat_core.config import ComatConfig
from comat_core.errors import ConfigError

Precision = Literal["no", "fp16", "bf16"]
DTYPES: dict[str, torch.dtype] = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(cfg: ComatConfig) -> torch.device:
    """``runtime.device``: auto picks the GPU when there is one; cuda without a visible GPU is an error."""
    device = cfg.runtime.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device is cuda but no CUDA GPU is visible; set runtime.device=cpu or auto")
    return torch.device(device)


def mixed_precision(cfg: ComatConfig, device: torch.device) -> Precision:
    """The accelerate ``mixed_precision`` mode on ``device``: "no" off the GPU; auto → bf16 where supported, else fp16."""
    mode = cfg.runtime.mixed_precision
    if device.type != "cuda":
        return "no"
    if mode == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return mode


def weight_dtype(cfg: ComatConfig, device: torch.device) -> torch.dtype:
    """The frozen models' dtype on ``device``: fp32 on CPU; on GPU the dtype of ``mixed_precision``."""
    return DTYPES[mixed_precision(cfg, device)]


def free_memory() -> None:
    """Return the memory of models the caller has just dropped (call after ``del model``)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
