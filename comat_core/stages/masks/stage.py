"""The ``masks`` stage: entity masks computed once, offline, on the ground-truth images.

For each prompt with entities: drop the entities whose noun is a background noun
(``masks.background_nouns``) or occurs more than once among the prompt's nouns
(``masks.drop_repeated_nouns``), as the reference does; decode the prompt's ``gan_gt`` latent with
the VAE (batched, on the device); run the configured ``MaskBackend`` (Grounding DINO on the kept
nouns, SAM on each kept box, masks of one noun OR-ed); store one row per kept entity. With
``gan_gt.samples_per_prompt`` N > 1 every sample of a prompt is masked on its own image (the rows
carry the ``sample`` index): the trainer supervises a sample with the masks of its own image.

Layout (shards of ``masks.shard_size`` prompts that have kept entities, committed one by one like
``gan_gt``, so a rerun computes only missing or corrupted shards):

* ``masks-NNNNN.parquet``: ``prompt_id``, ``sample``, ``entity_index`` (into the prompt's ``entities``),
  ``noun``, ``detected``, ``boxes`` (``[[x0, y0, x1, y1], ...]`` in pixels of the decoded image),
  ``scores``, ``mask`` (bytes, see ``encoding.py``; NULL when not detected), ``mask_resolution``
  (the stored mask is ``mask_resolution``² pixels: ``masks.resolution``, default the image
  resolution) and ``encoding`` (``bitpack`` or ``rle``).
* ``index-NNNNN.parquet``: the shard's (``prompt_id``, ``sample``) pairs, so the reader opens only the
  shards it needs.
* ``overlay.png``: a preview, a few images with their masks overlaid and labelled (``preview.py``).

An entity that is not detected (no box over the thresholds, or SAM's masks empty) is stored with
``detected=False`` and no mask — never as an all-zero mask that the trainer would supervise.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import numpy as np
import pyarrow as pa

from comat_core.errors import InputError
from comat_core.stages.prompts import read_prompts
from comat_core.store.shards import check_fail_hook, part_summary, shard_bar, shards_to_do
from comat_core.stages.masks.encoding import encode_mask
from comat_core.stages.masks.reader import resize_mask_area_majority

log = logging.getLogger("comat.masks")

ROW_SCHEMA = pa.schema([
    ("prompt_id", pa.string()),
    ("sample", pa.int32()),
    ("entity_index", pa.int32()),
    ("noun", pa.string()),
    ("detected", pa.bool_()),
    ("boxes", pa.list_(pa.list_(pa.float32(), 4))),
    ("scores", pa.list_(pa.float32())),
    ("mask", pa.binary()),
    ("mask_resolution", pa.int32()),
    ("encoding", pa.string()),
])
INDEX_SCHEMA = pa.schema([("prompt_id", pa.string()), ("sample", pa.int32()), ("entities", pa.int32())])


def shard_name(n: int) -> str:
    return f"shard-{n:05d}"


def masks_file(n: int) -> str:
    return f"masks-{n:05d}.parquet"


def index_file(n: int) -> str:
    return f"index-{n:05d}.parquet"


def noun_key(noun: str) -> str:
    return " ".join(noun.lower().split())


def kept_entities(entities: list[dict] | None, mcfg) -> tuple[list[tuple[int, str]], Counter]:
    """``[(entity_index, noun)]`` of the entities to mask, and why the others were dropped."""
    nouns = [noun_key(e["noun"]) for e in entities or []]
    counts = Counter(nouns)
    background = {noun_key(n) for n in mcfg.background_nouns}
    kept, dropped = [], Counter()
    for i, (entity, noun) in enumerate(zip(entities or [], nouns)):
        if is_background(noun, background):
            dropped["background"] += 1
        elif mcfg.drop_repeated_nouns and counts[noun] > 1:
            dropped["repeated"] += 1
        else:
            kept.append((i, entity["noun"]))
    return kept, dropped


def is_background(noun: str, background: set[str]) -> bool:
    """A listed background noun or its plural: the noun, or the noun without a final "s" (the reference's ``n[:-1]``)."""
    return noun in background or (noun.endswith("s") and noun[:-1] in background)


def caption_nouns(kept: list[tuple[int, str]]) -> list[str]:
    """The distinct nouns to detect, in prompt order (entities sharing a noun share its result)."""
    return list(dict.fromkeys(noun_key(noun) for _, noun in kept))


# ----------------------------------------------------------------------------------------------
# The stage


class _Tally:
    def __init__(self):
        self.images = self.entities = self.detected = 0
        self.seconds = 0.0


def run(ctx) -> dict:
    """Stage entry point (see comat_core.stages.registry)."""
    from comat_core.stages.gan_gt import GanGtReader

    mcfg = ctx.cfg.masks
    prompts = read_prompts(ctx.inputs["prompts"])
    work, dropped, without = [], Counter(), 0
    for p in prompts:
        kept, why = kept_entities(p["entities"], mcfg)
        dropped += why
        without += not p["entities"]
        if kept:
            work.append((p, kept))
    gt = GanGtReader(ctx.inputs["gan_gt"])
    missing = [p["prompt_id"] for p, _ in work if p["prompt_id"] not in gt]
    if missing:
        raise InputError(f"gan_gt has no latent for {len(missing)} prompt(s) (e.g. {missing[0]}); rerun gan_gt")
    work = [(p, kept, k) for p, kept in work for k in gt.samples(p["prompt_id"])]  # each sample's own image
    shards = [work[i : i + mcfg.shard_size] for i in range(0, len(work), mcfg.shard_size)]
    names = [shard_name(n) for n in range(len(shards))]
    pending = shards_to_do(ctx, names)
    tally = _compute_shards(ctx, gt, shards, pending)
    if ctx.shard_part is not None:  # a fan-out part: the summary and the manifest come with the last call
        return part_summary(ctx, names, len(pending)) | {"images": tally.images}
    metas = [ctx.writer.shard_meta(shard_name(n))["meta"] for n in range(len(shards))]
    resolutions = sorted({m["mask_resolution"] for m in metas})
    preview = _write_preview(ctx, gt) if shards else None
    return {
        "preview": preview,
        "prompts": len(prompts), "prompts_without_entities": without,
        "prompts_masked": len({p["prompt_id"] for p, _, _ in work}), "samples_masked": len(work),
        "entities_kept": sum(m["entities"] for m in metas), "entities_detected": sum(m["detected"] for m in metas),
        "entities_dropped_background": dropped["background"], "entities_dropped_repeated": dropped["repeated"],
        "shards": len(shards), "shards_generated": len(pending), "shards_reused": len(shards) - len(pending),
        "mask_resolution": resolutions[0] if len(resolutions) == 1 else resolutions or None,
        "encoding": mcfg.encoding, "backend": mcfg.backend,
        "images_per_s": round(tally.images / tally.seconds, 4) if tally.seconds else 0.0,
        "masks_per_s": round(tally.detected / tally.seconds, 4) if tally.seconds else 0.0,
    }


def _write_preview(ctx, gt) -> str | None:
    """``overlay.png``: the first shard's images with their masks (``preview.py``), decoded with the VAE."""
    from torch import no_grad

    from comat_core.models.backbones import decode_latents
    from comat_core.runtime import free_memory, resolve_device, weight_dtype
    from comat_core.stages.gan_gt import config_vae
    from comat_core.stages.masks.preview import write_overlay

    device = resolve_device(ctx.cfg)
    vae = config_vae(ctx.cfg, weight_dtype(ctx.cfg, device), device)
    try:
        with no_grad():
            return write_overlay(ctx, gt, lambda images: decode_latents(
                vae, gt.latents([p for p, _ in images], [k for _, k in images]), clamp=True), masks_file(0))
    finally:
        del vae
        free_memory()


def _compute_shards(ctx, gt, shards: list[list], pending: list[int]) -> _Tally:
    from comat_core.stages.gan_gt import config_vae
    from comat_core.runtime import free_memory, resolve_device, weight_dtype
    from comat_core.stages.masks.factory import make_backend

    tally = _Tally()
    if not pending:
        return tally
    device = resolve_device(ctx.cfg)
    precision = weight_dtype(ctx.cfg, device)
    models = None
    total = sum(len(s) for s in shards)
    bar = shard_bar(total, total - sum(len(shards[n]) for n in pending), "masks")
    ctx.progress(bar.n, bar.total, f"{bar.n} images in committed shards")  # the baseline of the rate
    try:
        for n in pending:
            check_fail_hook(ctx, n)
            if models is None:
                models = (config_vae(ctx.cfg, precision, device), make_backend(ctx.cfg, device, precision))
            _compute_shard(ctx, gt, models, n, shards[n], tally, bar)
    finally:
        bar.close()
        del models
        free_memory()
    return tally


def _compute_shard(ctx, gt, models, n: int, work: list, tally: _Tally, bar) -> None:
    import torch

    from comat_core.models.backbones import decode_latents

    mcfg = ctx.cfg.masks
    vae, backend = models
    rows, resolution, t0 = [], None, time.perf_counter()
    for i in range(0, len(work), mcfg.batch_size):
        batch = work[i : i + mcfg.batch_size]
        t = time.perf_counter()
        with torch.no_grad():
            images = decode_latents(vae, gt.latents([p["prompt_id"] for p, _, _ in batch], [k for _, _, k in batch]),
                                    clamp=True)
        resolution = mcfg.resolution or images.shape[-1]
        results = backend.detect_and_segment(images, [caption_nouns(kept) for _, kept, _ in batch])
        for (prompt, kept, sample), found in zip(batch, results):
            rows += entity_rows(prompt["prompt_id"], kept, found, resolution, mcfg.encoding, sample)
        tally.seconds += time.perf_counter() - t
        tally.images += len(batch)
        bar.set_postfix(shard=n, refresh=False)
        bar.update(len(batch))
        ctx.progress(bar.n, bar.total, f"masks: {bar.n}/{bar.total} images")
    detected = sum(r["detected"] for r in rows)
    tally.entities += len(rows)
    tally.detected += detected
    index = [{"prompt_id": p["prompt_id"], "sample": k, "entities": len(kept)} for p, kept, k in work]
    ctx.writer.put_table(masks_file(n), pa.Table.from_pylist(rows, schema=ROW_SCHEMA))
    ctx.writer.put_table(index_file(n), pa.Table.from_pylist(index, schema=INDEX_SCHEMA))
    ctx.writer.commit_shard(shard_name(n), [masks_file(n), index_file(n)], {
        "prompts": len(work), "entities": len(rows), "detected": detected, "mask_resolution": resolution,
        "seconds": round(time.perf_counter() - t0, 3)})


def entity_rows(prompt_id: str, kept: list[tuple[int, str]], found: dict, resolution: int,
                encoding: str, sample: int = 0) -> list[dict]:
    """One row per kept entity from the backend's per-noun result."""
    rows = []
    for entity_index, noun in kept:
        boxes, scores, mask = found[noun_key(noun)]
        if mask is not None:
            mask = resize_mask_area_majority(mask, resolution) > 0.5
        rows.append({
            "prompt_id": prompt_id, "sample": sample, "entity_index": entity_index, "noun": noun,
            "detected": mask is not None,
            "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4).tolist(),
            "scores": np.asarray(scores, dtype=np.float32).tolist(),
            "mask": encode_mask(mask.numpy(), encoding) if mask is not None else None,
            "mask_resolution": resolution, "encoding": encoding,
        })
    return rows
