"""The spaCy entity parser: the reference's approach, on the dependency parse of an installed pipeline.

``en_core_web_trf`` is preferred. It takes the noun's ``amod``/``compound``/``nmod``/``npadvmod``/
``advmod`` modifiers with their ``conj``/``advmod`` descendants, predicative adjectives (``acomp`` of a
copula whose subject is the noun, also through a ``relcl``) and "made of" materials (``acl``).
"""

from __future__ import annotations

from functools import lru_cache

from comat_core.errors import ConfigError
from comat_core.text.entity import Entity
from comat_core.text.lexicon import MULTIWORD_NOUNS

_SPACY_MODELS = ("en_core_web_trf", "en_core_web_lg", "en_core_web_md", "en_core_web_sm")
_MODIFIERS = {"amod", "nmod", "compound", "npadvmod", "advmod"}
_COPULA_LEMMAS = {"be", "look", "seem", "appear", "become", "remain", "stay", "feel"}


@lru_cache(maxsize=1)
def model_name() -> str | None:
    """The best installed English pipeline (or None: spaCy or every model missing)."""
    try:
        import spacy.util
    except ImportError:
        return None
    installed = set(spacy.util.get_installed_models())
    return next((m for m in _SPACY_MODELS if m in installed), None)


@lru_cache(maxsize=1)
def pipeline():
    """The loaded spaCy pipeline of :func:`model_name` (loaded once)."""
    name = model_name()
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
