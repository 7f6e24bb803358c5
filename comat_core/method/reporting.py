"""What a training run reports: trackers, the step's log line, memory peaks, validation images in trackers.

The trainer logs every step as a row of ``metrics.parquet``; the trackers (TensorBoard, W&B, through
accelerate) and the console get every ``train.log_every``-th step, as :func:`step_line` writes it.
"""

from __future__ import annotations

import json
import logging
import math
import resource
from typing import Any

import numpy as np
import torch

from comat_core.config import ComatConfig
from comat_core.errors import ConfigError

log = logging.getLogger("comat.train")
STEP_TIMING = "elapsed {elapsed}, ETA {remaining}, {rate_fmt}"


def trackers(cfg: ComatConfig) -> list[str]:
    """TensorBoard when configured and installed (else a warning); W&B when configured (must be installed)."""
    import importlib.util

    out = []
    for name in cfg.train.trackers:
        if name == "tensorboard":
            if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
                out.append(name)
            else:
                log.warning("train.trackers has tensorboard but it is not installed (pip install tensorboard); skipped")
        elif name == "wandb":
            if not importlib.util.find_spec("wandb"):
                raise ConfigError("train.trackers has wandb but it is not installed: pip install wandb, or remove it")
            out.append(name)
    return out


def flat_config(cfg: ComatConfig) -> dict:
    """Tracker hyper-parameters: the train section flattened to scalars."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, (int, float, str, bool)):
            flat[prefix] = value
        else:
            flat[prefix] = json.dumps(value)

    walk("train", cfg.train.model_dump(mode="json"))
    flat["models.pretrained"] = cfg.models.pretrained
    return flat


def step_line(logs: dict) -> str:
    """One readable line of a step's logs: total and per-term losses, grad norms, D logits, seconds."""
    def num(key: str, fmt: str = ".4g") -> str:
        v = logs.get(key)
        return format(v, fmt) if isinstance(v, (int, float)) and not math.isnan(v) else "-"

    terms = [k for k in logs if k.endswith("_loss") and k not in ("loss", "d_loss")]
    parts = [f"loss {num('loss')}" + (f" ({', '.join(f'{k[:-5]} {num(k)}' for k in terms)})" if terms else "")]
    parts.append(f"grad {num('grad_norm_g', '.3g')}")
    if "d_loss" in logs:
        parts.append(f"D loss {num('d_loss')} real {num('d_real_logit', '.3g')} fake {num('d_fake_logit', '.3g')}")
    parts.append(f"{num('step_seconds', '.2f')} s")
    return " | ".join(parts)


def numeric(row: dict) -> dict[str, float]:
    """The row's numbers that a tracker can plot (NaN: a loss term that was not computed)."""
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))}


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since the last reset: the device's allocations on a GPU, the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def log_validation_image(accelerator, image, step: int) -> None:
    """The validation grid into the active trackers that show images (TensorBoard's Images tab, W&B),
    at the step it was drawn; nothing when no tracker is active (the tracking extra is optional)."""
    for tracker in getattr(accelerator, "trackers", None) or []:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(image.convert("RGB")), step, dataformats="HWC")
            tracker.writer.flush()
        elif tracker.name == "wandb":
            tracker.log_images({"validation": [image]}, step=step)
