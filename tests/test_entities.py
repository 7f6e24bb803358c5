"""Entity extraction (offline parser, spaCy mapping) and token alignment for the attribute-concentration loss."""

from __future__ import annotations

import json

import pytest

from comat_core.stages.entities import entities_from_records, entities_to_records
from comat_core.text import Entity, align_spans_to_tokens, extract_entities, resolve_parser
from comat_core.text.spacy_parser import entities_from_doc
from comat_core.errors import ConfigError, InputError


def at(prompt: str, word: str, nth: int = 0) -> tuple[int, int]:
    """Character span of the ``nth`` whole-word occurrence of ``word`` in ``prompt``."""
    start = -1
    for _ in range(nth + 1):
        start = prompt.index(word, start + 1)
    return start, start + len(word)


def ent(prompt: str, noun: str, attrs: list[str], nth: int = 0) -> Entity:
    """The expected entity: ``noun`` with attribute words ``attrs`` (each its first occurrence)."""
    noun_span = at(prompt, noun, nth)
    spans = tuple(sorted(at(prompt, a) for a in attrs))
    lo = min([noun_span[0]] + [s for s, _ in spans])
    hi = max([noun_span[1]] + [e for _, e in spans])
    return Entity(noun.lower(), noun_span, spans, (lo, hi))


def offline(prompt: str, **kwargs) -> list[Entity]:
    return extract_entities(prompt, parser="offline", **kwargs)


# ----------------------------------------------------------------------------------------------
# Offline parser: templates of the training and evaluation prompts


def test_two_coloured_objects_exact_spans():
    prompt = "a red cube and a blue sphere"
    assert offline(prompt) == [
        Entity("cube", (6, 10), ((2, 5),), (2, 10)),
        Entity("sphere", (22, 28), ((17, 21),), (17, 28)),
    ]


@pytest.mark.parametrize("prompt, expected", [
    ("two green apples on the left of a wooden table",
     [("apples", ["green"]), ("table", ["wooden"])]),
    ("The fluffy cat is on the left of the soft pillow.",
     [("cat", ["fluffy"]), ("pillow", ["soft"])]),
    ("a metallic car next to a leather sofa",
     [("car", ["metallic"]), ("sofa", ["leather"])]),
    ("a big brown dog with a small white cat",
     [("dog", ["big", "brown"]), ("cat", ["small", "white"])]),
    ("a round bagel, a square plate and a triangular slice of cheese",
     [("bagel", ["round"]), ("plate", ["square"]), ("slice", ["triangular"])]),
    ("a spherical ball on top of a cylindrical box",
     [("ball", ["spherical"]), ("box", ["cylindrical"])]),
    ("a tiny mouse under a huge chair", [("mouse", ["tiny"]), ("chair", ["huge"])]),
    ("a black and white dog has a red collar", [("dog", ["black", "white"]), ("collar", ["red"])]),
    ("a very tall tree near a light blue house",
     [("tree", ["very", "tall"]), ("house", ["light", "blue"])]),
    ("The smooth, white marble columns of the ancient temple",
     [("columns", ["smooth", "white", "marble"]), ("temple", ["ancient"])]),
])
def test_templates(prompt, expected):
    assert offline(prompt) == [ent(prompt, noun, attrs) for noun, attrs in expected]


def test_compound_noun_is_an_attribute_of_the_head():
    prompt = "a red coffee mug"
    assert offline(prompt) == [ent(prompt, "mug", ["red", "coffee"])]
    # alone, the compound still makes the noun phrase carry an attribute
    assert offline("a coffee mug") == [ent("a coffee mug", "mug", ["coffee"])]


def test_predicative_adjectives_follow_the_noun():
    prompt = "the cat is fluffy"
    (cat,) = offline(prompt)
    assert cat == Entity("cat", (4, 7), ((11, 17),), (4, 17))
    prompt = "The car is shiny and red and the bike is blue."
    assert offline(prompt) == [ent(prompt, "car", ["shiny", "red"]), ent(prompt, "bike", ["blue"])]
    prompt = "a dog that is very fluffy"
    assert offline(prompt) == [ent(prompt, "dog", ["very", "fluffy"])]


def test_comparisons_and_noun_complements_are_not_predicates():
    assert offline("The horse is smaller than the chair") == []
    assert offline("The horse is bigger than the dog") == []
    prompt = "the cat on the mat is fluffy"     # the subject is not the noun before "is": skip
    assert offline(prompt) == []
    prompt = "the cat is a fluffy animal"
    assert offline(prompt) == [ent(prompt, "animal", ["fluffy"])]


