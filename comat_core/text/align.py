"""Character spans → the text encoder's token positions (what the attention losses index).

Positions count the BOS token as 0, as in the encoder's hidden states and cross-attention maps.
"""

from __future__ import annotations

from typing import Sequence

from comat_core.errors import ConfigError
from comat_core.text.entity import Entity, Span


def align_spans_to_tokens(tokenizer, prompt: str, spans: Sequence[Span], max_length: int = 77) -> list[list[int]]:
    """For each character span, the indices of the text encoder's input ids that overlap it.

    Indices count the BOS token as 0, as in the encoder's hidden states and cross-attention maps.
    Tokens cut off by truncation to ``max_length`` are not there, so a span past it gives ``[]``.
    Needs a fast tokenizer (``return_offsets_mapping``).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"{type(tokenizer).__name__} is not a fast tokenizer; entity alignment needs "
                          "return_offsets_mapping (load the tokenizer with use_fast=True)")
    enc = tokenizer(prompt, return_offsets_mapping=True, truncation=True, max_length=max_length)
    offsets = enc["offset_mapping"]
    special = set(getattr(tokenizer, "all_special_ids", ()))
    ids = enc["input_ids"]
    out = []
    for start, end in spans:
        out.append([i for i, (s, e) in enumerate(offsets)
                    if e > s and s < end and e > start and ids[i] not in special])
    return out


def entity_token_indices(tokenizer, prompt: str, entities: Sequence[Entity], max_length: int = 77) -> list[list[int]]:
    """For each entity, the sorted token positions of its noun and attribute words (one tokenizer call).

    These are the tokens whose cross-attention the attribute-concentration loss pulls into the entity's
    mask (docs/method.md §4).
    """
    if not entities:
        return []
    spans = [[e.noun_span, *e.attribute_spans] for e in entities]
    flat = align_spans_to_tokens(tokenizer, prompt, [s for group in spans for s in group], max_length)
    out, at = [], 0
    for group in spans:
        out.append(sorted({i for span in flat[at: at + len(group)] for i in span}))
        at += len(group)
    return out
