"""The shapes world's vocabulary (colours, shapes, sizes, relations) and the parser of its captions.

Colours are six well-separated RGB values (pairwise RGB distance >= 140, also from the background) on a light grey background;
every word is one token of the tiny models' tokenizers. ``parse_prompt`` reads the templates that
``render.caption`` writes (and only those): it is how the judge knows what a prompt asks for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from comat_core.errors import InputError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 20),
    "purple": (170, 40, 170),
    "black": (20, 20, 20),
}
BACKGROUND = (200, 200, 200)
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
RELATIONS = ("on the left of", "on the right of", "above", "below")


@dataclass(frozen=True)
class PromptObject:
    colour: str
    shape: str
    size: str | None = None


@dataclass(frozen=True)
class ParsedPrompt:
    objects: tuple[PromptObject, ...]
    relation: str | None = None  # where objects[0] is relative to objects[1]

    def pairs(self) -> list[tuple[str, str]]:
        return [(o.colour, o.shape) for o in self.objects]


_OBJECT = rf"an? (?:({'|'.join(SIZES)}) )?({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
_TEMPLATES = (
    re.compile(_OBJECT),
    re.compile(rf"{_OBJECT} (and|{'|'.join(RELATIONS)}) {_OBJECT}"),
    re.compile(rf"{_OBJECT}, {_OBJECT} and {_OBJECT}"),
)


def parse_prompt(prompt: str) -> ParsedPrompt:
    """The objects (and relation) of a caption in the world's templates; ``InputError`` for anything else."""
    text = " ".join(prompt.lower().strip().rstrip(".").split())
    for template in _TEMPLATES:
        match = template.fullmatch(text)
        if match:
            groups = list(match.groups())
            relation = None
            if len(groups) == 7:  # two objects and a connective
                relation = groups.pop(3)
                relation = None if relation == "and" else relation
            objects = [PromptObject(colour, shape, size) for size, colour, shape in zip(*[iter(groups)] * 3)]
            return ParsedPrompt(tuple(objects), relation)
    raise InputError(f"prompt {prompt!r} is not a shapes-world caption: use 'a [size] colour shape' for 1-3 objects, "
                     f"joined by ', ' and 'and' (or a relation between two)")
