"""The shapes world's judge: an exact oracle (no learned model) that finds objects and scores prompts.

``segment(image)`` finds the objects of an image:

1. **Background**: the median colour of the border pixels, so a tinted background (as generated
   images have) is still background.
2. **Palette quantisation**: every pixel goes to the nearest of background + the six colours; a pixel
   farther than ``CLEAN_DISTANCE`` from all of them is *unclean* (an artefact, a blurred edge, a colour
   the world does not have). Isolated pixels (salt-and-pepper noise) take their neighbours' class first.
3. **Connected components** (4-connected) of each colour; components under ``MIN_AREA`` pixels are
   specks, not objects.
4. **Shape from geometry**: each component is compared with every shape drawn in its own bounding
   square (the renderer's geometry); the best intersection-over-union names the shape when it is at
   least ``MIN_SHAPE_IOU``, otherwise the component is an unrecognised blob (``shape=None``).

``score(image, prompt)`` returns a ``Verdict``:

* ``binding``: the recognised objects are exactly the prompt's (colour, shape) pairs, as a multiset,
  and there is nothing else (no extra object, no blob);
* ``recall``: the fraction of the prompt's pairs found as one object;
* ``validity``: the fraction of the image explained by clean background and recognised shapes (their
  masks grown by one pixel, so a soft edge is not an artefact); a rendered image scores 1.0;
* ``relation``: for prompts with a relation, whether the two objects stand as it says (None otherwise).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from comat_core.worlds.shapes.render import relation_of, shape_mask, ObjectSpec
from comat_core.worlds.shapes.vocab import COLOURS, SHAPES, parse_prompt

CLEAN_DISTANCE = 70.0  # RGB distance to the nearest palette/background colour for a pixel to count as clean
MIN_AREA = 30  # pixels: smaller components are specks (the smallest rendered shape has about 70)
MIN_SHAPE_IOU = 0.7  # IoU with the best-fitting shape template to recognise a shape
_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _NAMES], dtype=np.float32)


@dataclass
class Found:
    """One object the judge found: its colour, its shape (None: an unrecognised blob), mask and area."""

    colour: str
    shape: str | None
    mask: np.ndarray = field(repr=False)
    area: int
    iou: float  # with the best shape template
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (pixels, exclusive ends)

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclass
class Verdict:
    binding: bool
    recall: float
    validity: float
    found: list[Found]
    wanted: list[tuple[str, str]]
    relation: bool | None = None

    def summary(self) -> str:
        """A short label for image grids: ``ok``/``x``, then what was found."""
        seen = ", ".join(f"{f.colour} {f.shape or 'blob'}" for f in self.found) or "nothing"
        return f"{'ok' if self.binding else 'x'} v={self.validity:.2f}: {seen}"


def _as_uint8_hwc(image) -> np.ndarray:
    """Accept uint8 [H, W, 3], float [H, W, 3] in [0, 1], a PIL image or a torch [3, H, W] tensor in [0, 1]."""
    if hasattr(image, "detach"):  # torch tensor [3, H, W] in [0, 1]
        image = image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    return image


def background_colour(image: np.ndarray) -> np.ndarray:
    """The median colour of the image's one-pixel border."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float32)
    return np.median(border, axis=0)


def _majority(classes: np.ndarray, n_classes: int) -> np.ndarray:
    """Despeckle a class map: a pixel alone of its class in its 3x3 window takes the window's majority
    class (5 or more). Shape corners and tips (never alone) are kept."""
    onehot = np.eye(n_classes, dtype=np.int16)[classes]  # [H, W, C]
    padded = np.pad(onehot, ((1, 1), (1, 1), (0, 0)))
    h, w = classes.shape
    counts = sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3))
    own = np.take_along_axis(counts, classes[..., None], -1)[..., 0]
    best = counts.argmax(-1)
    return np.where((own <= 1) & (counts.max(-1) >= 5), best, classes)


