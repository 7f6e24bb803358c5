"""The offline entity parser: a small rule-based chunker with the word lists of ``lexicons/``.

It covers the templated prompts of the training set and T2I-CompBench ("a red cube and a blue
sphere", "X on the left of Y", "X with Y", "the cat is fluffy", "a vase made of glass") without any
downloaded model. It is deliberately conservative: a word is an attribute only when a lexicon or an
attributive position says so, because a false attribute pulls an unrelated token's attention into a
noun's mask, while a missed one only weakens the loss.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from comat_core.text.entity import Entity
from comat_core.text.lexicon import (
    ADJECTIVES,
    ATTRIBUTE_WORDS,
    CLOSED,
    COLOUR_MODIFIERS,
    COLOURS,
    COPULAS,
    DETERMINERS,
    DUAL,
    INTENSIFIERS,
    MULTIWORD_NOUNS,
    NOUNS,
    NUMBERS,
    PREPOSITIONS,
    QUANTIFIERS,
    RELATIVES,
    SINGULAR_DETERMINERS,
    SPATIAL,
    VERB_NOUNS,
    VERBS_S,
)

# Suffixes of unknown words read as adjectives in an attributive position ("a striped cat").
_ADJECTIVE_SUFFIX = re.compile(
    r"(?:[a-z]{2,}(?:ed|en|ing|y|ful|ous|ic|al|ive|ish|less|able|ible))$|"
    r"-(?:colou?red|shaped|sized|haired|eyed|skinned|legged|tailed|covered|topped|trimmed|framed|rimmed|"
    r"sleeved|toed|striped|patterned|looking|like)$"
)
_WORD = re.compile(r"[^\W\d_]+(?:-[^\W\d_]+)*|'s\b|\d+(?:[.,]\d+)?|[^\w\s]|_")


@dataclass
class _Tok:
    text: str        # lowercased
    start: int
    end: int
    tag: str         # DET NUM PUNCT COMMA AND COP INT ATTR DUAL NOUN UNK OTHER


def _singulars(word: str) -> list[str]:
    out = []
    if word.endswith("ies"):
        out.append(word[:-3] + "y")
    if word.endswith("ves"):
        out += [word[:-3] + "f", word[:-3] + "fe"]
    if word.endswith("es"):
        out.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss"):
        out.append(word[:-1])
    return out


def _is_noun(word: str) -> bool:
    return word in NOUNS or (word.endswith("s") and any(s in NOUNS and s not in ATTRIBUTE_WORDS
                                                        for s in _singulars(word)))


def _is_verb_noun(word: str) -> bool:
    return word in VERB_NOUNS or any(s in VERB_NOUNS for s in _singulars(word))


_IRREGULAR_PLURALS = frozenset("people men women children mice geese teeth feet oxen police".split())


def _is_plural(word: str) -> bool:
    """A plural noun ("apples", "people"), not a singular ending in s ("bus") or a plural modifier ("sports")."""
    if word in _IRREGULAR_PLURALS:
        return True
    return word not in {"sports", "glasses", "arms", "goods", "clothes"} and word.endswith("s") \
        and any(s in NOUNS for s in _singulars(word))


def _tag(word: str, next_word: str | None) -> str:
    if word in (",", ";"):
        return "COMMA"
    if word in ("and", "&", "or"):
        return "AND"
    if word in NUMBERS or word[0].isdigit():
        return "NUM"
    if word in DETERMINERS or word in QUANTIFIERS:
        return "DET"
    if word in COPULAS:
        return "COP"
    if word in COLOUR_MODIFIERS and next_word in COLOURS:
        return "ATTR"
    if word in INTENSIFIERS:
        return "INT"
    if word in SPATIAL and word not in ("left", "right") and next_word is not None and _is_noun(next_word):
        return "NOUN"                     # "a corner shelf", "a side table"; but "on the left side of"
    if word in CLOSED:
        return "OTHER"
    if word in ATTRIBUTE_WORDS:
        return "DUAL" if word in DUAL else "ATTR"
    if word in ADJECTIVES or _is_colour_compound(word):
        return "ATTR"
    if _is_noun(word):
        return "NOUN"
    if not word[0].isalpha():
        return "PUNCT"
    return "UNK"


def _is_colour_compound(word: str) -> bool:
    """"red-and-white", "blue-green", "light-blue": every part a colour (or "and"/a colour modifier)."""
    parts = word.split("-")
    return (len(parts) > 1 and parts[-1] in COLOURS
            and all(p in COLOURS or p in COLOUR_MODIFIERS or p == "and" for p in parts))


def _tokenize(prompt: str) -> list[_Tok]:
    words = [(m.group().lower(), m.start(), m.end()) for m in _WORD.finditer(prompt)]
    return [_Tok(w, s, e, _tag(w, words[i + 1][0] if i + 1 < len(words) else None))
            for i, (w, s, e) in enumerate(words)]


@dataclass
class _Phrase:
    """A noun phrase under construction: token indices with their roles."""

    singular_det: bool             # introduced by "a", "an", "this", …
    items: list[tuple[int, str]]   # (token index, role): A attribute, M intensifier, C connector,
                                   # N noun, D dual, S suffix-adjective, U unknown

    def has_noun(self) -> bool:
        return any(r == "N" for _, r in self.items)


@dataclass
class _NP:
    head: int                      # token index (last token of a multiword noun)
    noun_first: int                # first token of the noun (== head unless multiword)
    attributes: list[int]
    clause_initial: bool


_CLAUSE_START = {"START", "PUNCT", "COMMA", "AND"}
# Words after which a participle reads as an attribute ("a sleeping cat", "with striped shirts") rather
# than a verb ("both wearing ties", "each holding a cup").
_NP_OPENERS = frozenset("a an the this these those his her their its my our your 's".split())


def _attributive_start(tokens: list[_Tok], i: int) -> bool:
    """Whether an unknown word at ``i``, opening a phrase, sits where an adjective would."""
    ctx = _context(tokens, i)
    if re.search(r"(ing|ed|en)$", tokens[i].text):
        return ctx in ("NUM", "OTHER_PREP") or (ctx == "DET" and tokens[i - 1].text in _NP_OPENERS)
    return ctx in ("DET", "NUM", "OTHER_PREP")


def _context(tokens: list[_Tok], i: int) -> str:
    if i == 0:
        return "START"
    prev = tokens[i - 1]
    if prev.tag == "OTHER" and prev.text in PREPOSITIONS:
        return "OTHER_PREP"
    if prev.tag == "OTHER" and prev.text in ("while", "but", "because", "when", "where"):
        return "AND"
    return prev.tag


def _chunk(tokens: list[_Tok]) -> list[_NP]:
    """Split the prompt into noun phrases: maximal runs of attribute/noun words with one head."""
    phrases: list[_NP] = []
    cur: _Phrase | None = None

    def close() -> None:
        nonlocal cur
        if cur is not None:
            np_ = _finish(tokens, cur)
            if np_ is not None:
                phrases.append(np_)
        cur = None

    def open_(i: int) -> _Phrase:
        return _Phrase(i > 0 and tokens[i - 1].text in SINGULAR_DETERMINERS, [])

    for i, tok in enumerate(tokens):
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        tag = tok.tag
        if tok.text == "'s" and cur is not None and cur.has_noun():
            cur = None                    # a possessor: its attributes may be the possessed's ("a young girl's dress")
            continue
        if tag in ("COMMA", "AND"):
            if (cur is not None and cur.items and cur.items[-1][1] in "ADS" and not cur.has_noun()
                    and nxt is not None and (nxt.tag in ("ATTR", "DUAL", "INT")
                                             or nxt.tag == "UNK" and _ADJECTIVE_SUFFIX.search(nxt.text))):
                cur.items.append((i, "C"))
                continue
            close()
        elif tag == "INT":
            if nxt is None or nxt.tag not in ("ATTR", "DUAL", "INT"):
                close()
                continue
            if cur is None or cur.has_noun():
                close()
                cur = open_(i)
            cur.items.append((i, "M"))
        elif tag == "ATTR":
            if cur is None or cur.has_noun():
                close()
                cur = open_(i)
            cur.items.append((i, "A"))
        elif tag == "DUAL":
            if cur is None:
                cur = open_(i)
            cur.items.append((i, "N" if cur.has_noun() else "D"))
        elif tag == "NOUN":
            if cur is None:
                cur = open_(i)
            elif cur.has_noun() and not _compounds(tokens, cur, tok):
                close()
                if _is_verb_noun(tok.text):
                    continue              # the verb of a clause: "the dogs walk", "the cat stands"
                cur = open_(i)
            cur.items.append((i, "N"))
        elif tag == "UNK":
            if cur is not None and cur.has_noun():
                close()                   # a verb after the noun: "the cat sleeps on …"
                continue
            attributive = (cur.items[-1][1] in "ADSMC") if cur is not None else _attributive_start(tokens, i)
            is_adj = attributive and _ADJECTIVE_SUFFIX.search(tok.text) is not None and nxt is not None \
                and nxt.tag in ("ATTR", "DUAL", "NOUN", "UNK", "COMMA", "AND")
            if cur is None:
                cur = open_(i)
            cur.items.append((i, "S" if is_adj else "U"))
        else:
            close()
    close()
    return phrases


def _compounds(tokens: list[_Tok], cur: _Phrase, tok: _Tok) -> bool:
    """Whether noun ``tok`` continues a compound after the phrase's last noun, or starts a predicate."""
    prev = tokens[cur.items[-1][0]].text
    if _is_plural(prev):
        return False                      # "dogs walk", "apples oranges" (no plural-first compounds)
    if tok.text in VERBS_S or (cur.singular_det and _is_plural(tok.text)
                               and any(s in VERB_NOUNS for s in _singulars(tok.text))):
        return False                      # "the cat stands", "a man drinks"
    return True


