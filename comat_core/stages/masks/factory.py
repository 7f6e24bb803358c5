"""Build the configured masks backend (``masks.backend``): the one module that knows every segmenter."""

from __future__ import annotations

import torch

from comat_core.errors import ConfigError
from comat_core.models.loader import load_grounding_dino
from comat_core.stages.masks.backends import GroundedSam, GroundingDinoDetector, MaskBackend
from comat_core.stages.masks.hf import load_hf_segmenter


def make_backend(cfg, device: torch.device, precision: torch.dtype) -> MaskBackend:
    """The configured backend (``masks.backend``), models loaded by name (Hub id, local path or tiny://)."""
    mcfg = cfg.masks
    if mcfg.backend == "shapes":  # the shapes world's judge: no detector, no SAM
        from comat_core.stages.masks.shapes import ShapesBackend

        return ShapesBackend()
    dino, processor = load_grounding_dino(cfg.models.grounding_dino, device=device, field="models.grounding_dino")
    detector = GroundingDinoDetector(dino, processor, box_threshold=mcfg.box_threshold,
                                     text_threshold=mcfg.text_threshold, max_boxes_per_noun=mcfg.max_boxes_per_noun,
                                     image_size=mcfg.detector_image_size, precision=precision)
    if mcfg.backend == "hf":
        segmenter = load_hf_segmenter(cfg.models.sam, device, precision)
    elif mcfg.backend == "gsam":
        from comat_core.stages.masks.gsam import load_gsam_segmenter  # the gsam extra, imported on use

        segmenter = load_gsam_segmenter(cfg.models.sam_model_type, cfg.models.sam_checkpoint, device, precision)
    else:  # pragma: no cover - the config validates the choice
        raise ConfigError(f"unknown masks.backend {mcfg.backend!r}; use hf, gsam or shapes")
    return GroundedSam(detector, segmenter)
