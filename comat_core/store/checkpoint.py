"""Full training state as safetensors + JSON (no pickle), committed atomically into the artifact store.

* ``flatten_state`` / ``unflatten_state`` round-trip any nest of dicts (any JSON-able keys, e.g.
  the integer parameter ids of an optimizer state dict), lists, tuples, scalars and tensors into
  ``(tensors, json)``: every tensor goes to the safetensors file under its path, and the JSON keeps
  the structure with ``{"__tensor__": path}`` placeholders. Optimizer, LR-scheduler, grad-scaler
  and RNG states all go through it.
* ``rng_state`` / ``restore_rng_state``: Python, NumPy, torch CPU and CUDA generators.
* A checkpoint is the folder ``checkpoints/step-NNNNNN/`` committed as the shard
  ``checkpoint-step-NNNNNN`` (its own manifest, written after its files). A folder without its
  shard manifest is incomplete and ignored on resume; ``prune_checkpoints`` deletes the oldest
  complete ones beyond ``keep_last`` (manifest first, then the files) and removes their files from
  the writer's file list so the stage manifest stays truthful.
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from comat_core.store.paths import UnsafePathError, shown
from comat_core.store.storage import StageWriter

log = logging.getLogger("comat.checkpoint")

CHECKPOINT_DIR = "checkpoints"
SHARD_PREFIX = "checkpoint-step-"
_SHARD_RE = re.compile(r"^checkpoint-step-(\d{6,})$")

TENSOR, DICT, TUPLE = "__tensor__", "__dict__", "__tuple__"


# ----------------------------------------------------------------------------------------------
# Nested state <-> (tensors, JSON)


def flatten_state(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state into a flat ``{path: tensor}`` and a JSON-able skeleton."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().cpu().contiguous()
            return {TENSOR: path}
        if isinstance(value, np.ndarray):
            tensors[path] = torch.from_numpy(np.ascontiguousarray(value).astype(np.int64 if value.dtype.kind in "ui" else value.dtype))
            return {TENSOR: path, "numpy": str(value.dtype)}
        if isinstance(value, dict):
            return {DICT: [[k, encode(v, f"{path}.{k}" if path else str(k))] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {TUPLE: [encode(v, f"{path}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [encode(v, f"{path}.{i}") for i, v in enumerate(value)]
        if isinstance(value, (np.integer, np.floating)):
            return value.item()
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot serialise {type(value).__name__} at {path or 'the root'} without pickle")

    return tensors, encode(obj, prefix)


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of ``flatten_state``."""
    if isinstance(skeleton, dict):
        if TENSOR in skeleton:
            tensor = tensors[skeleton[TENSOR]]
            if "numpy" in skeleton:
                return tensor.numpy().astype(skeleton["numpy"])
            return tensor
        if DICT in skeleton:
            return {k: unflatten_state(v, tensors) for k, v in skeleton[DICT]}
        if TUPLE in skeleton:
            return tuple(unflatten_state(v, tensors) for v in skeleton[TUPLE])
        raise ValueError(f"unknown state node {sorted(skeleton)}")
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


# ----------------------------------------------------------------------------------------------
# RNG


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in state["cuda"]])


# ----------------------------------------------------------------------------------------------
# Checkpoints in the store


@dataclass(frozen=True)
class CheckpointRef:
    step: int
    shard: str
    folder: str


def checkpoint_ref(step: int) -> CheckpointRef:
    return CheckpointRef(step, f"{SHARD_PREFIX}{step:06d}", f"{CHECKPOINT_DIR}/step-{step:06d}")


def committed_checkpoints(writer: StageWriter) -> list[CheckpointRef]:
    """Checkpoints whose shard manifest exists, oldest first."""
    steps = sorted(int(m.group(1)) for m in map(_SHARD_RE.match, writer.committed_shards()) if m)
    return [checkpoint_ref(s) for s in steps]


def save_checkpoint(writer: StageWriter, step: int, tensor_files: dict[str, dict[str, torch.Tensor]],
                    json_files: dict[str, Any]) -> CheckpointRef:
    """Write the files of one checkpoint, then commit its shard manifest (the checkpoint now counts)."""
    ref = checkpoint_ref(step)
    written = []
    for name, tensors in tensor_files.items():
        rel = f"{ref.folder}/{name}"
        writer.put_tensors(rel, tensors)
        written.append(rel)
    for name, obj in json_files.items():
        rel = f"{ref.folder}/{name}"
        writer.put_bytes(rel, json.dumps(obj, sort_keys=True).encode())
        written.append(rel)
    writer.commit_shard(ref.shard, written, meta={"step": step})
    return ref


def load_latest_checkpoint(writer: StageWriter, cleanup: bool = True) -> tuple[CheckpointRef, dict[str, bytes]] | None:
    """The newest checkpoint whose files match its manifest, as ``(ref, {file name: bytes})``.

    Every complete checkpoint's files are registered with the writer (``shard_done``), so the
    stage manifest lists the checkpoints kept from before a restart; corrupted ones are skipped, with
    a warning naming the step and the file that does not match.
    With ``cleanup`` (the main process), checkpoint folders without a shard manifest (a crash
    while saving) are deleted.
    """
    refs = committed_checkpoints(writer)
    if cleanup:
        _remove_incomplete(writer, {r.folder for r in refs})
    valid = []
    for ref in refs:
        problem = writer.shard_problem(ref.shard, verify=True)
        if problem is None:
            valid.append(ref)
        else:
            log.warning("checkpoint step %d skipped on resume: %s (%s)", ref.step, problem, writer.path(ref.folder))
    if not valid:
        return None
    ref = valid[-1]
    names = [_in_folder(rel, ref, writer) for rel in writer.shard_meta(ref.shard)["files"]]
    store = writer.store
    files = {rel.rsplit("/", 1)[-1]: store.read_bytes(writer.path(rel)) for rel in names}
    return ref, files


def _in_folder(rel: str, ref: CheckpointRef, writer: StageWriter) -> str:
    """A file a checkpoint's shard manifest lists must lie in that checkpoint's folder (no ``/`` in its name
    below it, since files are keyed by name on resume); anything else is refused, not read."""
    if not rel.startswith(ref.folder + "/") or "/" in rel[len(ref.folder) + 1:]:
        raise UnsafePathError(f"checkpoint shard {writer.shard_manifest_path(ref.shard)}: refused the path {shown(rel)} "
                              f"(not a file of {ref.folder}/); remove that checkpoint or recompute with "
                              "comat run --force train")
    return rel


def prune_checkpoints(writer: StageWriter, keep_last: int) -> list[int]:
    """Delete all but the newest ``keep_last`` complete checkpoints; returns the deleted steps."""
    refs = committed_checkpoints(writer)
    deleted = []
    for ref in refs[: max(0, len(refs) - keep_last)]:
        files = list(writer.shard_meta(ref.shard)["files"])
        writer.store.remove_file(writer.shard_manifest_path(ref.shard))  # incomplete from here on
        writer.store.remove_tree(writer.path(ref.folder))
        for rel in files:
            writer.files.pop(rel, None)
        deleted.append(ref.step)
    return deleted


def _remove_incomplete(writer: StageWriter, complete_folders: set[str]) -> None:
    root = writer.path(CHECKPOINT_DIR)
    for name in writer.store.listdir(root):
        folder = f"{CHECKPOINT_DIR}/{name}"
        if folder not in complete_folders:
            writer.store.remove_tree(writer.path(folder))
            for rel in [f for f in writer.files if f.startswith(folder + "/")]:
                writer.files.pop(rel)
