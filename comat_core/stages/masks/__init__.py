"""Entity masks for attribute concentration (docs/method.md §4), computed once, offline, by the ``masks`` stage.

Modules: ``stage`` (the stage function ``run(ctx)``), ``backends`` (the ``MaskBackend`` interface,
Grounding DINO detection, the backend factory), ``hf`` and ``gsam`` (the two SAM segmenters),
``encoding`` (bit-packed / run-length mask bytes) and ``reader`` (``MaskReader`` and ``EntityMask``
for the trainer). Importing this package loads no model and no torch-heavy module.
"""

from comat_core.stages.masks.encoding import ENCODINGS, decode_mask, encode_mask

__all__ = ["ENCODINGS", "decode_mask", "encode_mask"]
