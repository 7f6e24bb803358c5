"""Complex prompts: T2I-CompBench's "3-in-1" score, the mean of the sub-scores that apply.

Each complex prompt is listed in one of three routing files:

* ``complex_val_spatial.txt``: attribute binding and a spatial relation → mean of BLIP-VQA and spatial;
* ``complex_val_action.txt``: attribute binding and an action → mean of BLIP-VQA and CLIP;
* ``complex_val_spatialaction.txt``: all three → mean of BLIP-VQA, spatial and CLIP.

Exactness notes (reference: T2I-CompBench ``3_in_1_eval/3_in_1.py``): prompts are matched on the
lower-cased text before the first "." (so "The cat sat. It slept." matches on "the cat sat"); the
spatial list is checked first, then the action list, and a prompt in neither gets all three (the
reference's ``else`` branch); ``routing.ComplexRouting`` does this matching. The spatial part parses
objects as complex sentences, and the CLIP part scores the prompt with its attribute words removed,
as the reference's ``--complex`` flags do.
"""

from __future__ import annotations

from typing import Sequence

from comat_core.stages.evaluate.clip_score import clip_scores, without_attributes
from comat_core.stages.evaluate.registry import EvalSample, Metric, Values, register
from comat_core.stages.evaluate.routing import COMPONENTS
from comat_core.stages.evaluate.spatial import spatial_scores
from comat_core.stages.evaluate.vqa import attribute_scores


def combine(parts: dict[str, float | None]) -> float:
    """The mean of the components that apply (those that are not None)."""
    values = [v for v in parts.values() if v is not None]
    return sum(values) / len(values)


@register
class Complex(Metric):
    name = "complex"
    categories = ("complex",)
    headline_for = ("complex",)
    description = "3-in-1: mean of BLIP-VQA, spatial and CLIP (adjectives removed), as routed per prompt"

    def score(self, images, samples: Sequence[EvalSample]) -> dict[str, Values]:
        if self.env.routing is None:
            raise ValueError("the complex metric needs the complex_val_* routing files")
        images = list(images)
        prompts = [s.prompt for s in samples]
        needs = [self.env.routing.components(p) for p in prompts]
        parts: dict[str, Values] = {c: [None] * len(images) for c in COMPONENTS}
        scorers = {
            "attribute": lambda imgs, ps: attribute_scores(self.env, imgs, ps),
            "spatial": lambda imgs, ps: spatial_scores(self.env, imgs, ps, "complex"),
            "action": lambda imgs, ps: clip_scores(self.env, imgs, [without_attributes(p, self.env.settings.parser)
                                                                    for p in ps]),
        }
        for component, scorer in scorers.items():
            idx = [i for i, need in enumerate(needs) if component in need]
            if idx:
                for i, value in zip(idx, scorer([images[i] for i in idx], [prompts[i] for i in idx])):
                    parts[component][i] = value
        total = [combine({c: parts[c][i] for c in COMPONENTS}) for i in range(len(images))]
        return {self.name: total, **{f"{self.name}.{c}": parts[c] for c in COMPONENTS}}
