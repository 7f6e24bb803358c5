"""Text as a library: the entities of a prompt for the attribute-concentration loss, and their tokens.

docs/method.md §4 supervises, for every noun phrase that carries attributes, the cross-attention of the
noun's tokens *and* of its attribute tokens (adjectives, compound nouns, adverbial modifiers) with the
noun's segmentation mask. This package finds those phrases as character spans (:class:`Entity`) and
maps spans to text-encoder token positions; the prompts stage runs it once per prompt and stores both.

Two parsers give the same :class:`Entity` structure (``parse.extract_entities`` picks one):

* ``offline`` (``offline.py``): a small rule-based chunker with the word lists in ``lexicons/``
  (colours, shapes, sizes, textures, materials, closed-class words; ``nouns.txt``,
  ``adjectives.txt``, ``verb_nouns.txt``), no downloaded model.
* ``spacy`` (``spacy_parser.py``): the reference's approach, the dependency parse of an installed
  spaCy pipeline.

Both merge two-word object names (``teddy bear``, ``hot dog``, the COCO categories) into one noun.
``align.py`` maps spans to token positions with a fast tokenizer's offsets.
"""

from comat_core.text.align import align_spans_to_tokens, entity_token_indices
from comat_core.text.entity import Entity, Span
from comat_core.text.parse import extract_entities, resolve_parser

__all__ = ["Entity", "Span", "align_spans_to_tokens", "entity_token_indices", "extract_entities", "resolve_parser"]
