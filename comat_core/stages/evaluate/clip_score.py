"""Non-spatial relations: CLIP image–text cosine similarity (T2I-CompBench's ``CLIPScore_eval``).

The score is the raw cosine of the L2-normalised image and text embeddings, in [-1, 1] (about 0.3 for
matching pairs): T2I-CompBench reports it unscaled (no CLIPScore ``2.5 * max(cos, 0)``, no ``100 *``),
and the published non-spatial figures (0.31 for SD1.5 and SDXL) are on that scale. The reference uses
OpenAI CLIP ViT-B/32 (``openai/clip-vit-base-patch32`` in transformers); set ``models.clip`` to it to
compare with the published figures. Texts are truncated to CLIP's 77 tokens.

In the complex category the reference scores the prompt with its adjectives removed (the "action"
part of the 3-in-1 score); :func:`without_attributes` removes the entities' attribute words.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from comat_core.stages.entities import extract_entities
from comat_core.stages.evaluate.registry import EvalSample, Metric, Values, chunks, register


def cosine_similarity(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine of two ``[N, D]`` embeddings (each row L2-normalised first)."""
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(dim=-1)


@torch.no_grad()
def clip_similarity(model, processor, images: Sequence, texts: Sequence[str]) -> Tensor:
    """Cosine similarity ``[N]`` of each image with its text under CLIP."""
    device = next(model.parameters()).device
    pixels = processor(images=list(images), return_tensors="pt").pixel_values.to(device, next(model.parameters()).dtype)
    max_length = getattr(processor.tokenizer, "model_max_length", 77)
    text = processor.tokenizer(list(texts), padding="longest", truncation=True, max_length=min(max_length, 77),
                               return_tensors="pt").to(device)
    image_embeds = model.get_image_features(pixel_values=pixels).pooler_output
    text_embeds = model.get_text_features(input_ids=text.input_ids, attention_mask=text.attention_mask).pooler_output
    return cosine_similarity(image_embeds, text_embeds)


def without_attributes(prompt: str, parser: str = "offline") -> str:
    """The prompt with its entities' attribute words removed (the reference drops spaCy ADJ tokens)."""
    spans = sorted(s for e in extract_entities(prompt, parser=parser) for s in e.attribute_spans)
    kept, last = [], 0
    for start, end in spans:
        kept.append(prompt[last:start])
        last = max(last, end)
    kept.append(prompt[last:])
    return re.sub(r"\s+", " ", "".join(kept)).strip()


def clip_scores(env, images: Sequence, texts: Sequence[str]) -> list[float]:
    model, processor = env.models.clip
    scores: list[float] = []
    for part in chunks(len(images), env.settings.batch_size):
        scores += clip_similarity(model, processor, images[part], texts[part]).tolist()
    return scores


@register
class ClipScore(Metric):
    name = "clip"
    categories = ("non_spatial",)
    headline_for = ("non_spatial",)
    description = "CLIP image-text cosine similarity (unscaled)"

    def score(self, images, samples: Sequence[EvalSample]) -> dict[str, Values]:
        return {self.name: clip_scores(self.env, list(images), [s.prompt for s in samples])}
