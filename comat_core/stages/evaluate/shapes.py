"""The shapes world's judge as an evaluation metric (categories in ``SHAPES_CATEGORIES``).

Categories: ``shapes`` (held-out two-object prompts, the headline), ``shapes_new`` (two objects, one
of them a colour-shape pair no training prompt holds), ``shapes_three`` (three objects),
``shapes_relation`` (two objects and a relation), ``shapes_train`` (training prompts),
``shapes_single`` (one object).

Per image, the judge (``worlds/shapes/judge.py``: palette quantisation, connected components, shape
from geometry; no learned model, independent of the captioner) gives:

* ``shapes``: binding accuracy, 1 when every (colour, shape) pair of the prompt is present as one
  object and nothing else is, else 0 (the headline);
* ``shapes.colours`` / ``shapes.shapes``: the image has exactly the prompt's colours / shapes, whatever
  goes with what (so a gain in one shows even when the other caps binding);
* ``shapes.shape_recall``: the fraction of the prompt's shapes drawn as clean objects, colour ignored;
* ``shapes.recall``: the fraction of the prompt's pairs present;
* ``shapes.validity``: the fraction of the image explained by clean palette shapes and background
  (catches a model that pleases the captioner with artefacts);
* ``shapes.failure.<kind>``: 1 for the image's kind in the judge's failure taxonomy
  (``judge.FAILURES``: correct, colours swapped, one colour on all, a colour wrong, a shape wrong,
  an object missing, extra objects, unrecognisable), so its mean is that kind's share.

The stage's paired bootstrap over prompts gives the confidence intervals of base vs tuned.
"""

from __future__ import annotations

from typing import Sequence

from comat_core.stages.evaluate.registry import EvalSample, Metric, Values, register

SHAPES_CATEGORIES = ("shapes", "shapes_new", "shapes_three", "shapes_relation", "shapes_train", "shapes_single")


def verdicts(images, prompts: Sequence[str]) -> list:
    """The judge's verdict for each (image, prompt)."""
    import numpy as np

    from comat_core.worlds.shapes.judge import score

    return [score(np.asarray(image.convert("RGB")), prompt) for image, prompt in zip(images, prompts)]


@register
class ShapesBinding(Metric):
    name = "shapes"
    categories = SHAPES_CATEGORIES
    headline_for = SHAPES_CATEGORIES
    description = "shapes world judge: binding accuracy (every colour-shape pair as one object, nothing else)"

    def score(self, images, samples: Sequence[EvalSample]) -> dict[str, Values]:
        from comat_core.worlds.shapes import judge

        found = verdicts(list(images), [s.prompt for s in samples])
        kinds = [judge.failure(v) for v in found]
        scores = {
            self.name: [float(v.binding) for v in found],
            f"{self.name}.colours": [float(judge.colours_right(v)) for v in found],
            f"{self.name}.shapes": [float(judge.shapes_right(v)) for v in found],
            f"{self.name}.shape_recall": [judge.shape_recall(v) for v in found],
            f"{self.name}.recall": [float(v.recall) for v in found],
            f"{self.name}.validity": [float(v.validity) for v in found],
        }
        for kind in judge.FAILURES:
            scores[f"{self.name}.failure.{failure_key(kind)}"] = [float(k == kind) for k in kinds]
        return scores


def failure_key(kind: str) -> str:
    """A failure kind as a metric-name part: ``colours swapped`` -> ``colours_swapped``."""
    return kind.replace(" ", "_")
