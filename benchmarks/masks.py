"""Throughput of the ``masks`` stage: images and entity masks per second (a measurement, not a test).

Usage:
  python benchmarks/masks.py --preset tiny                                   # CPU smoke run, tiny zoo
  python benchmarks/masks.py --preset sd15 --size real --batch-size 16 --reps 5          # GPU, hf backend
  python benchmarks/masks.py --preset sd15 --size real --backend gsam --batch-size 16    # segment_anything SAM

Per batch it does what the stage does per batch, with the stage's own code: ``models.backbones.decode_latents``
(VAE decode of scaled latents, on the device, clamped) then ``MaskBackend.detect_and_segment`` (Grounding DINO
on the caption of ``--nouns`` nouns per image, SAM on the kept boxes, OR per noun). The latents are
random, so the images are noise; the thresholds default to 0, so that every noun keeps
``--boxes-per-noun`` boxes and SAM does the work real images would give it (the stage's thresholds
are 0.3 / 0.25).

``--size preset`` loads the preset's models by name (``make_backend``, ``config_vae``), as the stage
does. ``--size real`` builds random-init models at the real checkpoints' size in memory: Grounding
DINO base (Swin-B, BERT-base text, 900 queries, 4 levels, 800-px input), SAM ViT-H (1024 px; the
transformers ``SamModel`` for ``--backend hf``, ``segment_anything``'s ``vit_h`` for ``gsam``) and the
SD VAE at 512 px. Precision as in the stage: VAE weights in ``runtime.mixed_precision``'s dtype,
detector and SAM in fp32 under autocast on GPU.

Reported: seconds per batch for decode, detect+segment and both; images/s and masks/s (detected
nouns per second) of the whole; peak GPU memory. JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from generate import build_on, environment, real_vae, timed, write_json  # this folder's generate.py

from comat_core.config import load_config
from comat_core.models.backbones import decode_latents
from comat_core.stages.gan_gt import config_vae
from comat_core.stages.masks.backends import GroundedSam, GroundingDinoDetector
from comat_core.stages.masks.factory import make_backend
from comat_core.runtime import resolve_device, weight_dtype

NOUNS = ["apple", "car", "dog", "chair", "bench", "bowl", "cube", "sphere"]


def real_detector(device: torch.device, box_threshold: float, text_threshold: float, boxes_per_noun: int,
                  precision: torch.dtype) -> GroundingDinoDetector:
    """Grounding DINO base architecture (IDEA-Research/grounding-dino-base's config), random weights."""
    from transformers import (
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    from comat_core.models.tiny import build_bert_tokenizer

    swin = SwinConfig(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=12, image_size=384,
                      out_indices=[2, 3, 4], out_features=["stage2", "stage3", "stage4"])
    config = GroundingDinoConfig(backbone_config=swin, text_config=BertConfig(), num_queries=900, encoder_layers=6,
                                 decoder_layers=6, d_model=256, encoder_ffn_dim=2048, decoder_ffn_dim=2048,
                                 num_feature_levels=4, two_stage=True, max_text_len=256)
    model = build_on(device, GroundingDinoForObjectDetection, config)
    processor = GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(), tokenizer=build_bert_tokenizer())
    return GroundingDinoDetector(model, processor, box_threshold=box_threshold, text_threshold=text_threshold,
                                 max_boxes_per_noun=boxes_per_noun, precision=precision)


def real_segmenter(backend: str, device: torch.device, precision: torch.dtype):
    """SAM ViT-H architecture, random weights: transformers' ``SamModel`` (hf) or ``segment_anything`` (gsam)."""
    if backend == "gsam":
        from comat_core.stages.masks.gsam import SegmentAnythingSegmenter, sam_builders

        return SegmentAnythingSegmenter(build_on(device, sam_builders()["vit_h"]), precision)
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    from comat_core.stages.masks.hf import HfSamSegmenter

    vision = dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, global_attn_indexes=[7, 15, 23, 31],
                  mlp_dim=5120)
    model = build_on(device, SamModel, SamConfig(vision_config=vision))
    return HfSamSegmenter(model, SamProcessor(SamImageProcessor()), precision)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=["tiny", "tiny-sdxl", "sd15", "sdxl"])
    ap.add_argument("--size", default="preset", choices=["preset", "real"])
    ap.add_argument("--backend", default=None, choices=["hf", "gsam"], help="default: the preset's masks.backend")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the preset's masks.batch_size")
    ap.add_argument("--nouns", type=int, default=2, help="nouns per image (the caption)")
    ap.add_argument("--boxes-per-noun", type=int, default=2)
    ap.add_argument("--box-threshold", type=float, default=0.0)
    ap.add_argument("--text-threshold", type=float, default=0.0)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench-masks.json"))
    args = ap.parse_args(argv)

    overrides = [*args.set, f"masks.box_threshold={args.box_threshold}", f"masks.text_threshold={args.text_threshold}",
                 f"masks.max_boxes_per_noun={args.boxes_per_noun}"]
    if args.backend:
        overrides.append(f"masks.backend={args.backend}")
    if args.batch_size:
        overrides.append(f"masks.batch_size={args.batch_size}")
    cfg = load_config(args.preset, overrides=overrides)
    device = resolve_device(cfg)
    precision = weight_dtype(cfg, device)
    batch = cfg.masks.batch_size

    t = time.perf_counter()
    if args.size == "preset":
        vae, backend = config_vae(cfg, precision, device), make_backend(cfg, device, precision)
        latent_size = cfg.gan_gt.resolution // 8
    else:
        vae = real_vae(device, cfg.models.family).to(precision)
        backend = GroundedSam(real_detector(device, args.box_threshold, args.text_threshold, args.boxes_per_noun,
                                            precision), real_segmenter(cfg.masks.backend, device, precision))
        latent_size = 64
    load_s = time.perf_counter() - t

    latents = torch.randn(batch, 4, latent_size, latent_size, generator=torch.Generator().manual_seed(0))
    nouns = [[NOUNS[(i + k) % len(NOUNS)] for k in range(args.nouns)] for i in range(batch)]
    def decode(z):
        with torch.no_grad():  # as in the stage: no graph through the (here not frozen) VAE
            return decode_latents(vae, z, clamp=True)

    images = decode(latents)
    detected = []

    def both():
        results = backend.detect_and_segment(decode(latents), nouns)
        detected.append(sum(m is not None for r in results for _, _, m in r.values()))

    decode_s = timed(lambda: decode(latents), device, args.warmup, args.reps)
    segment = timed(lambda: backend.detect_and_segment(images, nouns), device, args.warmup, args.reps)
    total = timed(both, device, args.warmup, args.reps)
    masks_per_batch = detected[-1]
    result = {
        "benchmark": "masks", "preset": args.preset, "size": args.size, "backend": cfg.masks.backend,
        "device": str(device), "precision": str(precision).replace("torch.", ""), "batch_size": batch,
        "image_size": list(images.shape[-2:]), "nouns_per_image": args.nouns, "boxes_per_noun": args.boxes_per_noun,
        "thresholds": [args.box_threshold, args.text_threshold], "model_load_s": round(load_s, 2),
        "decode": decode_s, "detect_and_segment": segment, "total": total,
        "masks_per_batch": masks_per_batch,
        "images_per_s": round(batch / total["median_s"], 4),
        "masks_per_s": round(masks_per_batch / total["median_s"], 4),
        "env": environment(args),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "env"}, indent=1))
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
