"""Spatial relations ("a giraffe next to a lamp"): detector boxes plus T2I-CompBench's geometry rules.

The two objects of the prompt are detected with Grounding DINO (the transformers model the ``masks``
stage uses; T2I-CompBench used UniDet), and the image scores

* both found: ``0.25 * score1 + 0.25 * score2 + relation(box1, box2) / 2``;
* one found: ``0.25 * its score``; none: 0;
* and any total below 0.5 counts as 0 (so only images with both objects can score).

``relation`` is 1 when the boxes satisfy the relation and decays softly otherwise (see
:func:`relation_score`). Exactness notes (reference: T2I-CompBench ``UniDet_eval/2D_spatial_eval.py``):

* Relation words: the first of ``RELATIONS`` (in that order) found in the prompt as a substring.
* Geometry: box centres, IoU threshold 0.1, and a "near" distance of 150 px at the reference's
  512-px images; boxes here are normalised to [0, 1], so the distance is 150/512 of the image side.
* Objects: simple prompts take the first and the last noun; complex prompts take the nearest noun
  before and the first noun after a relation phrase, and need exactly two such objects (the
  reference's spaCy POS tags are replaced by :func:`comat_core.stages.entities.extract_entities` nouns).
* The reference maps girl/boy/man/woman to UniDet's "person" class; an open-vocabulary detector
  takes the noun as written, so there is no such mapping.
* **Decision**: "on top of" (32 of the complex spatial prompts) is scored as "on the top of"; the
  reference finds the phrase but has no rule for it and scores 0 (``alias_on_top_of=False``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch

from comat_core.stages.entities import extract_entities
from comat_core.stages.evaluate.registry import EvalSample, Metric, Values, chunks, register

RELATIONS = ("on side of", "next to", "near", "on the left of", "on the right of", "on the bottom of",
             "on the top of", "on top of")
COMPLEX_PREPOSITIONS = ("on top of", "on bottom of", "on the left", "on the right", "next to", "on side of", "near")
IOU_THRESHOLD = 0.1
NEAR_DISTANCE = 150 / 512  # the reference's 150 px at 512 px, as a fraction of the image side
PASS_THRESHOLD = 0.5


@dataclass(frozen=True)
class Box:
    """Corners in image coordinates normalised to [0, 1]; y grows downwards."""

    x_min: float
    y_min: float
    x_max: float
    y_max: float

    @property
    def centre(self) -> tuple[float, float]:
        return (self.x_min + self.x_max) / 2, (self.y_min + self.y_max) / 2

    @property
    def area(self) -> float:
        return max(0.0, self.x_max - self.x_min) * max(0.0, self.y_max - self.y_min)


@dataclass(frozen=True)
class Detection:
    score: float
    box: Box


def iou(a: Box, b: Box) -> float:
    width = max(0.0, min(a.x_max, b.x_max) - max(a.x_min, b.x_min))
    height = max(0.0, min(a.y_max, b.y_max) - max(a.y_min, b.y_min))
    intersection = width * height
    union = a.area + b.area - intersection
    return intersection / union if union > 0 else 0.0


def find_relation(prompt: str) -> str | None:
    """The first relation of ``RELATIONS`` that occurs in the prompt (reference order), or None."""
    return next((r for r in RELATIONS if r in prompt), None)


def relation_score(relation: str | None, box1: Box, box2: Box, alias_on_top_of: bool = True,
                   iou_threshold: float = IOU_THRESHOLD, near_distance: float = NEAR_DISTANCE) -> float:
    """How well "object 1 <relation> object 2" holds for the two boxes, in [0, 1].

    Directional relations need the centres to differ mostly along the relation's axis, in the right
    direction; overlapping boxes (IoU at or above the threshold) get ``threshold / IoU``. "near",
    "next to" and "on side of" hold when the centres are close along either axis and otherwise decay
    as ``near_distance / max(|dx|, |dy|)``.
    """
    if alias_on_top_of and relation == "on top of":
        relation = "on the top of"
    (x1, y1), (x2, y2) = box1.centre, box2.centre
    dx, dy = x2 - x1, y2 - y1
    if relation in ("next to", "on side of", "near"):
        if abs(dx) < near_distance or abs(dy) < near_distance:
            return 1.0
        return near_distance / max(abs(dx), abs(dy))
    direction = {
        "on the left of": dx > 0 and abs(dx) > abs(dy),
        "on the right of": dx < 0 and abs(dx) > abs(dy),
        "on the top of": dy > 0 and abs(dy) > abs(dx),
        "on the bottom of": dy < 0 and abs(dy) > abs(dx),
    }
    if not direction.get(relation, False):
        return 0.0
    overlap = iou(box1, box2)
    return 1.0 if overlap < iou_threshold else iou_threshold / overlap


def pair_score(relation: str | None, first: Detection | None, second: Detection | None,
               alias_on_top_of: bool = True) -> float:
    """The image's spatial score from the detections of the two objects (see the module docstring)."""
    if first is not None and second is not None:
        score = 0.25 * first.score + 0.25 * second.score
        score += relation_score(relation, first.box, second.box, alias_on_top_of) / 2
    elif first is not None or second is not None:
        score = 0.25 * (first or second).score
    else:
        score = 0.0
    return score if score >= PASS_THRESHOLD else 0.0