def _finish(tokens: list[_Tok], ph: _Phrase) -> _NP | None:
    items = ph.items
    nouns = [k for k, (_, r) in enumerate(items) if r == "N"]
    if nouns:
        h = nouns[-1]
    elif items and items[-1][1] == "D":
        h = len(items) - 1
    elif items and items[-1][1] == "U" and any(r in "ADS" for _, r in items[:-1]) \
            and not re.search(r"(ing|ed|ly)$", tokens[items[-1][0]].text):
        h = len(items) - 1                # an unknown noun after attributes: "a red beear"
    else:
        return None
    head = items[h][0]
    first = head
    if h > 0 and (tokens[items[h - 1][0]].text, tokens[head].text) in MULTIWORD_NOUNS:
        first = items[h - 1][0]
    attributes = [i for i, r in items[:h] if r in "AMDNS" and i < first]
    # an intensifier counts only when what it modifies does
    attributes = [i for k, i in enumerate(attributes)
                  if tokens[i].tag != "INT" or any(j > i and tokens[j].tag != "INT" for j in attributes[k + 1:])]
    return _NP(head, first, attributes, _clause_initial(tokens, items[0][0]))


def _clause_initial(tokens: list[_Tok], i: int) -> bool:
    """Whether the phrase starting at token ``i`` opens a clause (so it can be a copula's subject)."""
    while i > 0 and tokens[i - 1].tag in ("DET", "NUM"):
        i -= 1
    ctx = _context(tokens, i)
    if ctx in ("AND", "COMMA") and i > 1 and tokens[i - 2].tag in ("NOUN", "DUAL", "UNK"):
        return False                      # "its lid and handle was …", "a cat and a dog are …": not one subject
    return ctx in _CLAUSE_START


