"""The evaluate stage's generation plan: which (model, category, prompt, seed) images to draw, in shards.

The drawing itself (per-sample seeded generators, DDPM scheduler) is ``comat_core.models.generation``,
shared with gan_gt and the SDXL pre-finetune.
"""

from __future__ import annotations

from typing import Sequence

from comat_core.config import ComatConfig
from comat_core.models.generation import draw
from comat_core.stages.evaluate.registry import EvalSample


def generate_images(pipe, samples: Sequence[EvalSample], cfg: ComatConfig) -> list:
    """The evaluation images of ``samples`` (PIL), in batches of ``evaluate.batch_size``."""
    ev = cfg.evaluate
    images = []
    for i in range(0, len(samples), ev.batch_size):
        batch = samples[i : i + ev.batch_size]
        images += draw(pipe, [s.prompt for s in batch], [s.seed for s in batch], resolution=ev.resolution,
                       num_inference_steps=ev.num_inference_steps, guidance_scale=ev.guidance_scale)
    return images


def plan_samples(model: str, prompts: dict[str, list[str]], images_per_prompt: int, seed: int) -> list[EvalSample]:
    """Every image one model draws: categories in order, prompts in file order, seeds ``seed + k``."""
    return [EvalSample(model, category, p, text, seed + k)
            for category, texts in prompts.items()
            for p, text in enumerate(texts)
            for k in range(images_per_prompt)]


def shard_plan(samples: Sequence[EvalSample], shard_size: int) -> list[tuple[str, list[EvalSample]]]:
    """``(name, samples)`` shards of at most ``shard_size``; names ``<model>-NNNNN`` are stable across runs."""
    model = samples[0].model if samples else "none"
    return [(f"{model}-{i // shard_size:05d}", list(samples[i : i + shard_size]))
            for i in range(0, len(samples), shard_size)]
