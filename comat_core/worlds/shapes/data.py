"""Rendered datasets: images and captions as pure functions of a seed.

``base_dataset`` follows the base model's pair frequencies (``splits.base_pair_weights``: uniform by
default) and, with ``swap_p`` > 0, writes **loose captions** for scenes of two or more objects: with
probability ``swap_p`` the caption attaches the colours to the wrong objects (two objects: the two
colours swapped; three: the colours rotated by one or two places), the way web alt-text is loose about
which attribute belongs to which object. Single-object captions are always exact. ``captioner_dataset``
is uniform over all pairs and always exact. Both draw 1-3 objects per scene, some captions with size
words or (for two objects) a relation instead of "and".
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from comat_core.worlds.shapes.render import Scene, SizeRanges, caption, render, sample_scene
from comat_core.worlds.shapes.splits import all_pairs, base_pair_weights

OBJECT_COUNTS = (1, 2, 3)
OBJECT_COUNT_WEIGHTS = (0.4, 0.45, 0.15)  # the captioner's and the VAE's scenes
P_SIZE_WORDS = 0.15  # fraction of captions that say "small"/"large"
P_RELATION = 0.15  # fraction of two-object captions with a relation instead of "and"


@dataclass
class Dataset:
    images: np.ndarray  # uint8 [N, H, W, 3]
    captions: list[str]  # what the model trains on (loose when ``swap_p`` > 0)
    exact: list[str] | None = None  # the exact captions, when they differ from ``captions`` anywhere


def loose_scene(scene: Scene, rng: np.random.Generator) -> Scene:
    """The scene's caption with its colours attached to the wrong objects (the image is unchanged).

    Two objects: the colours swap. Three: the colours rotate by one or two places (every object gets
    another object's colour). Sizes and positions stay with their objects, so relations stay true.
    """
    objects = scene.objects
    shift = 1 if len(objects) == 2 else int(rng.integers(1, len(objects)))
    colours = [o.colour for o in objects]
    colours = colours[shift:] + colours[:shift]
    return replace(scene, objects=tuple(replace(o, colour=c) for o, c in zip(objects, colours)))


def render_dataset(n: int, seed: int, weights: dict[tuple[str, str], float],
                   count_weights: tuple[float, ...] = OBJECT_COUNT_WEIGHTS, *, swap_p: float = 0.0,
                   size_ranges: SizeRanges | None = None) -> Dataset:
    """``n`` scenes of 1-3 objects (by ``count_weights``) whose (colour, shape) pairs are drawn independently
    by ``weights``; captions of multi-object scenes loose with probability ``swap_p`` (its own generator,
    so ``swap_p`` = 0 draws exactly what it always drew)."""
    rng = np.random.default_rng(seed)
    loose_rng = np.random.default_rng([seed, 1])
    pairs = list(weights)
    probs = np.array([weights[p] for p in pairs], dtype=np.float64)
    probs /= probs.sum()
    images, captions, exact = [], [], []
    for _ in range(n):
        k = int(rng.choice(OBJECT_COUNTS, p=np.asarray(count_weights) / sum(count_weights)))
        chosen = [pairs[i] for i in rng.choice(len(pairs), size=k, p=probs)]
        scene = sample_scene(rng, chosen, relation=bool(rng.random() < P_RELATION),
                             with_size=bool(rng.random() < P_SIZE_WORDS), size_ranges=size_ranges)
        images.append(render(scene)[0])
        exact.append(caption(scene))
        loose = swap_p > 0 and k > 1 and loose_rng.random() < swap_p
        captions.append(caption(loose_scene(scene, loose_rng)) if loose else exact[-1])
    return Dataset(np.stack(images), captions, exact if exact != captions else None)


def base_dataset(n: int, seed: int, count_weights: tuple[float, ...] = OBJECT_COUNT_WEIGHTS, *,
                 design: str = "latin", swap_p: float = 0.0, size_ranges: SizeRanges | None = None) -> Dataset:
    """The base text-to-image model's data: pairs by ``design`` (``splits.base_pair_weights``), loose
    multi-object captions with probability ``swap_p``."""
    return render_dataset(n, seed, base_pair_weights(design), count_weights, swap_p=swap_p, size_ranges=size_ranges)


def captioner_dataset(n: int, seed: int, size_ranges: SizeRanges | None = None) -> Dataset:
    """The captioner's (and the VAE's) data: every pair equally likely, exact captions."""
    return render_dataset(n, seed, {p: 1.0 for p in all_pairs()}, size_ranges=size_ranges)
