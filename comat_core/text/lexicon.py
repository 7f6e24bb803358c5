"""The offline parser's word lists, read from the data files in ``comat_core/text/lexicons/``.

One word a line, ``#`` starts a comment line; ``multiword_nouns.txt`` holds one two-word name a line.
The attribute classes named in docs/method.md §4 (colours, shapes, sizes, textures, materials) are
lists of their own; ``nouns.txt``, ``adjectives.txt`` and ``verb_nouns.txt`` are the long open-class
lists (their headers say how they were made).
"""

from __future__ import annotations

from importlib import resources


def words(name: str) -> frozenset[str]:
    """The words of ``lexicons/NAME.txt``."""
    return frozenset(_lines(name))


def _lines(name: str) -> list[str]:
    text = (resources.files("comat_core.text") / "lexicons" / f"{name}.txt").read_text(encoding="utf-8")
    return [w for w in (line.strip() for line in text.splitlines()) if w and not w.startswith("#")]


COLOURS = words("colours")
SHAPES = words("shapes")
SIZES = words("sizes")
TEXTURES = words("textures")
MATERIALS = words("materials")
DUAL = words("dual")                          # attribute words that can also head a noun phrase ("a glass")
COLOUR_MODIFIERS = words("colour_modifiers")  # attributes only right before a colour ("light blue")
INTENSIFIERS = words("intensifiers")          # "very tall", "bright red": attribute words with what they modify
DETERMINERS = words("determiners")
SINGULAR_DETERMINERS = words("singular_determiners")
NUMBERS = words("numbers")
QUANTIFIERS = words("quantifiers")            # quantify or relate rather than describe: never attributes
PRONOUNS = words("pronouns")
PREPOSITIONS = words("prepositions")
CONJUNCTIONS = words("conjunctions")
COPULAS = words("copulas")
RELATIVES = words("relatives")
SPATIAL = words("spatial")                    # "on the left of", "on top of": never part of a noun phrase
VERBS_S = words("verbs_s")                    # third-person verbs that are also nouns ("the cat stands")
MULTIWORD_NOUNS = frozenset(tuple(line.split()) for line in _lines("multiword_nouns"))  # ("teddy", "bear"), ...
NOUNS = words("nouns")
ADJECTIVES = words("adjectives")
VERB_NOUNS = words("verb_nouns")

ATTRIBUTE_WORDS = COLOURS | SHAPES | SIZES | TEXTURES | MATERIALS
CLOSED = (DETERMINERS | NUMBERS | QUANTIFIERS | PRONOUNS | PREPOSITIONS | CONJUNCTIONS | COPULAS
          | SPATIAL | INTENSIFIERS)