def _predicate_attributes(tokens: list[_Tok], i: int) -> tuple[list[int], int] | None:
    """``[that|which] COPULA [very] ADJ ((,|and) ADJ)*`` at token ``i`` → attribute indices, end.

    Rejected when a noun follows ("is a red car" is handled as its own phrase) or "than" does
    (comparisons relate two nouns, they do not describe one).
    """
    j = i
    if j < len(tokens) and tokens[j].text in RELATIVES:
        j += 1
    if j >= len(tokens) or tokens[j].tag != "COP":
        return None
    j += 1
    attrs: list[int] = []
    while j < len(tokens):
        t = tokens[j]
        if t.tag == "INT" or t.tag in ("ATTR", "DUAL"):
            attrs.append(j)
        elif t.tag in ("COMMA", "AND") and attrs and j + 1 < len(tokens) \
                and tokens[j + 1].tag in ("ATTR", "DUAL", "INT"):
            pass
        else:
            break
        j += 1
    if not attrs or tokens[attrs[-1]].tag == "INT":
        return None
    if j < len(tokens) and (tokens[j].tag in ("NOUN", "UNK", "DUAL") or tokens[j].text == "than"):
        return None
    return attrs, j


def _made_of(tokens: list[_Tok], i: int) -> int | None:
    """``[is|are] made (of|from|out of)`` at token ``i`` → index of the material phrase's first token."""
    j = i
    if j < len(tokens) and tokens[j].tag == "COP":
        j += 1
    if j + 1 < len(tokens) and tokens[j].text == "made":
        j += 1
        if tokens[j].text == "out" and j + 1 < len(tokens) and tokens[j + 1].text == "of":
            j += 1
        if tokens[j].text in ("of", "from"):
            j += 1
            while j < len(tokens) and tokens[j].tag in ("DET", "NUM"):
                j += 1
            return j
    return None


