"""The prompts table's ``entities`` column: each entity of a prompt as a record, with its token positions.

The parsers and the token alignment are a library (``comat_core.text``); this module is the stage side:
one record per entity (noun, character spans) plus ``token_indices``, the positions of its noun and
attribute words in the configured text encoder's input (``models.pretrained``'s tokenizer, BOS = 0).
The prompts stage stores them once, so the trainer reads token positions rather than aligning text.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from comat_core.errors import InputError
from comat_core.text import Entity, Span, entity_token_indices, extract_entities, resolve_parser

# what stage modules import from here (evaluate, the registry): the library's entry points
__all__ = ["entities_from_records", "entities_to_records", "entity_records", "extract_entities", "resolve_parser"]


def entity_records(tokenizer, prompt: str, parser: str = "auto") -> list[dict]:
    """The prompt's entities (``comat_core.text.extract_entities``) as records with their token positions."""
    entities = extract_entities(prompt, parser=parser)
    return entities_to_records(entities, entity_token_indices(tokenizer, prompt, entities))


def entities_to_records(entities: Iterable[Entity], token_indices: Sequence[list[int]] | None = None) -> list[dict]:
    """Plain dicts with lists of ints (JSON and Parquet friendly); with ``token_indices``, one list per entity."""
    records = [{"noun": e.noun, "noun_span": list(e.noun_span),
                "attribute_spans": [list(s) for s in e.attribute_spans], "phrase_span": list(e.phrase_span)}
               for e in entities]
    if token_indices is not None:
        for record, tokens in zip(records, token_indices, strict=True):
            record["token_indices"] = list(tokens)
    return records


def entities_from_records(records: Iterable[dict]) -> list[Entity]:
    """The inverse of :func:`entities_to_records` (token positions are not part of an :class:`Entity`)."""
    try:
        return [Entity(str(r["noun"]), _span(r["noun_span"]),
                       tuple(_span(s) for s in r["attribute_spans"]), _span(r["phrase_span"]))
                for r in records]
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"malformed entity record ({exc}); re-run the prompts stage") from exc


def _span(value) -> Span:
    start, end = (int(v) for v in value)
    if not 0 <= start <= end:
        raise ValueError(f"bad span {list(value)}")
    return start, end
