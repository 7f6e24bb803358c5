"""One training run's state: what it holds (``Training``, ``LoopState``) and its full-state checkpoints.

A checkpoint is everything a restart needs to continue bit for bit: the generator LoRA, the
discriminator's trainable tensors, optimisers, LR schedulers, grad scalers and RNG states, and the
loop's step, data position and metrics so far. ``store/full_state.py`` writes and reads the files
(plain tensors and dicts); this module maps a ``Training`` to them and back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from comat_core.config import ComatConfig
from comat_core.method.sampler import DifferentiableSampler
from comat_core.models.backbones import Backbone
from comat_core.models.lora import load_lora_state_dict, lora_state_dict
from comat_core.store.checkpoint import restore_rng_state, rng_state
from comat_core.store.full_state import load_full_state, relist_shards, save_full_state
from comat_core.store.storage import StageWriter

log = logging.getLogger("comat.train")
SAMPLES_SHARD_PREFIX = "samples-step-"  # validation images: one shard per step, listed again on resume


@dataclass
class Training:
    """Everything one training run holds: models, losses, optimisers, schedulers, scalers."""

    cfg: ComatConfig
    accelerator: Any
    backbone: Backbone
    sampler: DifferentiableSampler
    concept: Any | None
    attention: Any | None
    discriminator: Any | None
    g_params: list[torch.nn.Parameter]
    d_params: list[torch.nn.Parameter]
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer | None
    sched_g: Any
    sched_d: Any | None
    scaler_g: torch.amp.GradScaler
    scaler_d: torch.amp.GradScaler

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def unet(self) -> torch.nn.Module:
        return self.backbone.unet



def training_state(tr: Training) -> dict[str, Any]:
    """Optimisers, schedulers, scalers and RNG states (the LoRA weights are saved separately)."""
    state = {"optimizer_g": tr.opt_g.state_dict(), "lr_scheduler_g": tr.sched_g.state_dict(),
             "grad_scaler_g": tr.scaler_g.state_dict(), "rng": rng_state()}
    if tr.discriminator is not None:
        state.update(optimizer_d=tr.opt_d.state_dict(), lr_scheduler_d=tr.sched_d.state_dict(),
                     grad_scaler_d=tr.scaler_d.state_dict())
    return state


def load_training_state(tr: Training, state: dict[str, Any]) -> None:
    tr.opt_g.load_state_dict(state["optimizer_g"])
    tr.sched_g.load_state_dict(state["lr_scheduler_g"])
    if state["grad_scaler_g"]:
        tr.scaler_g.load_state_dict(state["grad_scaler_g"])
    if tr.discriminator is not None:
        tr.opt_d.load_state_dict(state["optimizer_d"])
        tr.sched_d.load_state_dict(state["lr_scheduler_d"])
        if state["grad_scaler_d"]:
            tr.scaler_d.load_state_dict(state["grad_scaler_d"])
    restore_rng_state(state["rng"])


@dataclass
class LoopState:
    step: int = 0  # optimisation steps done
    position: int = 0  # prompts consumed from the data order (all processes, all micro-batches)
    metrics: list[dict] = field(default_factory=list)
    resumed_from: int | None = None


def save_training_checkpoint(tr: Training, writer: StageWriter, loop: LoopState, global_batch: int) -> None:
    discriminator = tr.discriminator.checkpoint_state() if tr.discriminator is not None else None
    save_full_state(writer, loop.step, lora_state_dict(tr.unet), training_state(tr), discriminator,
                    data_seed=tr.cfg.train.seed, data_position=loop.position, global_batch=global_batch,
                    metrics=loop.metrics, keep_last=tr.cfg.train.keep_last)


def resume(tr: Training, writer: StageWriter, loop: LoopState, cleanup: bool = True) -> bool:
    """Load the latest complete checkpoint into ``tr`` and ``loop``; False when there is none."""
    found = load_full_state(writer, with_discriminator=tr.discriminator is not None, cleanup=cleanup)
    if found is None:
        return False
    load_lora_state_dict(tr.unet, found.generator_lora)
    if tr.discriminator is not None:
        tr.discriminator.load_checkpoint_state(found.discriminator)
    load_training_state(tr, found.state)
    loop.step, loop.position, loop.metrics = found.step, found.data_position, found.metrics
    loop.resumed_from = loop.step
    relist_shards(writer, SAMPLES_SHARD_PREFIX, loop.step)  # validation images from before the restart
    log.info("train: resumed from step %d (checkpoint %s)", loop.step, found.ref.folder)
    return True
