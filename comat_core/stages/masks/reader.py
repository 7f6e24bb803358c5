"""Entity masks of a completed ``masks`` stage, for the trainer, at the resolution it asks for.

``MaskReader(stage_reader).entity_masks(prompt_ids, resolution)`` returns, per prompt, one
``EntityMask`` per entity the stage kept (background and repeated nouns were dropped there, so
they are absent here): ``detected`` and, when detected, the mask as a ``[res, res]`` float tensor
of 0/1. An undetected entity has ``mask=None`` (METHOD.md §4 **Decision**: it is dropped from the
loss, not supervised with an all-zero mask). A prompt with no kept entity gets an empty list.

Resizing (``resize_mask``): masks are stored at the image resolution (512 for the real presets) and
the trainer asks for its attention resolutions (8/16/32/64). Shrinking uses **area** averaging and
keeps a cell when at least half of it is covered (a majority vote: nearest-neighbour would keep one
arbitrary pixel per cell and alias thin or small objects in and out). An object smaller than half
a cell everywhere would vanish and become the all-zero mask the trainer must never see, so then
every cell it touches is kept instead. Enlarging uses **nearest**, which is exact for the integer
factors involved and keeps the mask binary.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from comat_core.errors import InputError
from comat_core.stages.masks.encoding import decode_mask


@dataclass
class EntityMask:
    entity_index: int  # index into the prompt's ``entities`` (prompts.parquet)
    noun: str
    detected: bool
    mask: torch.Tensor | None  # [res, res] float {0, 1}; None when not detected


def resize_mask(mask: torch.Tensor, resolution: int) -> torch.Tensor:
    """A ``[H, W]`` binary mask → ``[resolution, resolution]`` float {0, 1} (see the module docstring)."""
    m = mask.float()[None, None]
    size = (resolution, resolution)
    if tuple(mask.shape) == size:
        return m[0, 0]
    if resolution > min(mask.shape):
        return F.interpolate(m, size=size, mode="nearest")[0, 0]
    coverage = F.interpolate(m, size=size, mode="area")[0, 0]
    out = (coverage >= 0.5).float()
    if not out.any() and mask.any():
        out = (coverage > 0).float()
    return out


class MaskReader:
    """Reads only the shards holding the requested prompts; keeps the last ``max_cached_shards`` decoded tables."""

    def __init__(self, stage_reader, max_cached_shards: int | None = 16):
        self.reader = stage_reader
        self.max_cached_shards = max_cached_shards
        self._cache: OrderedDict[int, dict[str, list[dict]]] = OrderedDict()
        self._shard_of: dict[str, int] = {}
        for rel in self.reader.list(prefix="index-", suffix=".parquet"):
            shard = int(rel[len("index-") : -len(".parquet")])
            for pid in self.reader.read_table(rel).column("prompt_id").to_pylist():
                self._shard_of[pid] = shard

    def prompt_ids(self) -> list[str]:
        """Prompts that have at least one kept entity (detected or not)."""
        return list(self._shard_of)

    def rows(self, prompt_ids: list[str]) -> list[list[dict]]:
        """The stored rows of each prompt (mask still encoded), in entity order."""
        return [self._shard(self._shard_of[p]).get(p, []) if p in self._shard_of else [] for p in prompt_ids]

    def entity_masks(self, prompt_ids: list[str], resolution: int) -> list[list[EntityMask]]:
        if resolution < 1:
            raise InputError(f"mask resolution must be positive, got {resolution}")
        return [[self._entity(row, resolution) for row in rows] for rows in self.rows(prompt_ids)]

    def _entity(self, row: dict, resolution: int) -> EntityMask:
        mask = None
        if row["detected"]:
            size = int(row["mask_resolution"])
            stored = torch.from_numpy(decode_mask(row["mask"], (size, size), row["encoding"]))
            mask = resize_mask(stored, resolution)
        return EntityMask(int(row["entity_index"]), row["noun"], bool(row["detected"]), mask)

    def _shard(self, shard: int) -> dict[str, list[dict]]:
        if shard in self._cache:
            self._cache.move_to_end(shard)
            return self._cache[shard]
        by_prompt: dict[str, list[dict]] = {}
        for row in self.reader.read_table(f"masks-{shard:05d}.parquet").to_pylist():
            by_prompt.setdefault(row["prompt_id"], []).append(row)
        for rows in by_prompt.values():
            rows.sort(key=lambda r: r["entity_index"])
        self._cache[shard] = by_prompt
        if self.max_cached_shards is not None:
            while len(self._cache) > self.max_cached_shards:
                self._cache.popitem(last=False)
        return by_prompt
