"""The shapes world's renderer: scenes of flat coloured shapes on a plain background, and their captions.

A ``Scene`` is 1-3 ``ObjectSpec`` (shape, colour, size, centre) that never overlap. ``render`` draws it
deterministically (hard edges, a pixel belongs to a shape when its centre does), so every object's mask
is exact; ``caption`` writes it with the world's templates::

    a red circle
    a small red circle                                  (sizes are optional words)
    a red circle and a blue square
    a red circle on the left of a blue square           (relations, read from the positions)
    a red circle, a blue square and a green triangle

``sample_scene`` places given (colour, shape) pairs at random, non-overlapping positions from a
``numpy`` generator, so a dataset is a pure function of its seed. ``parse_prompt`` (in ``vocab``)
reads every caption this module writes.

Sizes: the image is 64 px (the tiny SD1.5-shaped models' size: their VAE downsamples by 8, so
latents are 8x8); a small object spans 12-16 px, a large one 20-26 px.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from comat_core.worlds.shapes.vocab import BACKGROUND, COLOURS, SHAPES, SIZES

IMAGE_SIZE = 64
SIZE_RANGES = {"small": (12, 16), "large": (20, 26)}  # side of the object's square box, pixels (version 2)
SizeRanges = dict[str, tuple[float, float]]
MARGIN = 2  # pixels between an object and the border, and between two objects' boxes
RELATION_SLACK = 6  # pixels: a captioned relation is never within this of a diagonal


@dataclass(frozen=True)
class ObjectSpec:
    """One object: ``shape`` and ``colour`` words, ``size`` word, centre ``(x, y)`` and box ``side`` in pixels."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    side: float

    def box(self) -> tuple[float, float, float, float]:
        half = self.side / 2
        return self.x - half, self.y - half, self.x + half, self.y + half


@dataclass(frozen=True)
class Scene:
    objects: tuple[ObjectSpec, ...]
    image_size: int = IMAGE_SIZE
    relation: str | None = None  # a caption relation between objects 0 and 1 ("on the left of", ...) or None
    with_size: bool = False  # the caption says "small"/"large"
    pairs: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    def colour_shape_pairs(self) -> list[tuple[str, str]]:
        return [(o.colour, o.shape) for o in self.objects]


# ----------------------------------------------------------------------------------------------
# Geometry


def shape_mask(shape: str, cx: float, cy: float, side: float, size: int | tuple[int, int]) -> np.ndarray:
    """The pixels (by centre) of ``shape`` with box centre ``(cx, cy)`` and box side ``side`` (bool [H, W]).

    Shapes fill their square box: the circle and diamond touch its four sides, the triangle points
    up with its base on the box's bottom.
    """
    height, width = (size, size) if isinstance(size, int) else size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    u, v = (xs - cx) / (side / 2), (ys - cy) / (side / 2)  # the box is [-1, 1]^2, v points down
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if shape == "triangle":
        return (v <= 1.0) & (np.abs(u) <= (v + 1.0) / 2.0)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    raise ValueError(f"unknown shape {shape!r}; the world has {', '.join(SHAPES)}")


def relation_of(first: ObjectSpec, second: ObjectSpec) -> str:
    """Where ``first`` is relative to ``second``, by the larger offset of their centres."""
    dx, dy = first.x - second.x, first.y - second.y
    if abs(dx) >= abs(dy):
        return "on the left of" if dx < 0 else "on the right of"
    return "above" if dy < 0 else "below"


# ----------------------------------------------------------------------------------------------
# Rendering and captions


def render(scene: Scene, size: int | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """``(image uint8 [H, W, 3], masks)``: the scene on the background, one exact bool mask per object.

    ``size`` rescales the scene (positions and sides) to another square image size.
    """
    size = size or scene.image_size
    scale = size / scene.image_size
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    masks = []
    for obj in scene.objects:
        mask = shape_mask(obj.shape, obj.x * scale, obj.y * scale, obj.side * scale, size)
        image[mask] = COLOURS[obj.colour]
        masks.append(mask)
    return image, masks


def caption(scene: Scene) -> str:
    """The scene's caption from the world's templates (objects in scene order)."""

    def phrase(obj: ObjectSpec) -> str:
        words = ["a"] + ([obj.size] if scene.with_size else []) + [obj.colour, obj.shape]
        return " ".join(words)

    phrases = [phrase(o) for o in scene.objects]
    if len(phrases) == 1:
        return phrases[0]
    if len(phrases) == 2:
        return f"{phrases[0]} {scene.relation or 'and'} {phrases[1]}"
    return ", ".join(phrases[:-1]) + f" and {phrases[-1]}"


# ----------------------------------------------------------------------------------------------
# Sampling


def boxes_overlap(box: tuple[float, float, float, float], others: list[tuple[float, float, float, float]]) -> bool:
    """Whether ``box`` (x0, y0, x1, y1) comes within ``MARGIN`` of any of ``others``."""
    x0, y0, x1, y1 = box
    return any(x0 < b[2] + MARGIN and b[0] < x1 + MARGIN and y0 < b[3] + MARGIN and b[1] < y1 + MARGIN for b in others)


def sample_scene(rng: np.random.Generator, pairs: list[tuple[str, str]], *, sizes: list[str] | None = None,
                 relation: bool = False, with_size: bool = False, image_size: int = IMAGE_SIZE,
                 size_ranges: SizeRanges | None = None) -> Scene:
    """A scene with one object per ``(colour, shape)`` pair, at random non-overlapping places.

    ``sizes``: one size word per object (random when None). ``relation``: a two-object caption says
    where the first object is relative to the second instead of "and". ``size_ranges``: the box side
    range of each size word, in pixels of a 64 px image (``SIZE_RANGES`` when None).
    """
    size_ranges = size_ranges or SIZE_RANGES
    if not 1 <= len(pairs) <= 3:
        raise ValueError(f"a scene has 1-3 objects, got {len(pairs)}")
    for _ in range(1000):
        objects, boxes = [], []
        for i, (colour, shape) in enumerate(pairs):
            if colour not in COLOURS or shape not in SHAPES:
                raise ValueError(f"unknown colour or shape in {(colour, shape)}")
            size = sizes[i] if sizes else SIZES[int(rng.integers(len(SIZES)))]
            low, high = size_ranges[size]
            side = float(rng.uniform(low, high)) * image_size / IMAGE_SIZE
            half = side / 2
            x = float(rng.uniform(MARGIN + half, image_size - MARGIN - half))
            y = float(rng.uniform(MARGIN + half, image_size - MARGIN - half))
            obj = ObjectSpec(shape, colour, size, x, y, side)
            if boxes_overlap(obj.box(), boxes):
                break
            objects.append(obj)
            boxes.append(obj.box())
        else:
            rel = None
            if relation and len(objects) == 2:
                dx, dy = abs(objects[0].x - objects[1].x), abs(objects[0].y - objects[1].y)
                if abs(dx - dy) < RELATION_SLACK:  # too close to a diagonal to say left/right or above/below
                    continue
                rel = relation_of(objects[0], objects[1])
            return Scene(tuple(objects), image_size, rel, with_size, tuple(pairs))
    raise RuntimeError(f"could not place {pairs} without overlap")  # pragma: no cover - 3 objects always fit

