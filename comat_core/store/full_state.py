"""A training run's full state as one checkpoint: what a restart needs to continue bit for bit.

One checkpoint (``store/checkpoint.py``: ``checkpoints/step-NNNNNN/``, committed as a shard) holds

* ``generator_lora.safetensors``: the trained LoRA's tensors,
* ``discriminator.safetensors``: the discriminator's trainable tensors (when there is one),
* ``state.safetensors`` + the ``state`` skeleton in ``state.json``: optimisers, LR schedulers, grad
  scalers and RNG states as one nested dict (``flatten_state``),
* ``state.json``: the step, the data order's seed and position, the global batch and every step's
  metrics so far.

The trainer passes and gets plain tensors and dicts; this module knows files, not models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from comat_core.store.checkpoint import (
    CheckpointRef,
    flatten_state,
    load_latest_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    unflatten_state,
)
from comat_core.store.storage import StageWriter

GENERATOR, DISCRIMINATOR, STATE, META = ("generator_lora.safetensors", "discriminator.safetensors",
                                         "state.safetensors", "state.json")


@dataclass
class FullState:
    """The newest complete checkpoint, read back."""

    ref: CheckpointRef
    step: int
    data_position: int
    metrics: list[dict]
    generator_lora: dict[str, torch.Tensor]
    discriminator: dict[str, torch.Tensor] | None
    state: dict[str, Any]  # optimisers, schedulers, scalers, RNG: as given to ``save_full_state``


def save_full_state(writer: StageWriter, step: int, generator_lora: dict[str, torch.Tensor], state: dict[str, Any],
                    discriminator: dict[str, torch.Tensor] | None, *, data_seed: int, data_position: int,
                    global_batch: int, metrics: list[dict], keep_last: int) -> CheckpointRef:
    """Commit step ``step``'s checkpoint, then delete all but the newest ``keep_last`` complete ones."""
    tensors, skeleton = flatten_state(state)
    files = {GENERATOR: generator_lora, STATE: tensors}
    if discriminator is not None:
        files[DISCRIMINATOR] = discriminator
    meta = {"step": step, "data_seed": data_seed, "data_position": data_position, "global_batch": global_batch,
            "state": skeleton, "metrics": metrics}
    ref = save_checkpoint(writer, step, files, {META: meta})
    prune_checkpoints(writer, keep_last)
    return ref


def load_full_state(writer: StageWriter, with_discriminator: bool, cleanup: bool = True) -> FullState | None:
    """The newest complete checkpoint (see ``load_latest_checkpoint``), or None when there is none."""
    from safetensors.torch import load

    found = load_latest_checkpoint(writer, cleanup=cleanup)
    if found is None:
        return None
    ref, files = found
    meta = json.loads(files[META])
    return FullState(ref, meta["step"], meta["data_position"], meta["metrics"], load(files[GENERATOR]),
                     load(files[DISCRIMINATOR]) if with_discriminator else None,
                     unflatten_state(meta["state"], load(files[STATE])))


def relist_shards(writer: StageWriter, prefix: str, upto: int) -> None:
    """Shards ``PREFIX`` + step (e.g. validation images) committed up to step ``upto`` before a restart are
    listed in the stage manifest again."""
    for name in writer.committed_shards():
        if name.startswith(prefix) and int(name[len(prefix):]) <= upto:
            writer.shard_done(name, verify=True)