def test_made_of_material_is_an_attribute_of_the_object():
    prompt = "a vase made of glass"
    assert offline(prompt) == [ent(prompt, "vase", ["glass"])]
    prompt = "The table is made of red bricks."
    assert offline(prompt) == [ent(prompt, "table", ["red", "bricks"])]


def test_multiword_object_names_are_one_noun():
    prompt = "A brown teddy bear next to a red fire hydrant"
    bear, hydrant = offline(prompt)
    assert bear.noun == "teddy bear" and bear.noun_span == (8, 18)
    assert [prompt[s:e] for s, e in bear.attribute_spans] == ["brown"]
    assert hydrant.noun == "fire hydrant" and [prompt[s:e] for s, e in hydrant.attribute_spans] == ["red"]
    assert offline("a teddy bear") == []                  # no attribute once the name is whole


@pytest.mark.parametrize("prompt", [
    "a cat on the left of a dog",
    "a person and a horse near a banana.",
    "A man is holding a book and reading in the garden",
    "The horse is smaller than the chair",
    "",
])
def test_nouns_without_attributes_are_left_out(prompt):
    assert offline(prompt) == []


def test_require_attribute_false_keeps_bare_nouns():
    prompt = "a cat on the left of a red dog"
    assert offline(prompt, require_attribute=False) == [ent(prompt, "cat", []), ent(prompt, "dog", ["red"])]


@pytest.mark.parametrize("prompt, nouns", [
    ("The heavy rain fell on the smooth pavement", ["rain", "pavement"]),     # "fell" is a verb, not a head
    ("The fluffy cat stands on a soft rug", ["cat", "rug"]),                  # "stands" is a verb
    ("two brown dogs walk past a tall tree", ["dogs", "tree"]),               # no compound after a plural
    ("the man's red hat", ["hat"]),                                           # possessor dropped
    ("two people, both wearing ties", []),                                    # participle after "both": a verb
])
def test_verbs_are_not_heads_or_attributes(prompt, nouns):
    assert [e.noun for e in offline(prompt)] == nouns


def test_participles_and_suffix_adjectives_only_before_a_noun():
    prompt = "a striped shirt and a sleeping puppy"
    assert offline(prompt) == [ent(prompt, "shirt", ["striped"]), ent(prompt, "puppy", ["sleeping"])]
    assert offline("a man sleeping") == []
    assert offline("the dog parked") == []


def test_spans_index_the_original_text():
    prompt = "  A  RED   Cube\tand a blue SPHERE café "
    found = offline(prompt)
    assert [e.noun for e in found] == ["cube", "sphere"]
    for e in found:
        assert prompt[e.noun_span[0]:e.noun_span[1]].lower() == e.noun
        assert all(e.phrase_span[0] <= s < t <= e.phrase_span[1] for s, t in e.attribute_spans)


def test_non_string_prompt_is_an_input_error():
    with pytest.raises(InputError):
        extract_entities(None, parser="offline")
    with pytest.raises(ConfigError):
        extract_entities("a red cube", parser="nltk")


# ----------------------------------------------------------------------------------------------
# Records


def test_records_round_trip_through_json():
    prompt = "the cat is fluffy and a red coffee mug made of glass"
    found = offline(prompt, require_attribute=False)
    records = entities_to_records(found)
    assert all(isinstance(r["noun_span"], list) and all(isinstance(x, int) for x in r["noun_span"])
               for r in records)
    assert entities_from_records(json.loads(json.dumps(records))) == found


def test_records_round_trip_through_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    found = offline("a big brown dog with a small white cat")
    pq.write_table(pa.Table.from_pylist([{"entities": entities_to_records(found)}]), tmp_path / "e.parquet")
    back = pq.read_table(tmp_path / "e.parquet").to_pylist()[0]["entities"]
    assert entities_from_records(back) == found


@pytest.mark.parametrize("bad", [[{"noun": "cat"}], [{"noun": "cat", "noun_span": [5, 2],
                                                      "attribute_spans": [], "phrase_span": [0, 5]}]])
def test_malformed_records_are_input_errors(bad):
    with pytest.raises(InputError):
        entities_from_records(bad)


# ----------------------------------------------------------------------------------------------
# Token alignment with a CLIP-style fast tokenizer built in memory


