"""Entities of a prompt with either parser: the one entry point the stages call."""

from __future__ import annotations

from comat_core.errors import ConfigError, InputError
from comat_core.text import spacy_parser
from comat_core.text.entity import Entity
from comat_core.text.offline import parse_offline


def resolve_parser(parser: str = "auto") -> str:
    """``offline`` or ``spacy``: ``auto`` picks spaCy when spaCy and an English model are installed."""
    if parser not in ("auto", "offline", "spacy"):
        raise ConfigError(f"unknown entity parser {parser!r}; use 'auto', 'offline' or 'spacy'")
    if parser == "auto":
        return "spacy" if spacy_parser.model_name() is not None else "offline"
    return parser


def extract_entities(prompt: str, parser: str = "auto", require_attribute: bool = True) -> list[Entity]:
    """The nouns of ``prompt`` with their attribute words, in order of the noun.

    With ``require_attribute`` (docs/method.md §4: "the noun phrases that carry attributes"), nouns without
    any attribute word are left out.
    """
    if not isinstance(prompt, str):
        raise InputError(f"a prompt must be a string, got {type(prompt).__name__}")
    if resolve_parser(parser) == "spacy":
        entities = spacy_parser.entities_from_doc(spacy_parser.pipeline()(prompt))
    else:
        entities = parse_offline(prompt)
    return [e for e in entities if e.attribute_spans or not require_attribute]
