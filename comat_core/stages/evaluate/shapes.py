"""The shapes world's judge as an evaluation metric (categories ``shapes``, ``shapes_train``, ``shapes_single``).

Per image, the judge (``worlds/shapes/judge.py``: palette quantisation, connected components, shape
from geometry; no learned model, independent of the captioner) gives:

* ``shapes``: binding accuracy, 1 when every (colour, shape) pair of the prompt is present as one
  object and nothing else is, else 0 (the headline);
* ``shapes.recall``: the fraction of the prompt's pairs present;
* ``shapes.validity``: the fraction of the image explained by clean palette shapes and background
  (catches a model that pleases the captioner with artefacts).

The stage's paired bootstrap over prompts gives the confidence intervals of base vs tuned.
"""

from __future__ import annotations

from typing import Sequence

from comat_core.stages.evaluate.registry import EvalSample, Metric, Values, register

SHAPES_CATEGORIES = ("shapes", "shapes_train", "shapes_single")


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
        found = verdicts(list(images), [s.prompt for s in samples])
        return {
            self.name: [float(v.binding) for v in found],
            f"{self.name}.recall": [float(v.recall) for v in found],
            f"{self.name}.validity": [float(v.validity) for v in found],
        }
