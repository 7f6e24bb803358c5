"""Who sees what: the (colour, shape) pairs of the base model's data, and the CoMat and evaluation prompts.

Decisions (fixed before any result was seen; nothing here is tuned toward an outcome):

**Pair frequencies in the base model's training captions.** Big text-to-image models bind badly
where their data is thin: attribute-object pairs that are rare or absent in their captions. The
world reproduces that with a Latin square over the 6 colours x 4 shapes = 24 pairs: colour ``i``
(in ``COLOURS`` order) never appears on shape ``i mod 4`` (*unseen*: 6 pairs, one per colour, each
shape unseen in 1-2 colours), appears rarely on shape ``(i + 1) mod 4`` (*rare*: 6 pairs, weight
``RARE_WEIGHT`` relative to a seen pair), and commonly on the other two (*seen*: 12 pairs). Every
colour and every shape is common somewhere, so the base model knows every word; only some
combinations are missing. Objects of a multi-object scene are drawn independently by these
weights.

**The captioner** sees all 24 pairs uniformly (it is the teacher, and the method can only transfer
what it knows).

**CoMat training prompts** (text only, as in the paper) and **held-out evaluation prompts** are
two-object prompts "a c1 s1 and a c2 s2" of two different pairs. The set of unordered two-pair
combinations (276) is shuffled with ``seed`` and cut into disjoint parts: evaluation first
(``n_eval``), training from the rest, so no evaluation prompt, in either word order, is ever a
training prompt. The shuffle is not stratified and not looked at: each part holds whatever mix of
seen/rare/unseen pairs it draws, and evaluation reports binding per pair kind. Single-object
prompts (all 24) are evaluated too; they are not CoMat training prompts.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from comat_core.worlds.shapes.vocab import COLOURS, SHAPES

RARE_WEIGHT = 0.05  # a rare pair's frequency relative to a seen pair in the base model's captions

Pair = tuple[str, str]


def all_pairs() -> list[Pair]:
    return list(itertools.product(COLOURS, SHAPES))


def pair_kind(pair: Pair) -> str:
    """``seen``, ``rare`` or ``unseen`` in the base model's training captions (the Latin square above)."""
    i, j = list(COLOURS).index(pair[0]), SHAPES.index(pair[1])
    offset = (j - i) % len(SHAPES)
    return {0: "unseen", 1: "rare"}.get(offset, "seen")


def base_pair_weights() -> dict[Pair, float]:
    """Sampling weight of each pair for the base model's data (sums to 1; unseen pairs have 0)."""
    raw = {p: {"seen": 1.0, "rare": RARE_WEIGHT, "unseen": 0.0}[pair_kind(p)] for p in all_pairs()}
    total = sum(raw.values())
    return {p: w / total for p, w in raw.items()}


def two_object_prompt(first: Pair, second: Pair) -> str:
    return f"a {first[0]} {first[1]} and a {second[0]} {second[1]}"


@dataclass(frozen=True)
class PromptSplit:
    train: tuple[str, ...]  # CoMat training prompts (two objects)
    eval_two: tuple[str, ...]  # held-out two-object evaluation prompts (never in ``train``, in any order)
    eval_single: tuple[str, ...]  # every single-object prompt


def prompt_split(seed: int, n_eval: int = 64, n_train: int | None = None) -> PromptSplit:
    """The CoMat training prompts and the held-out evaluation prompts (see the module docstring)."""
    combos = list(itertools.combinations(all_pairs(), 2))
    order = np.random.default_rng(seed).permutation(len(combos))
    if n_eval >= len(combos):
        raise ValueError(f"n_eval={n_eval} leaves no training prompts out of {len(combos)}")
    rng = np.random.default_rng(seed + 1)

    def prompt(combo: tuple[Pair, Pair]) -> str:  # a random word order, so neither pair always comes first
        first, second = combo if rng.integers(2) == 0 else combo[::-1]
        return two_object_prompt(first, second)

    eval_two = tuple(prompt(combos[i]) for i in order[:n_eval])
    rest = order[n_eval:] if n_train is None else order[n_eval : n_eval + n_train]
    train = tuple(prompt(combos[i]) for i in rest)
    eval_single = tuple(f"a {c} {s}" for c, s in all_pairs())
    return PromptSplit(train, eval_two, eval_single)
