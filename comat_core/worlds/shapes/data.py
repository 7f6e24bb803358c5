"""Rendered datasets: images and captions as pure functions of a seed.

``base_dataset`` follows the base model's skewed pair frequencies (``splits.base_pair_weights``);
``captioner_dataset`` is uniform over all pairs. Both draw 1-3 objects per scene, some captions
with size words or (for two objects) a relation instead of "and".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from comat_core.worlds.shapes.render import caption, render, sample_scene
from comat_core.worlds.shapes.splits import all_pairs, base_pair_weights

OBJECT_COUNTS = (1, 2, 3)
OBJECT_COUNT_WEIGHTS = (0.4, 0.45, 0.15)  # the captioner's and the VAE's scenes
P_SIZE_WORDS = 0.15  # fraction of captions that say "small"/"large"
P_RELATION = 0.15  # fraction of two-object captions with a relation instead of "and"


@dataclass
class Dataset:
    images: np.ndarray  # uint8 [N, H, W, 3]
    captions: list[str]


def render_dataset(n: int, seed: int, weights: dict[tuple[str, str], float],
                   count_weights: tuple[float, ...] = OBJECT_COUNT_WEIGHTS) -> Dataset:
    """``n`` scenes of 1-3 objects (by ``count_weights``) whose (colour, shape) pairs are drawn independently
    by ``weights``."""
    rng = np.random.default_rng(seed)
    pairs = list(weights)
    probs = np.array([weights[p] for p in pairs], dtype=np.float64)
    probs /= probs.sum()
    images, captions = [], []
    for _ in range(n):
        k = int(rng.choice(OBJECT_COUNTS, p=np.asarray(count_weights) / sum(count_weights)))
        chosen = [pairs[i] for i in rng.choice(len(pairs), size=k, p=probs)]
        scene = sample_scene(rng, chosen, relation=bool(rng.random() < P_RELATION),
                             with_size=bool(rng.random() < P_SIZE_WORDS))
        images.append(render(scene)[0])
        captions.append(caption(scene))
    return Dataset(np.stack(images), captions)


def base_dataset(n: int, seed: int, count_weights: tuple[float, ...] = OBJECT_COUNT_WEIGHTS) -> Dataset:
    """The base text-to-image model's data: seen pairs common, rare pairs rare, unseen pairs absent."""
    return render_dataset(n, seed, base_pair_weights(), count_weights)


def captioner_dataset(n: int, seed: int) -> Dataset:
    """The captioner's data: every pair equally likely."""
    return render_dataset(n, seed, {p: 1.0 for p in all_pairs()})
