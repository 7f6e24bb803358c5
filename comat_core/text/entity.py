"""An entity: a noun and its attribute words in one prompt, as character spans."""

from __future__ import annotations

from dataclasses import dataclass

Span = tuple[int, int]


@dataclass(frozen=True)
class Entity:
    """A noun and its attribute words in one prompt, as character offsets ``[start, end)``.

    ``phrase_span`` runs from the first to the last of the entity's words; attributes usually precede
    the noun ("a red cube") but follow it in predicative, relative and "made of" phrases ("the cat is
    fluffy", "a vase made of glass").
    """

    noun: str
    noun_span: Span
    attribute_spans: tuple[Span, ...]
    phrase_span: Span