@pytest.fixture(scope="module")
def clip_tokenizer():
    from transformers import CLIPTokenizer

    from comat_core.models.tiny import _byte_alphabet

    alphabet = _byte_alphabet()
    # "red" and "cube" are single tokens; every other word splits into one token per letter
    merges = [("r", "e"), ("re", "d</w>"), ("c", "u"), ("cu", "b"), ("cub", "e</w>")]
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    assert tok.is_fast
    return tok


def test_alignment_counts_bos_and_covers_multi_token_words(clip_tokenizer):
    prompt = "a red cube and a blue sphere"
    cube, sphere = offline(prompt)
    # ids: 0 BOS, 1 "a", 2 "red", 3 "cube", 4-6 "a n d", 7 "a", 8-11 "b l u e", 12-17 "s p h e r e", 18 EOS
    assert align_spans_to_tokens(clip_tokenizer, prompt, [cube.noun_span, *cube.attribute_spans]) == [[3], [2]]
    assert align_spans_to_tokens(clip_tokenizer, prompt, [sphere.noun_span, *sphere.attribute_spans]) == [
        list(range(12, 18)), [8, 9, 10, 11]]
    assert align_spans_to_tokens(clip_tokenizer, prompt, [sphere.phrase_span]) == [list(range(8, 18))]


def test_alignment_of_spans_past_truncation_is_empty(clip_tokenizer):
    prompt = "a red cube and a blue sphere"
    cube, sphere = offline(prompt)
    # max_length 7 keeps BOS, 5 text tokens ("a red cube a n") and EOS: "and" loses its "d"
    spans = [cube.noun_span, sphere.noun_span, at(prompt, "and")]
    assert align_spans_to_tokens(clip_tokenizer, prompt, spans, max_length=7) == [[3], [], [4, 5]]
    assert align_spans_to_tokens(clip_tokenizer, prompt, spans) == [[3], list(range(12, 18)), [4, 5, 6]]


def test_alignment_needs_a_fast_tokenizer():
    class Slow:
        is_fast = False

    with pytest.raises(ConfigError):
        align_spans_to_tokens(Slow(), "a red cube", [(2, 5)])


# ----------------------------------------------------------------------------------------------
# spaCy path: the dependency mapping, on hand-built parses (no model download); skipped without spaCy


def _doc(words, spaces, pos, deps, heads):
    spacy = pytest.importorskip("spacy")
    from spacy.tokens import Doc
    from spacy.vocab import Vocab

    lemmas = [{"is": "be", "made": "make"}.get(w.lower(), w.lower()) for w in words]
    return Doc(Vocab(), words=words, spaces=spaces, pos=pos, deps=deps, heads=heads, lemmas=lemmas)


def test_spacy_mapping_amod_conj_compound():
    # "a red and white coffee mug"
    doc = _doc(["a", "red", "and", "white", "coffee", "mug"], [True] * 5 + [False],
               ["DET", "ADJ", "CCONJ", "ADJ", "NOUN", "NOUN"], ["det", "amod", "cc", "conj", "compound", "ROOT"],
               [5, 5, 1, 1, 5, 5])
    prompt = doc.text
    assert entities_from_doc(doc) == [ent(prompt, "mug", ["red", "white", "coffee"])]


def test_spacy_mapping_predicate_and_made_of():
    # "the cat is fluffy"
    doc = _doc(["the", "cat", "is", "fluffy"], [True, True, True, False], ["DET", "NOUN", "AUX", "ADJ"],
               ["det", "nsubj", "ROOT", "acomp"], [1, 2, 2, 2])
    assert entities_from_doc(doc) == [ent(doc.text, "cat", ["fluffy"])]
    # "a vase made of glass"
    doc = _doc(["a", "vase", "made", "of", "glass"], [True] * 4 + [False],
               ["DET", "NOUN", "VERB", "ADP", "NOUN"], ["det", "ROOT", "acl", "prep", "pobj"], [1, 1, 1, 2, 3])
    vase = [e for e in entities_from_doc(doc) if e.noun == "vase"]
    assert vase == [ent(doc.text, "vase", ["glass"])]


def test_spacy_parser_without_a_model_is_a_config_error():
    from comat_core.text import spacy_parser

    if spacy_parser.model_name() is not None:
        pytest.skip("a spaCy model is installed")
    assert resolve_parser("auto") == "offline"
    with pytest.raises(ConfigError):
        extract_entities("a red cube", parser="spacy")
