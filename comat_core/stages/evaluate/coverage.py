"""Concept coverage: the captioner's NLL of each prompt given its image (a diagnostic; lower is better).

This is CoMat's concept-activation signal (docs/method.md §3) measured on the evaluation images: how well
the frozen BLIP captioner explains ``"a photography of " + prompt`` from the image. It reuses
:class:`comat_core.method.losses.concept.ConceptActivationLoss` for the preprocessing, tokenisation and
labels, with the evaluation's deterministic settings: no random crop and no label smoothing (a plain
token-mean NLL), one value per image, no gradients.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from comat_core.method.losses.concept import ConceptActivationLoss, next_token_loss
from comat_core.stages.evaluate.registry import EvalSample, Metric, Values, chunks, register

ALL_CATEGORIES = ("color", "shape", "texture", "spatial", "non_spatial", "complex")


def to_unit_tensor(images: Sequence) -> torch.Tensor:
    """PIL images (same size) → ``[B, 3, H, W]`` float in [0, 1]."""
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def caption_nll(loss: ConceptActivationLoss, images01: torch.Tensor, prompts: Sequence[str]) -> list[float]:
    """Per image, the token-mean NLL of its prompt under the captioner (``loss`` with crop 0, smoothing 0)."""
    device = next(loss.model.parameters()).device
    images01 = images01.to(device)
    pixel_values = loss.preprocess(images01)
    input_ids, attention_mask, labels = loss.tokenize(list(prompts), device)
    logits = loss.model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask).logits
    return [float(next_token_loss(logits[b : b + 1], labels[b : b + 1], loss.label_smoothing))
            for b in range(len(prompts))]


@register
class ConceptCoverage(Metric):
    name = "concept_nll"
    categories = ALL_CATEGORIES
    higher_is_better = False
    description = 'captioner NLL of "a photography of <prompt>" given the image (CoMat concept activation; lower is better)'

    def score(self, images, samples: Sequence[EvalSample]) -> dict[str, Values]:
        model, processor = self.env.models.captioner
        loss = self.env.cache.get("concept_loss")
        if loss is None:
            loss = self.env.cache["concept_loss"] = ConceptActivationLoss(model, processor, label_smoothing=0.0,
                                                                          crop_max=0)
        images = list(images)
        values: list[float] = []
        for part in chunks(len(images), self.env.settings.batch_size):
            values += caption_nll(loss, to_unit_tensor(images[part]), [s.prompt for s in samples[part]])
        return {self.name: values}
