"""Entities for the attribute-concentration loss: each noun with its attribute words, as spans.

docs/method.md §4 supervises, for every noun phrase that carries attributes, the cross-attention of the
noun's tokens *and* of its attribute tokens (adjectives, compound nouns, adverbial modifiers) with the
noun's segmentation mask. This module finds those phrases once per prompt, in the data stage, as
character spans, and maps spans to text-encoder token indices.

Two parsers give the same :class:`Entity` structure:

* ``offline`` — a small rule-based chunker with shipped lexicons (``comat_core/data/``: colours,
  shapes, sizes, textures and materials below; ``nouns.txt``, ``adjectives.txt``, ``verb_nouns.txt``).
  It covers the templated prompts of the training set and T2I-CompBench ("a red cube and a blue
  sphere", "X on the left of Y", "X with Y", "the cat is fluffy", "a vase made of glass") without any
  downloaded model. It is deliberately conservative: a word is an attribute only when a lexicon or an
  attributive position says so, because a false attribute pulls an unrelated token's attention into a
  noun's mask, while a missed one only weakens the loss.
* ``spacy`` — the reference's approach: the dependency parse of an installed spaCy pipeline
  (``en_core_web_trf`` preferred), taking the noun's ``amod``/``compound``/``nmod``/``npadvmod``/
  ``advmod`` modifiers with their ``conj``/``advmod`` descendants, predicative adjectives (``acomp`` of a
  copula whose subject is the noun, also through a ``relcl``) and "made of" materials (``acl``).

Both merge two-word object names (``teddy bear``, ``hot dog``, the COCO categories) into one noun.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Iterable, Sequence

from comat_core.errors import ConfigError, InputError

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


# ----------------------------------------------------------------------------------------------
# Lexicons. Attribute classes named in docs/method.md §4 are listed here; long lists live in data/.

COLOURS = frozenset("""
red orange yellow green blue purple pink brown black white gray grey silver gold golden beige tan violet indigo
turquoise teal cyan magenta maroon navy crimson scarlet lavender ivory khaki amber burgundy fuchsia aqua azure
charcoal bronze copper platinum rust ruby sapphire emerald jade cerulean vermilion ochre mauve lilac periwinkle
taupe blond blonde auburn ginger brunette reddish orangish orangey yellowish greenish bluish blueish purplish
pinkish brownish blackish whitish grayish greyish colorful colourful multicolored multicoloured rainbow
transparent translucent opaque
""".split())
SHAPES = frozenset("""
round square triangular oval rectangular circular cubic spherical cylindrical conical pyramidal hexagonal
octagonal pentagonal heptagonal elliptical oblong curved curvy straight flat pointed angular spiral wavy zigzag
tubular rounded squared boxy domed arched
""".split())
SIZES = frozenset("""
big small tiny large huge giant enormous little tall short long mini miniature massive gigantic wide narrow
thick thin slim slender fat skinny chubby plump medium oversized compact petite vast immense colossal towering
lofty stubby lanky bulky hefty
""".split())
TEXTURES = frozenset("""
fluffy furry fuzzy hairy woolly wooly shaggy soft hard smooth rough shiny glossy matte bumpy silky velvety sticky
slimy spiky prickly thorny crispy crunchy crisp creamy grainy sandy rocky rusty muddy dusty wet dry damp slippery
coarse polished textured wrinkled crumpled knitted woven quilted padded plush squishy spongy feathery leafy grassy
scaly spotted striped checkered plaid dotted patterned floral sparkly sparkling glittery glittering shimmering
glowing reflective metallic glassy powdery puffy frosty icy frozen fiery gooey crumbly flaky chewy juicy leathery
rubbery satin velvet corrugated ribbed jagged gnarled mossy weathered tattered frayed pristine glazed cracked
dented
""".split())
MATERIALS = frozenset("""
wooden wood metal steel iron aluminum aluminium tin brass leather glass plastic fabric rubber ceramic porcelain
stone marble granite concrete brick paper cardboard cotton wool woolen woollen silk linen denim suede nylon
polyester canvas lace wicker bamboo straw clay terracotta crystal pearl stainless chrome plaster foam
""".split())
# Attribute words that can also head a noun phrase ("a glass", "an orange", "wearing black leather").
DUAL = frozenset("""
orange gold silver ivory copper bronze rust ruby sapphire emerald jade charcoal amber ginger square wood metal
steel iron tin brass leather glass plastic fabric rubber stone marble granite concrete brick paper cardboard
cotton wool silk linen denim suede nylon polyester canvas lace wicker bamboo straw clay crystal pearl plaster
foam velvet satin
""".split())
# Colour modifiers: attributes only right before a colour ("light blue"); "a bright light" is a noun.
COLOUR_MODIFIERS = frozenset("light dark bright pale deep pastel neon".split())
# Adverbs that modify a following attribute ("very tall", "bright red"): kept as attribute words,
# like the reference's advmod descendants.
INTENSIFIERS = frozenset("""
very really extremely super quite slightly somewhat fairly rather incredibly exceptionally unusually remarkably
highly perfectly completely totally partly partially mostly brightly vividly richly deeply
""".split())

DETERMINERS = frozenset("""
a an the this that these those some any each every another no both either neither his her their its my our your
whose 's
""".split())
SINGULAR_DETERMINERS = frozenset("a an this that each every another one".split())
NUMBERS = frozenset("""
one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen twenty thirty hundred
dozen several many few multiple numerous
""".split())
# Adjectives that quantify or relate rather than describe: never attributes.
QUANTIFIERS = frozenset("""
other same such own only next last first second third fourth fifth whole entire various different similar
certain additional more most less least much all half single double triple extra respective particular usual
typical main
""".split())
PRONOUNS = frozenset("""
i you he she it we they me him us them who whom what which that there here something someone somebody anything
anyone everything everyone nothing ones itself themselves himself herself
""".split())
PREPOSITIONS = frozenset("""
on in at of with without to from into onto upon over under above below beneath underneath behind beside besides
between among amongst near by across along around through throughout against inside outside within toward towards
past about after before during for like unlike atop via off up down out away than while as per despite amid amidst
nearby today tonight
""".split())
CONJUNCTIONS = frozenset("and or but nor yet so & whereas because although though if when where".split())
COPULAS = frozenset("""
is are was were be been being am looks look looked seems seem seemed appears appear appeared remains remain
remained stays stay stayed becomes become became feels feel felt
""".split())
RELATIVES = frozenset("that which who".split())
# Spatial words of the templates ("on the left of", "on top of"): never part of a noun phrase.
SPATIAL = frozenset("left right top bottom front back side middle center centre edge corner rear".split())
# Third-person verbs that are also nouns: after a singular noun they start the predicate
# ("the cat stands on"), whatever the determiner.
VERBS_S = frozenset("""
stands rests walks runs plays shows looks waves drinks watches lands leads falls rides turns swings slides sails
skates jumps smiles shines sleeps points works waits naps barks covers drops ends opens poses floats hangs lights
sits lies lays holds wears carries reads eats flies grows moves pulls pushes climbs dances sings kicks kisses
hugs bites chases catches throws uses touches reaches rolls spins stares starts stops talks writes paints cooks
cuts feeds fills flows glows leans leaps licks melts perches pours rises roars sniffs sparkles sprays stirs
swims travels wanders washes wins wraps yawns adds builds calls chirps chops closes cools crouches curls drips
drives flops flutters gallops glints heats hits hops hums kneels laughs launches lifts meanders offers overlooks
passes picks plucks pops presses proceeds scampers scratches scribbles scurries searches separates sheds simmers
skips snatches soars speeds sprawls sprouts squeaks squints surveys swarms swirls takes tows trails waddles whips
""".split())
# Two-word object names (COCO categories and a few more): one noun, not an attribute plus a noun.
MULTIWORD_NOUNS = frozenset({
    ("teddy", "bear"), ("hot", "dog"), ("fire", "hydrant"), ("stop", "sign"), ("traffic", "light"),
    ("tennis", "racket"), ("baseball", "bat"), ("baseball", "glove"), ("cell", "phone"), ("wine", "glass"),
    ("dining", "table"), ("potted", "plant"), ("hair", "drier"), ("hair", "dryer"), ("sports", "ball"),
    ("parking", "meter"), ("ice", "cream"), ("teddy", "bears"), ("hot", "dogs"), ("fire", "hydrants"),
    ("stop", "signs"), ("traffic", "lights"), ("tennis", "rackets"), ("baseball", "bats"), ("cell", "phones"),
    ("wine", "glasses"), ("dining", "tables"), ("potted", "plants"), ("parking", "meters"),
})
# Suffixes of unknown words read as adjectives in an attributive position ("a striped cat").
_ADJECTIVE_SUFFIX = re.compile(
    r"(?:[a-z]{2,}(?:ed|en|ing|y|ful|ous|ic|al|ive|ish|less|able|ible))$|"
    r"-(?:colou?red|shaped|sized|haired|eyed|skinned|legged|tailed|covered|topped|trimmed|framed|rimmed|"
    r"sleeved|toed|striped|patterned|looking|like)$"
)
_WORD = re.compile(r"[^\W\d_]+(?:-[^\W\d_]+)*|'s\b|\d+(?:[.,]\d+)?|[^\w\s]|_")


def _data_words(name: str) -> frozenset[str]:
    text = (resources.files("comat_core") / "data" / name).read_text(encoding="utf-8")
    return frozenset(w for w in (line.strip() for line in text.splitlines()) if w and not w.startswith("#"))


@lru_cache(maxsize=1)
def _lexicon() -> dict[str, frozenset[str]]:
    return {"nouns": _data_words("nouns.txt"), "adjectives": _data_words("adjectives.txt"),
            "verb_nouns": _data_words("verb_nouns.txt")}


ATTRIBUTE_WORDS = COLOURS | SHAPES | SIZES | TEXTURES | MATERIALS
_CLOSED = (DETERMINERS | NUMBERS | QUANTIFIERS | PRONOUNS | PREPOSITIONS | CONJUNCTIONS | COPULAS
           | SPATIAL | INTENSIFIERS)


# ----------------------------------------------------------------------------------------------
# Offline parser


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
    nouns = _lexicon()["nouns"]
    return word in nouns or (word.endswith("s") and any(s in nouns and s not in ATTRIBUTE_WORDS
                                                         for s in _singulars(word)))


def _is_verb_noun(word: str) -> bool:
    verbish = _lexicon()["verb_nouns"]
    return word in verbish or any(s in verbish for s in _singulars(word))


_IRREGULAR_PLURALS = frozenset("people men women children mice geese teeth feet oxen police".split())


def _is_plural(word: str) -> bool:
    """A plural noun ("apples", "people"), not a singular ending in s ("bus") or a plural modifier ("sports")."""
    if word in _IRREGULAR_PLURALS:
        return True
    return word not in {"sports", "glasses", "arms", "goods", "clothes"} and word.endswith("s") \
        and any(s in _lexicon()["nouns"] for s in _singulars(word))


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
    if word in _CLOSED:
        return "OTHER"
    if word in ATTRIBUTE_WORDS:
        return "DUAL" if word in DUAL else "ATTR"
    if word in _lexicon()["adjectives"] or _is_colour_compound(word):
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
                               and any(s in _lexicon()["verb_nouns"] for s in _singulars(tok.text))):
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


def _parse_offline(prompt: str) -> list[Entity]:
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


# ----------------------------------------------------------------------------------------------
# spaCy parser

_SPACY_MODELS = ("en_core_web_trf", "en_core_web_lg", "en_core_web_md", "en_core_web_sm")
_MODIFIERS = {"amod", "nmod", "compound", "npadvmod", "advmod"}
_COPULA_LEMMAS = {"be", "look", "seem", "appear", "become", "remain", "stay", "feel"}


@lru_cache(maxsize=1)
def _spacy_model_name() -> str | None:
    try:
        import spacy.util
    except ImportError:
        return None
    installed = set(spacy.util.get_installed_models())
    return next((m for m in _SPACY_MODELS if m in installed), None)


@lru_cache(maxsize=1)
def _spacy_pipeline():
    name = _spacy_model_name()
    if name is None:
        raise ConfigError("parser 'spacy' needs spaCy and an English model (pip install spacy, then "
                          "python -m spacy download en_core_web_trf); or set prompts.parser to 'offline'")
    import spacy

    return spacy.load(name)


def _modifier_closure(token) -> list:
    """The token and its modifier/conjunct descendants ("bright red", "red and white")."""
    out, stack = [token], list(token.children)
    while stack:
        node = stack.pop()
        if node.dep_ in _MODIFIERS or node.dep_ == "conj":
            out.append(node)
            stack.extend(node.children)
    return out


def _predicate_tokens(noun) -> list:
    """Adjectives said of the noun by a copula: "the cat is fluffy", "a dog that is red"."""
    verbs = []
    if noun.dep_ in ("nsubj", "nsubjpass") and noun.head.lemma_ in _COPULA_LEMMAS:
        verbs.append(noun.head)
    verbs += [c for c in noun.children if c.dep_ == "relcl" and c.lemma_ in _COPULA_LEMMAS]
    out = []
    for verb in verbs:
        for child in verb.children:
            if child.dep_ == "acomp" or (child.dep_ == "attr" and child.pos_ == "ADJ"):
                out += _modifier_closure(child)
    return out


def _material_tokens(noun) -> list:
    """"a vase made of glass": the object of "made of/from" and its modifiers."""
    out = []
    verbs = [c for c in noun.children if c.dep_ == "acl" and c.lemma_ == "make"]
    if noun.dep_ in ("nsubj", "nsubjpass") and noun.head.lemma_ == "make":
        verbs.append(noun.head)
    for verb in verbs:
        for prep in verb.children:
            if prep.dep_ == "prep" and prep.text.lower() in ("of", "from"):
                for obj in prep.children:
                    if obj.dep_ == "pobj":
                        out += [t for c in obj.children if c.dep_ in _MODIFIERS for t in _modifier_closure(c)]
                        out.append(obj)
    return out


def entities_from_doc(doc) -> list[Entity]:
    """Entities from a parsed spaCy ``Doc`` (dependency labels of the English pipelines)."""
    prompt = doc.text
    entities = []
    for noun in doc:
        if noun.pos_ not in ("NOUN", "PROPN") or noun.dep_ in _MODIFIERS:
            continue
        words = [t for c in noun.children if c.dep_ in _MODIFIERS for t in _modifier_closure(c)]
        words += _predicate_tokens(noun) + _material_tokens(noun)
        words = sorted({t.i: t for t in words if t.pos_ not in ("AUX", "VERB", "DET", "NUM", "PRON")
                        or t.tag_ in ("VBN", "VBG") and t.dep_ in ("amod", "compound")}.values(),
                       key=lambda t: t.i)
        first = noun
        if words and words[-1].i == noun.i - 1 and (words[-1].text.lower(), noun.text.lower()) in MULTIWORD_NOUNS:
            first = words.pop()
        noun_span = (first.idx, noun.idx + len(noun.text))
        spans = tuple((t.idx, t.idx + len(t.text)) for t in words)
        lo = min([noun_span[0]] + [s for s, _ in spans])
        hi = max([noun_span[1]] + [e for _, e in spans])
        entities.append(Entity(prompt[noun_span[0]:noun_span[1]].lower(), noun_span, spans, (lo, hi)))
    return entities


# ----------------------------------------------------------------------------------------------
# Public API


def resolve_parser(parser: str = "auto") -> str:
    """``offline`` or ``spacy``: ``auto`` picks spaCy when spaCy and an English model are installed."""
    if parser not in ("auto", "offline", "spacy"):
        raise ConfigError(f"unknown entity parser {parser!r}; use 'auto', 'offline' or 'spacy'")
    if parser == "auto":
        return "spacy" if _spacy_model_name() is not None else "offline"
    return parser


def extract_entities(prompt: str, parser: str = "auto", require_attribute: bool = True) -> list[Entity]:
    """The nouns of ``prompt`` with their attribute words, in order of the noun.

    With ``require_attribute`` (docs/method.md §4: "the noun phrases that carry attributes"), nouns without
    any attribute word are left out.
    """
    if not isinstance(prompt, str):
        raise InputError(f"a prompt must be a string, got {type(prompt).__name__}")
    if resolve_parser(parser) == "spacy":
        entities = entities_from_doc(_spacy_pipeline()(prompt))
    else:
        entities = _parse_offline(prompt)
    return [e for e in entities if e.attribute_spans or not require_attribute]


def entities_to_records(entities: Iterable[Entity]) -> list[dict]:
    """Plain dicts with lists of ints (JSON and Parquet friendly)."""
    return [{"noun": e.noun, "noun_span": list(e.noun_span),
             "attribute_spans": [list(s) for s in e.attribute_spans], "phrase_span": list(e.phrase_span)}
            for e in entities]


def entities_from_records(records: Iterable[dict]) -> list[Entity]:
    """The inverse of :func:`entities_to_records`."""
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