def parse_offline(prompt: str) -> list[Entity]:
    """Every noun phrase of ``prompt`` as an :class:`Entity` (nouns without attributes included)."""
    tokens = _tokenize(prompt)
    phrases = _chunk(tokens)
    by_first = {min([p.noun_first] + p.attributes): p for p in phrases}
    consumed: set[int] = set()            # tokens that became attributes of an earlier noun
    extra: dict[int, list[int]] = {}
    for p in phrases:
        if p.head in consumed:
            continue
        after = p.head + 1
        material = _made_of(tokens, after)
        if material is not None and (tokens[after].text == "made" or p.clause_initial):
            q = by_first.get(material)
            if q is not None:
                extra[p.head] = q.attributes + list(range(q.noun_first, q.head + 1))
            elif material < len(tokens) and tokens[material].tag in ("DUAL", "ATTR"):
                extra[p.head] = [material]        # "made of glass": a lone material word
            consumed.update(extra.get(p.head, []))
            continue
        pred = _predicate_attributes(tokens, after)
        if pred is not None and (p.clause_initial or tokens[after].text in RELATIVES):
            extra[p.head] = pred[0]
            consumed.update(pred[0])
    entities = []
    for p in phrases:
        if p.head in consumed:
            continue
        attrs = sorted(set(p.attributes + extra.get(p.head, [])))
        entities.append(_entity(prompt, tokens, p.noun_first, p.head, attrs))
    return entities


def _entity(prompt: str, tokens: Sequence[_Tok], noun_first: int, head: int, attrs: Iterable[int]) -> Entity:
    noun_span = (tokens[noun_first].start, tokens[head].end)
    spans = tuple((tokens[i].start, tokens[i].end) for i in attrs)
    lo = min([noun_span[0]] + [s for s, _ in spans])
    hi = max([noun_span[1]] + [e for _, e in spans])
    return Entity(prompt[noun_span[0]:noun_span[1]].lower(), noun_span, spans, (lo, hi))

