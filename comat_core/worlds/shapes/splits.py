"""Who sees what: the (colour, shape) pairs of the base model's data, and the CoMat and evaluation prompts.

Decisions (fixed before any result was seen; nothing here is tuned toward an outcome):

**Pair frequencies in the base model's training captions** (``design``). ``uniform`` (the
default since version 3): every pair is equally common, as colour-object pairs are on the web; the
base model's binding weakness then comes from loose captions (``data.base_dataset(swap_p=...)``),
not from missing pairs. ``latin`` (version 2, an option): big text-to-image models bind badly
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

**CoMat training prompts** (text only, as in the paper, whose prompt files are not all two-object
scenes) mix one-, two- and three-object prompts, so single objects are not traded for pairs.
**Evaluation prompts** (``prompt_split``), every part disjoint from training, in any word order:

* ``eval_two`` (the headline, category ``shapes``): two-object prompts from the training prompts'
  distribution: their pairs all occur in training prompts, their combinations never do (as
  T2I-CompBench's validation prompts are to its training prompts);
* ``eval_new`` (``shapes_new``): two-object prompts holding one of ``N_NEW_PAIRS`` colour-shape pairs
  that no training prompt holds (the harder generalisation);
* ``eval_three`` (``shapes_three``): three-object prompts; ``eval_relation`` (``shapes_relation``):
  two objects joined by a relation ("on the left of", "above", ...) instead of "and";
* ``eval_single`` (``shapes_single``): every single-object prompt (single objects must not fall).

Every draw is from generators seeded with ``seed``; the shuffles are not stratified and not looked at.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from comat_core.worlds.shapes.vocab import COLOURS, RELATIONS, SHAPES

RARE_WEIGHT = 0.05  # a rare pair's frequency relative to a seen pair in the base model's captions

Pair = tuple[str, str]


def all_pairs() -> list[Pair]:
    return list(itertools.product(COLOURS, SHAPES))


DESIGNS = ("uniform", "latin")


def pair_kind(pair: Pair, design: str = "latin") -> str:
    """``seen``, ``rare`` or ``unseen`` in the base model's training captions (the Latin square above;
    every pair is ``seen`` in the ``uniform`` design)."""
    if design == "uniform":
        return "seen"
    if design != "latin":
        raise ValueError(f"unknown pair design {design!r}; the world has {', '.join(DESIGNS)}")
    i, j = list(COLOURS).index(pair[0]), SHAPES.index(pair[1])
    offset = (j - i) % len(SHAPES)
    return {0: "unseen", 1: "rare"}.get(offset, "seen")


def base_pair_weights(design: str = "latin") -> dict[Pair, float]:
    """Sampling weight of each pair for the base model's data (sums to 1; unseen pairs have 0)."""
    raw = {p: {"seen": 1.0, "rare": RARE_WEIGHT, "unseen": 0.0}[pair_kind(p, design)] for p in all_pairs()}
    total = sum(raw.values())
    return {p: w / total for p, w in raw.items()}


def two_object_prompt(first: Pair, second: Pair) -> str:
    return f"a {first[0]} {first[1]} and a {second[0]} {second[1]}"


N_NEW_PAIRS = 4  # colour-shape pairs no CoMat training prompt holds (one per shape)
N_TRAIN_THREE = 48  # three-object CoMat training prompts


@dataclass(frozen=True)
class PromptSplit:
    train: tuple[str, ...]  # CoMat training prompts (one, two and three objects)
    eval_two: tuple[str, ...]  # held-out two-object prompts of trained pairs, never a training combination
    eval_single: tuple[str, ...]  # every single-object prompt
    eval_new: tuple[str, ...] = ()  # two-object prompts with a pair no training prompt holds
    eval_three: tuple[str, ...] = ()  # held-out three-object prompts
    eval_relation: tuple[str, ...] = ()  # held-out two-object prompts with a relation
    new_pairs: tuple[Pair, ...] = ()

    def train_two(self) -> tuple[str, ...]:
        """The two-object training prompts (category ``shapes_train`` evaluates the first of them)."""
        return tuple(p for p in self.train if p.count(" a ") == 1 and ", " not in p)


def prompt_split(seed: int, n_eval: int = 64, n_small: int = 32) -> PromptSplit:
    """The CoMat training prompts and the evaluation prompts (see the module docstring).

    ``n_eval`` held-out two-object prompts (the headline); ``n_small`` prompts in each of the other
    held-out categories (new pairs, three objects, relations).
    """
    pairs = all_pairs()
    rng = np.random.default_rng(seed)
    colours = list(rng.permutation(list(COLOURS)))
    new_pairs = tuple((str(colours[i]), SHAPES[i]) for i in range(N_NEW_PAIRS))
    trained = [p for p in pairs if p not in new_pairs]
    combos = list(itertools.combinations(trained, 2))
    if n_eval + n_small >= len(combos):
        raise ValueError(f"n_eval={n_eval} + n_small={n_small} leaves no two-object training prompts of {len(combos)}")
    order = rng.permutation(len(combos))
    order_rng = np.random.default_rng(seed + 1)

    def ordered(combo) -> list[Pair]:  # a random word order, so no pair always comes first
        combo = list(combo)
        order_rng.shuffle(combo)
        return combo

    def phrase(pair: Pair) -> str:
        return f"a {pair[0]} {pair[1]}"

    eval_two = tuple(two_object_prompt(*ordered(combos[i])) for i in order[:n_eval])
    relations = [RELATIONS[int(k)] for k in rng.integers(len(RELATIONS), size=n_small)]
    eval_relation = tuple(f"{phrase(a)} {rel} {phrase(b)}" for (a, b), rel in
                          zip((ordered(combos[i]) for i in order[n_eval : n_eval + n_small]), relations))
    train_two = [two_object_prompt(*ordered(combos[i])) for i in order[n_eval + n_small :]]
    new_combos = [c for c in itertools.combinations(pairs, 2) if set(c) & set(new_pairs)]
    eval_new = tuple(two_object_prompt(*ordered(new_combos[i]))
                     for i in rng.permutation(len(new_combos))[:n_small])
    triples = list(itertools.combinations(trained, 3))
    picked = [ordered(triples[i]) for i in rng.permutation(len(triples))[: n_small + N_TRAIN_THREE]]
    three = [f"{phrase(a)}, {phrase(b)} and {phrase(c)}" for a, b, c in picked]
    train_single = [phrase(p) for p in trained]
    train = tuple(train_single + train_two + three[n_small:])
    return PromptSplit(train, eval_two, tuple(phrase(p) for p in pairs), eval_new, tuple(three[:n_small]),
                       eval_relation, new_pairs)
