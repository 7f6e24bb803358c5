"""Which shards a sharded stage computes in this call: all of them, or one part of a fan-out.

The sharded stages (``sdxl_prefinetune`` and ``evaluate`` generation, ``gan_gt``, ``masks``) cut their
work into an ordered list of shards, each committed with its own shard manifest. To spread a stage
over several workers, the orchestrator runs it ``count`` times with ``ShardPart(index, count)``:
each call computes only the shards of its part, contiguous slices
``[index * S // count, (index + 1) * S // count)`` of the stage's ``S`` shards, and returns
without the stage's non-sharded rest (preview, fine-tune, scoring) and without a stage manifest.
A last, ordinary call then finds every shard done (``shard_done`` re-verifies each one's sha256, and
computes any that is missing), does the rest and commits the manifest.

Why ``index/count`` and not explicit ``[start, stop)`` ranges: only the stage knows ``S`` (it
depends on its inputs: prompts with entities, evaluation prompt files, ...), so the caller, which
runs on a CPU worker without those inputs loaded, need not compute it; the slices are still
contiguous, so an ``evaluate`` part mostly loads one of its two models.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

from comat_core.errors import ConfigError


@dataclass(frozen=True)
class ShardPart:
    """Part ``index`` (0-based) of ``count`` contiguous parts of a stage's shard list."""

    index: int
    count: int

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ConfigError(f"shard part {self.index} of {self.count} is not valid; "
                              "use [index, count] with 0 <= index < count")

    @classmethod
    def parse(cls, value) -> "ShardPart | None":
        """``None``, a ``ShardPart``, ``[index, count]`` (flow parameter) or ``"index/count"``."""
        if value is None or isinstance(value, ShardPart):
            return value
        if isinstance(value, str):
            value = value.split("/")
        try:
            index, count = (int(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(f"shard part {value!r} is not [index, count]; e.g. [0, 2] for the first of two") from None
        return cls(index, count)

    def select(self, total: int) -> range:
        """The positions of this part among ``total`` shards."""
        return range(self.index * total // self.count, (self.index + 1) * total // self.count)

    def __str__(self) -> str:
        return f"{self.index + 1}/{self.count}"


def shards_to_do(ctx, names: Sequence[str]) -> list[int]:
    """Positions in ``names`` (the stage's shard manifest names, in order) that this call computes:
    those of ``ctx.shard_part`` (all without one) whose shard is not done; done ones are verified and
    their files registered with the writer."""
    part = ctx.shard_part
    selected = part.select(len(names)) if part is not None else range(len(names))
    todo = [k for k in selected if not ctx.writer.shard_done(names[k])]
    scope = f"part {part}: " if part is not None else ""
    done = len(selected) - len(todo)
    logging.getLogger(f"comat.{ctx.stage}").info(
        "%s: %s%d of %d shards to compute%s", ctx.stage, scope, len(todo), len(selected),
        f", {done} complete from an earlier run (verified, kept)" if done else "")
    return todo


def shard_bar(total: int, initial: int, desc: str):
    """A silent tqdm counter over a stage's images (stages report ``bar.n``); the bar people see, with
    rate and ETA, is drawn from those reports by ``comat_core.progress.StageProgress``."""
    import os

    from tqdm.std import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc=desc, file=open(os.devnull, "w"))


def check_fail_hook(ctx, position: int, name: str = "") -> None:
    """Tests: ``hooks["fail_at_shard"] = k`` raises just before the shard at position ``k`` is computed."""
    fail_at = ctx.hooks.get("fail_at_shard")
    if fail_at is not None and position == int(fail_at):
        raise RuntimeError(f"test hook: fail_at_shard={position}" + (f" ({name})" if name else ""))


def part_summary(ctx, names: Sequence[str], generated: int) -> dict:
    """What a fan-out part returns: its part, its shards, and how many of them it computed."""
    part = ctx.shard_part
    return {"part": str(part), "shards_total": len(names), "shards": [names[k] for k in part.select(len(names))],
            "shards_generated": generated}
