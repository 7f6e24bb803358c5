"""The shapes world's judge: an exact oracle (no learned model) that finds objects and scores prompts.

``segment(image)`` finds the objects of an image:

1. **Background**: the median colour of the border pixels, so a tinted background (as generated
   images have) is still background.
2. **Palette quantisation**: every pixel goes to the nearest of background + the six colours; a pixel
   farther than ``CLEAN_DISTANCE`` from all of them is *unclean* (an artefact, a blurred edge, a colour
   the world does not have). Isolated pixels (salt-and-pepper noise) take their neighbours' class first.
3. **Connected components** (4-connected) of each colour; components under ``MIN_AREA`` pixels are
   specks, not objects.
4. **Shape from geometry**: scale-free moments of each component (compactness, where its mass lies
   by direction, vertical skew) name the nearest shape; the component is that shape only if the
   shape, drawn with the renderer's geometry and fitted to it, overlaps it with IoU >=
   ``MIN_SHAPE_IOU``, otherwise it is an unrecognised blob (``shape=None``). Moments rather than
   template IoU alone: soft, rounded shapes (as a VAE decodes them) all fit a circle's template
   best, but keep their moments (measured on VAE reconstructions of renders).

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
MIN_SHAPE_IOU = 0.7  # IoU with the fitted shape template for a component to be that shape
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


_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5}  # area / box area
_CENTROID_BELOW_CENTRE = {"triangle": 1 / 6}  # centroid offset from the box centre, in box sides
_FEATURE_SCALE = np.array([0.01, 0.03, 0.15])  # how far apart shapes' features are (see ``shape_features``)


def shape_features(mask: np.ndarray) -> np.ndarray:
    """Scale-free moments of a region about its centroid (``u, v`` in units of sqrt(area)):

    * ``E[u^2 + v^2]``: compactness (circle 0.159, square/diamond 0.166, triangle 0.193);
    * ``E[u^4 + v^4] / E[(u^2 + v^2)^2]``: where the mass lies by direction (circle 0.75, square 0.64
      with its corners on the diagonals, diamond 0.86 with its tips on the axes);
    * ``E[v^3] / E[v^2]^1.5``: vertical skew (the upward triangle -0.57, the others 0).

    Moments change little when corners are rounded or edges soft, as a VAE decodes them.
    """
    ys, xs = np.nonzero(mask)
    scale = np.sqrt(len(xs))
    u, v = (xs - xs.mean()) / scale, (ys - ys.mean()) / scale
    r2 = u * u + v * v
    return np.array([r2.mean(), (u**4 + v**4).mean() / max((r2 * r2).mean(), 1e-9),
                     (v**3).mean() / max((v * v).mean(), 1e-9) ** 1.5])


def _soften(mask: np.ndarray, radius: int) -> np.ndarray:
    """Round a mask's corners: a (2 radius + 1)^2 box average, thresholded at one half."""
    padded = np.pad(mask.astype(np.float32), radius)
    h, w = mask.shape
    k = 2 * radius + 1
    total = sum(padded[dy : dy + h, dx : dx + w] for dy in range(k) for dx in range(k))
    return total / (k * k) >= 0.5


def _reference_features() -> dict[str, list[np.ndarray]]:
    """Each shape's features, sharp and with corners rounded (radius 2 and 3), averaged over sides 12-26 px."""
    refs = {}
    for shape in SHAPES:
        masks = [shape_mask(shape, 32.3, 32.1, side, 64) for side in range(12, 27, 2)]
        refs[shape] = [np.mean([shape_features(m if r == 0 else _soften(m, r)) for m in masks], 0) for r in (0, 2, 3)]
    return refs


_REFERENCE = _reference_features()


def _iou(window: np.ndarray, shape: str, cx: float, cy: float, side: float) -> float:
    template = shape_mask(shape, cx, cy, side, window.shape)
    return float(np.logical_and(window, template).sum() / max(1, np.logical_or(window, template).sum()))


