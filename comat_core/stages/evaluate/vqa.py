"""BLIP-VQA attribute binding (colour, shape, texture): T2I-CompBench's ``BLIPvqa_eval``.

For each noun phrase of the prompt ("a green bench", "a blue bowl") BLIP-VQA is asked
``"<noun phrase>?"``; the answer probability of "yes" is read from the decoder's first answer
token, and the image score is the product over the phrases (at most 8, T2I-CompBench's ``np_num``).

Exactness notes (reference: T2I-CompBench ``BLIPvqa_eval/BLIP_vqa.py`` and ``models/blip_vqa.py``):

* Phrases: the reference takes spaCy ``en_core_web_sm`` noun chunks; we take the entity phrases of
  :func:`comat_core.stages.entities.extract_entities` (every noun, with or without attributes) widened to a
  directly preceding article, which gives the same chunks on the templated prompts.
* Probability: the reference softmaxes the first decoder token's logits over the vocabulary and
  reports ``p(yes) / (p(yes) + p(no))``; ``normalise_yes_no=False`` gives the raw ``p(yes)``.
* A prompt without noun phrases scores 1 (the reference sets empty questions to 1).
* Questions are truncated to 35 tokens, as in the reference.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Sequence

import torch
from torch import Tensor

from comat_core.stages.entities import extract_entities
from comat_core.errors import InputError
from comat_core.stages.evaluate.registry import EvalSample, Metric, Values, chunks, register

MAX_PHRASES = 8
MAX_QUESTION_TOKENS = 35
_ARTICLE_BEFORE = re.compile(r"\b(a|an|the)\s+$", re.IGNORECASE)


@lru_cache(maxsize=4096)
def noun_phrases(prompt: str, parser: str = "offline") -> tuple[str, ...]:
    """The prompt's noun phrases in order, each widened to a directly preceding article."""
    phrases = []
    for entity in extract_entities(prompt, parser=parser, require_attribute=False):
        start, end = entity.phrase_span
        article = _ARTICLE_BEFORE.search(prompt[:start])
        if article:
            start = article.start()
        phrases.append(prompt[start:end])
    return tuple(phrases)


def questions_for(prompt: str, parser: str = "offline") -> list[str]:
    """``"<noun phrase>?"`` for the first ``MAX_PHRASES`` noun phrases."""
    return [f"{phrase}?" for phrase in noun_phrases(prompt, parser)[:MAX_PHRASES]]


def yes_no_ids(tokenizer) -> tuple[int, int]:
    """Token ids of the answers "yes" and "no"; each must be a single token of the vocabulary."""
    ids = []
    for word in ("yes", "no"):
        pieces = tokenizer(word, add_special_tokens=False).input_ids
        if len(pieces) != 1 or pieces[0] == tokenizer.unk_token_id:
            raise InputError(f"the VQA tokenizer has no single token for {word!r}; use a BLIP-VQA checkpoint "
                             "(e.g. Salesforce/blip-vqa-base) for models.vqa")
        ids.append(pieces[0])
    return ids[0], ids[1]


@torch.no_grad()
def first_answer_logits(model, processor, images: Sequence, questions: Sequence[str]) -> Tensor:
    """Logits ``[N, vocab]`` of the first answer token for each (image, question) pair.

    The question is encoded with the image (BLIP's text encoder cross-attends to the ViT tokens);
    the answer decoder starts from its bos token and attends to the question encoding.
    """
    device = next(model.parameters()).device
    inputs = processor(images=list(images), text=list(questions), return_tensors="pt", padding="longest",
                       truncation=True, max_length=MAX_QUESTION_TOKENS).to(device)
    pixel_values = inputs.pixel_values.to(next(model.parameters()).dtype)
    image_embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device)
    question = model.text_encoder(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                                  encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask)
    bos = torch.full((len(questions), 1), model.decoder_start_token_id, dtype=torch.long, device=device)
    out = model.text_decoder(input_ids=bos, encoder_hidden_states=question.last_hidden_state,
                             encoder_attention_mask=inputs.attention_mask)
    return out.logits[:, 0].float()


def yes_probability(logits: Tensor, yes_id: int, no_id: int, normalise_yes_no: bool = True) -> Tensor:
    """P("yes") from first-token logits: softmax over the vocabulary, optionally renormalised over yes/no."""
    probs = logits.float().softmax(dim=-1)
    p_yes, p_no = probs[:, yes_id], probs[:, no_id]
    return p_yes / (p_yes + p_no) if normalise_yes_no else p_yes


def vqa_scores(model, processor, images: Sequence, question_lists: Sequence[Sequence[str]],
               batch_size: int = 32, normalise_yes_no: bool = True) -> list[float]:
    """Per image, the product over its questions of P("yes"); 1.0 for an image without questions."""
    yes_id, no_id = yes_no_ids(processor.tokenizer)
    pairs = [(i, q) for i, questions in enumerate(question_lists) for q in questions]
    scores = [1.0] * len(images)
    for part in chunks(len(pairs), batch_size):
        batch = pairs[part]
        logits = first_answer_logits(model, processor, [images[i] for i, _ in batch], [q for _, q in batch])
        for (i, _), p in zip(batch, yes_probability(logits, yes_id, no_id, normalise_yes_no).tolist()):
            scores[i] *= p
    return scores


@register
class BlipVqa(Metric):
    name = "blip_vqa"
    categories = ("color", "shape", "texture")
    headline_for = ("color", "shape", "texture")
    description = 'BLIP-VQA: product over noun phrases of P("yes") to "<noun phrase>?"'

    def score(self, images, samples: Sequence[EvalSample]) -> dict[str, Values]:
        return {self.name: attribute_scores(self.env, images, [s.prompt for s in samples])}


def attribute_scores(env, images, prompts: Sequence[str]) -> list[float]:
    """BLIP-VQA scores of ``images`` for ``prompts`` with the stage's models and settings."""
    model, processor = env.models.vqa
    questions = [questions_for(p, env.settings.parser) for p in prompts]
    return vqa_scores(model, processor, images, questions, batch_size=env.settings.batch_size)