def components(labels: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-negative labels (negative: no object): ids >= 1, 0 elsewhere."""
    h, w = labels.shape
    fg = labels >= 0
    ids = np.where(fg, np.arange(1, h * w + 1).reshape(h, w), 0)
    same_right = fg[:, :-1] & (labels[:, :-1] == labels[:, 1:])
    same_down = fg[:-1] & (labels[:-1] == labels[1:])
    while True:  # propagate the largest id through each component until nothing changes
        new = ids.copy()
        np.maximum(new[:, :-1], np.where(same_right, ids[:, 1:], 0), out=new[:, :-1])
        np.maximum(new[:, 1:], np.where(same_right, ids[:, :-1], 0), out=new[:, 1:])
        np.maximum(new[:-1], np.where(same_down, ids[1:], 0), out=new[:-1])
        np.maximum(new[1:], np.where(same_down, ids[:-1], 0), out=new[1:])
        if np.array_equal(new, ids):
            return ids
        ids = new


def classify(mask: np.ndarray) -> tuple[str | None, float, tuple[int, int, int, int]]:
    """``(shape or None, best IoU, box)`` of one component, by IoU with each shape in its bounding square."""
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    side = max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    # compare inside a window around the box only (fast, and the templates fit in it)
    pad = 2
    wx0, wy0 = max(0, int(cx - side / 2) - pad), max(0, int(cy - side / 2) - pad)
    wx1, wy1 = min(mask.shape[1], int(cx + side / 2) + pad + 1), min(mask.shape[0], int(cy + side / 2) + pad + 1)
    window = mask[wy0:wy1, wx0:wx1]
    best, best_iou = None, 0.0
    for shape in SHAPES:
        template = shape_mask(shape, cx - wx0, cy - wy0, side, window.shape)
        inter = np.logical_and(window, template).sum()
        iou = inter / max(1, np.logical_or(window, template).sum())
        if iou > best_iou:
            best, best_iou = shape, float(iou)
    return (best if best_iou >= MIN_SHAPE_IOU else None), best_iou, (x0, y0, x1, y1)


def _quantise(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(classes, clean)``: per pixel 0 = background, 1 + i = the i-th colour; clean = near its colour."""
    pixels = image.astype(np.float32)
    references = np.concatenate([background_colour(image)[None], _PALETTE])  # [1 + C, 3]
    distance = np.linalg.norm(pixels[:, :, None, :] - references[None, None], axis=-1)  # [H, W, 1 + C]
    classes = distance.argmin(-1)
    clean = distance.min(-1) <= CLEAN_DISTANCE
    labels = np.where(clean, classes, len(references))  # unclean pixels are their own class
    labels = _majority(labels, len(references) + 1)
    return labels, labels < len(references)


def _segment(image: np.ndarray) -> tuple[list[Found], np.ndarray]:
    labels, clean = _quantise(image)
    objects = np.where(clean & (labels > 0), labels - 1, -1)
    ids = components(objects)
    found = []
    for comp_id, area in zip(*np.unique(ids[ids > 0], return_counts=True)):
        if area < MIN_AREA:
            continue
        mask = ids == comp_id
        shape, iou, box = classify(mask)
        colour = _NAMES[int(objects[mask][0])]
        found.append(Found(colour, shape, mask, int(area), iou, box))
    found.sort(key=lambda f: (f.box[0], f.box[1]))
    return found, clean & (labels == 0)


def segment(image) -> list[Found]:
    """The objects of an image (uint8 or [0, 1] float HxWx3, PIL, or a [3, H, W] tensor), left to right."""
    return _segment(_as_uint8_hwc(image))[0]


def _grow(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def score(image, prompt: str) -> Verdict:
    """Judge one image against one prompt of the world's templates (see the module docstring)."""
    parsed = parse_prompt(prompt)
    found, background = _segment(_as_uint8_hwc(image))
    wanted = parsed.pairs()
    have = Counter((f.colour, f.shape) for f in found)
    want = Counter(wanted)
    recall = sum((have & want).values()) / len(wanted)
    binding = have == want
    explained = background.copy()
    for f in found:
        if f.shape is not None:
            explained |= _grow(f.mask)
    relation = None
    if parsed.relation:
        relation = _relation_holds(found, wanted, parsed.relation)
    return Verdict(binding, recall, float(explained.mean()), found, wanted, relation)


def _relation_holds(found: list[Found], wanted: list[tuple[str, str]], relation: str) -> bool:
    """Whether some object matching the first pair stands ``relation`` to some object matching the second."""
    def spec(f: Found) -> ObjectSpec:
        return ObjectSpec(f.shape or "", f.colour, "", *f.centre, 0.0)

    firsts = [f for f in found if (f.colour, f.shape) == wanted[0]]
    seconds = [f for f in found if (f.colour, f.shape) == wanted[1]]
    return any(a is not b and relation_of(spec(a), spec(b)) == relation for a in firsts for b in seconds)