def classify(mask: np.ndarray) -> tuple[str | None, float, tuple[int, int, int, int]]:
    """``(shape or None, IoU, box)`` of one component.

    The shape is the one whose ``shape_features`` (sharp, or with corners rounded as a decoder
    rounds them) are nearest, scaled by ``_FEATURE_SCALE``; it
    counts only if the shape, drawn with the renderer's geometry and fitted to the component (its
    bounding square, or its area and centroid, whichever fits better), overlaps it with IoU >=
    ``MIN_SHAPE_IOU``; otherwise the component is a blob (None).
    """
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    features = shape_features(mask)
    shape = min(SHAPES, key=lambda s: min(float((((features - ref) / _FEATURE_SCALE) ** 2).sum())
                                          for ref in _REFERENCE[s]))
    side = max(x1 - x0, y1 - y0)
    mx, my, area = float(xs.mean()) + 0.5, float(ys.mean()) + 0.5, len(xs)
    pad = side // 2 + 2  # compare inside a window around the component only (fast; every fit lies in it)
    wx0, wy0 = max(0, x0 - pad), max(0, y0 - pad)
    window = mask[wy0 : min(mask.shape[0], y1 + pad), wx0 : min(mask.shape[1], x1 + pad)]
    fit_side = (area / _FILL[shape]) ** 0.5
    fit_cy = my - _CENTROID_BELOW_CENTRE.get(shape, 0.0) * fit_side
    iou = max(_iou(window, shape, (x0 + x1) / 2 - wx0, (y0 + y1) / 2 - wy0, side),
              _iou(window, shape, mx - wx0, fit_cy - wy0, fit_side))
    return (shape if iou >= MIN_SHAPE_IOU else None), iou, (x0, y0, x1, y1)


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


# ----------------------------------------------------------------------------------------------
# What kind of right or wrong: colours and shapes apart, and a failure taxonomy

FAILURES = ("correct", "colours swapped", "one colour on all", "a colour wrong", "a shape wrong",
            "an object missing", "extra objects", "unrecognisable")


def colours_right(verdict: Verdict) -> bool:
    """The image's objects (blobs included) have exactly the prompt's colours, as a multiset, whatever their shapes."""
    return Counter(f.colour for f in verdict.found) == Counter(c for c, _ in verdict.wanted)


def shapes_right(verdict: Verdict) -> bool:
    """The image's objects are exactly the prompt's shapes, as a multiset (a blob is no shape), whatever their colours."""
    return Counter(f.shape for f in verdict.found) == Counter(s for _, s in verdict.wanted)


def shape_recall(verdict: Verdict) -> float:
    """The fraction of the prompt's shapes drawn as clean, recognised objects, ignoring colour."""
    have = Counter(f.shape for f in verdict.found if f.shape is not None)
    want = Counter(s for _, s in verdict.wanted)
    return sum((have & want).values()) / len(verdict.wanted)


def failure(verdict: Verdict) -> str:
    """One of ``FAILURES`` for an image, checked in this order:

    ``correct`` (binding); ``unrecognisable`` (an unrecognised blob); ``an object missing`` / ``extra
    objects`` (fewer / more objects than the prompt names); ``a shape wrong`` (the shapes differ);
    then, with the right shapes: ``colours swapped`` (the right colours on the wrong objects),
    ``one colour on all`` (one colour everywhere where the prompt names several), ``a colour wrong``.
    """
    if verdict.binding:
        return "correct"
    if any(f.shape is None for f in verdict.found):
        return "unrecognisable"
    if len(verdict.found) != len(verdict.wanted):
        return "an object missing" if len(verdict.found) < len(verdict.wanted) else "extra objects"
    if not shapes_right(verdict):
        return "a shape wrong"
    if colours_right(verdict):
        return "colours swapped"
    if len({f.colour for f in verdict.found}) == 1 and len({c for c, _ in verdict.wanted}) > 1:
        return "one colour on all"
    return "a colour wrong"