# ----------------------------------------------------------------------------------------------
# Objects of the relation


@lru_cache(maxsize=4096)
def simple_objects(prompt: str, parser: str = "offline") -> tuple[str, str] | None:
    """"<obj1> <relation> <obj2>" prompts: the first and the last noun."""
    nouns = [e.noun for e in extract_entities(prompt, parser=parser, require_attribute=False)]
    return (nouns[0].lower(), nouns[-1].lower()) if nouns else None


@lru_cache(maxsize=4096)
def complex_objects(prompt: str, parser: str = "offline") -> tuple[str, str] | None:
    """Sentences: for each relation phrase, the nearest noun before it and the first noun after it.

    Exactly two objects must come out (one relation phrase with a noun on each side), else None.
    """
    entities = extract_entities(prompt, parser=parser, require_attribute=False)
    lowered = prompt.lower()
    pattern = r"\b(" + "|".join(re.escape(p) for p in COMPLEX_PREPOSITIONS) + r")\b"
    objects = []
    for match in re.finditer(pattern, lowered):
        before = [e for e in entities if e.noun_span[1] <= match.start()]
        after = [e for e in entities if e.noun_span[0] >= match.end()]
        if before:
            objects.append(before[-1].noun.lower())
        if after:
            objects.append(after[0].noun.lower())
    return (objects[0], objects[1]) if len(objects) == 2 else None


# ----------------------------------------------------------------------------------------------
# Detection


def detector_caption(nouns: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """Grounding DINO's caption "noun1 . noun2 ." and each noun's character span in it."""
    caption, spans = "", []
    for noun in nouns:
        spans.append((len(caption), len(caption) + len(noun)))
        caption += f"{noun} . "
    return caption.strip(), spans


@torch.no_grad()
def detect_nouns(model, processor, images: Sequence, nouns_per_image: Sequence[Sequence[str]],
                 box_threshold: float) -> list[dict[str, Detection]]:
    """For each image and each of its nouns, the highest-scoring box of that noun (if above threshold).

    A query's score for a noun is its highest token probability over the noun's tokens (Grounding
    DINO's phrase grounding); the noun's detection is the query that scores it highest.
    """
    device = next(model.parameters()).device
    unique = [list(dict.fromkeys(n.lower() for n in nouns)) for nouns in nouns_per_image]
    captions, spans = zip(*(detector_caption(nouns) for nouns in unique))
    inputs = processor(images=list(images), text=list(captions), return_tensors="pt", padding="longest").to(device)
    offsets = processor.tokenizer(list(captions), padding="longest", return_offsets_mapping=True)
    if offsets.input_ids != inputs.input_ids.tolist():
        raise RuntimeError("Grounding DINO processor and tokenizer disagree on the caption tokens")
    out = model(**inputs)
    probs = out.logits.float().sigmoid()  # [B, queries, text positions]
    results = []
    for b, (nouns, noun_spans) in enumerate(zip(unique, spans)):
        found = {}
        for noun, (start, end) in zip(nouns, noun_spans):
            tokens = [j for j, (s, e) in enumerate(offsets.offset_mapping[b]) if e > s and s < end and e > start]
            if not tokens or max(tokens) >= probs.shape[-1]:
                continue
            per_query = probs[b][:, tokens].max(dim=-1).values
            best = int(per_query.argmax())
            score = float(per_query[best])
            if score > box_threshold:
                found[noun] = Detection(score, _corners(out.pred_boxes[b, best].float().tolist()))
        results.append(found)
    return results


def _corners(cxcywh: list[float]) -> Box:
    cx, cy, w, h = cxcywh
    clamp = lambda v: min(1.0, max(0.0, v))  # noqa: E731
    return Box(clamp(cx - w / 2), clamp(cy - h / 2), clamp(cx + w / 2), clamp(cy + h / 2))


def spatial_scores(env, images: Sequence, prompts: Sequence[str], structure: str = "simple") -> list[float]:
    """Spatial scores of ``images`` for ``prompts`` (``structure``: simple templates or complex sentences)."""
    parse = simple_objects if structure == "simple" else complex_objects
    objects = [parse(p, env.settings.parser) for p in prompts]
    scores = [0.0] * len(images)
    todo = [i for i, pair in enumerate(objects) if pair is not None]
    model, processor = env.models.detector
    for part in chunks(len(todo), env.settings.batch_size):
        idx = todo[part]
        found = detect_nouns(model, processor, [images[i] for i in idx], [objects[i] for i in idx],
                             env.settings.detector_box_threshold)
        for i, detections in zip(idx, found):
            first, second = objects[i]
            scores[i] = pair_score(find_relation(prompts[i]), detections.get(first), detections.get(second))
    return scores


@register
class Spatial(Metric):
    name = "spatial"
    categories = ("spatial",)
    headline_for = ("spatial",)
    description = "Grounding DINO boxes of the two objects and T2I-CompBench's geometry rules"

    def score(self, images, samples: Sequence[EvalSample]) -> dict[str, Values]:
        return {self.name: spatial_scores(self.env, images, [s.prompt for s in samples], "simple")}
