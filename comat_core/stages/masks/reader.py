"""Entity masks of a completed ``masks`` stage, for the trainer, at the resolution it asks for.

``MaskReader(stage_reader).entity_masks(prompt_ids, resolution, samples)`` returns, per (prompt,
sample) (sample 0 when not given), one
``EntityMask`` per entity the stage kept (background and repeated nouns were dropped there, so
they are absent here): ``detected`` and, when detected, the mask as a ``[res, res]`` float tensor
of 0/1. An undetected entity has ``mask=None`` (**Decision**: it is dropped from the loss, not
supervised with an all-zero mask as the reference does). A prompt with no kept entity gets an empty list.

Resizing (``resize_mask_area_majority``, named after its rule; the attribute loss's own resize is
``method.losses.resize_mask_bilinear_any``): masks are stored at the image resolution (512 for the
real presets) and the trainer asks for its attention resolutions (8/16/32/64). Shrinking uses **area** averaging and
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


def resize_mask_area_majority(mask: torch.Tensor, resolution: int) -> torch.Tensor:
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
        self._cache: OrderedDict[int, dict[tuple[str, int], list[dict]]] = OrderedDict()
        self._shard_of: dict[tuple[str, int], int] = {}
        for rel in self.reader.list(prefix="index-", suffix=".parquet"):
            shard = int(rel[len("index-") : -len(".parquet")])
            table = self.reader.read_table(rel)
            for pid, k in zip(table.column("prompt_id").to_pylist(), table.column("sample").to_pylist()):
                self._shard_of[(pid, k)] = shard

    def prompt_ids(self) -> list[str]:
        """Prompts that have at least one kept entity (detected or not)."""
        return list(dict.fromkeys(pid for pid, _ in self._shard_of))

    def rows(self, prompt_ids: list[str], samples: list[int] | None = None) -> list[list[dict]]:
        """The stored rows of each (prompt, sample) (mask still encoded), in entity order."""
        keys = list(zip(prompt_ids, samples if samples is not None else [0] * len(prompt_ids)))
        return [self._shard(self._shard_of[k]).get(k, []) if k in self._shard_of else [] for k in keys]

    def entity_masks(self, prompt_ids: list[str], resolution: int,
                     samples: list[int] | None = None) -> list[list[EntityMask]]:
        if resolution < 1:
            raise InputError(f"mask resolution must be positive, got {resolution}")
        return [[self._entity(row, resolution) for row in rows] for rows in self.rows(prompt_ids, samples)]

    def _entity(self, row: dict, resolution: int) -> EntityMask:
        mask = None
        if row["detected"]:
            size = int(row["mask_resolution"])
            stored = torch.from_numpy(decode_mask(row["mask"], (size, size), row["encoding"]))
            mask = resize_mask_area_majority(stored, resolution)
        return EntityMask(int(row["entity_index"]), row["noun"], bool(row["detected"]), mask)

    def _shard(self, shard: int) -> dict[tuple[str, int], list[dict]]:
        if shard in self._cache:
            self._cache.move_to_end(shard)
            return self._cache[shard]
        by_prompt: dict[tuple[str, int], list[dict]] = {}
        for row in self.reader.read_table(f"masks-{shard:05d}.parquet").to_pylist():
            by_prompt.setdefault((row["prompt_id"], row["sample"]), []).append(row)
        for rows in by_prompt.values():
            rows.sort(key=lambda r: r["entity_index"])
        self._cache[shard] = by_prompt
        if self.max_cached_shards is not None:
            while len(self._cache) > self.max_cached_shards:
                self._cache.popitem(last=False)
        return by_prompt
