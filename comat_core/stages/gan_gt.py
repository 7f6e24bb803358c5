"""The ``gan_gt`` stage: ground-truth latents of every training prompt from the frozen base model.

The discriminator learns what the *original* model draws for the training prompts, so for every
prompt of the ``prompts`` artifact (all of them; the reference silently stopped at 10,000) the frozen
base model (or, for SDXL, the 512-px pre-finetuned UNet) samples one latent: DDPM built from the
model's own scheduler config, ``num_inference_steps`` steps, classifier-free guidance
``guidance_scale``, ``resolution`` px. The sampler is the trainer's own
(``comat_core.method.sampler.DifferentiableSampler`` with a no-grad plan) under the trainer's
precision (``runtime.mixed_precision``: the frozen weights in its dtype, under its autocast), so the
image the masks describe and the image the trainer replays come from one DDPM implementation, not a
diffusers pipeline beside it. Latents are stored in the *scaled* latent space, exactly what the UNet
(and so the trainer's discriminator) sees.

Samples: ``gan_gt.samples_per_prompt`` (N, default 1) samples per prompt, sample k of prompt p with
the seed :func:`sample_seed` (a hash of ``gan_gt.seed``, p and k; sample 0's is the historical
per-prompt seed), so seeds do not depend on prompt order or batch. Each sample gets its own CPU
``torch.Generator``: the initial noise *and* every DDPM variance noise of sample i come from
generator i (``models.generation.SeededNoise``, the layout defined there once). A shard therefore
regenerates bit-identically on the same hardware and software, and the trainer (``train.noise:
replay``) replays a sample's draws from its stored seed: the latent is what the model at the LoRA's
initial state draws, and the masks stage's masks describe it.

Layout (shards of ``shard_size`` prompts, each committed with its own manifest, so a crash costs
one shard and a rerun generates only the missing or corrupted ones):

* ``latents-NNNNN.safetensors``: tensor ``latents`` ``[N, 4, h, w]`` float32. fp32 because it is
  lossless whatever precision generated it (fp32, bf16 or fp16 all embed exactly in fp32), so the
  stored latent *is* the model's output; it costs 64 KiB per 512-px latent (1.3 GB for the 19.9 k
  CoMat prompts), small beside the models, and the trainer casts it to its own dtype.
* ``index-NNNNN.parquet``: ``prompt_id``, ``sample`` (0..N-1), ``seed``, ``row`` (the row in that
  shard's tensor).
* ``preview.png``: a grid of the first ``preview_images`` decoded latents, for the UI.

``GanGtReader`` gives the trainer and the ``masks`` stage latents and seeds by (prompt id, sample).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass

import pyarrow as pa
import torch

from comat_core.errors import InputError, IntegrityError
from comat_core.stages.prompts import read_prompts
from comat_core.store.shards import check_fail_hook, part_summary, shard_bar, shards_to_do

log = logging.getLogger("comat.gan_gt")

INDEX_SCHEMA = pa.schema([("prompt_id", pa.string()), ("sample", pa.int32()), ("seed", pa.int64()),
                          ("row", pa.int32())])
PREVIEW = "preview.png"


def shard_name(n: int) -> str:
    return f"shard-{n:05d}"


def latents_file(n: int) -> str:
    return f"latents-{n:05d}.safetensors"


def index_file(n: int) -> str:
    return f"index-{n:05d}.parquet"


def prompt_seed(global_seed: int, prompt_id: str) -> int:
    """The seed of a prompt's first sample: a hash of the stage seed and the prompt id (order-independent)."""
    digest = hashlib.sha256(f"gan_gt:{global_seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


def sample_seed(global_seed: int, prompt_id: str, sample: int) -> int:
    """The seed of sample ``sample`` of a prompt (sample 0: :func:`prompt_seed`)."""
    if sample == 0:
        return prompt_seed(global_seed, prompt_id)
    digest = hashlib.sha256(f"gan_gt:{global_seed}:{prompt_id}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


# ----------------------------------------------------------------------------------------------
# Models


def config_vae(cfg, dtype: torch.dtype, device: torch.device):
    """The VAE that decodes this config's latents: ``models.vae`` when set, else the base model's ``vae/``."""
    from comat_core.models.loader import load_vae

    if cfg.models.vae:
        return load_vae(cfg.models.vae, dtype, device, field="models.vae")
    return load_vae(cfg.models.pretrained, dtype, device, field="models.pretrained", pipeline=True)


@dataclass
class BaseSampler:
    """The frozen base model behind the trainer's sampler, and the trainer's precision to run it in."""

    sampler: object  # comat_core.method.sampler.DifferentiableSampler
    precision: str  # the accelerate mixed-precision mode: "no", "fp16" or "bf16"

    @property
    def vae(self):
        return self.sampler.backbone.vae

    def autocast(self):
        """What accelerate's ``autocast`` does for the trainer's mode: ``torch.autocast`` in its dtype, or nothing."""
        from contextlib import nullcontext

        from comat_core.runtime import DTYPES

        if self.precision == "no":
            return nullcontext()
        return torch.autocast(self.sampler.backbone.device.type, dtype=DTYPES[self.precision])


def load_base_sampler(cfg, device: torch.device, unet_dir: str | None = None) -> BaseSampler:
    """The frozen base model (and the SDXL pre-finetuned UNet when given) behind the trainer's sampler,
    with the weights in the training dtype and gan_gt's steps, guidance and resolution."""
    from comat_core.method.sampler import DifferentiableSampler
    from comat_core.models.backbones import Backbone
    from comat_core.runtime import DTYPES, mixed_precision

    precision = mixed_precision(cfg, device)
    gcfg = cfg.gan_gt
    backbone = Backbone.load(cfg.models.pretrained, cfg.models.family, gcfg.resolution, dtype=DTYPES[precision],
                             device=device, vae=cfg.models.vae, unet_override=unet_dir)
    sampler = DifferentiableSampler(backbone, gcfg.num_inference_steps, gcfg.guidance_scale, grad_steps=1,
                                    attribute_steps=0, gradient_checkpointing=False)
    return BaseSampler(sampler, precision)


def load_stage_sampler(ctx, device: torch.device) -> BaseSampler:
    """The stage's :class:`BaseSampler` (with the SDXL pre-finetuned UNet when the stage has one)."""
    from comat_core.stages.prefinetune import prefinetuned_unet

    return load_base_sampler(ctx.cfg, device, unet_dir=prefinetuned_unet(ctx))


@torch.no_grad()
def generate_latents(base: BaseSampler, texts: list[str], seeds: list[int]) -> torch.Tensor:
    """One scaled latent per (text, seed): ``[B, 4, h, w]`` float32 on the CPU.

    Sample i's initial noise and DDPM noise come from its own CPU generator seeded with ``seeds[i]``;
    the prompts are encoded outside the autocast and sampled inside it, as the trainer does.
    """
    from comat_core.models.generation import SeededNoise

    sampler = base.sampler
    cond = sampler.backbone.encode_prompts(texts)
    with base.autocast():
        latents = sampler.sample(cond, sampler.no_grad_plan(), SeededNoise(seeds)).latents
    return latents.float().cpu()


# ----------------------------------------------------------------------------------------------
# The stage


class _Throughput:
    """Images generated and seconds spent generating them (not counting reused shards)."""

    def __init__(self):
        self.images, self.seconds = 0, 0.0

    @property
    def per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def run(ctx) -> dict:
    """Stage entry point (see comat_core.stages.registry)."""
    from comat_core.runtime import free_memory, resolve_device

    gcfg = ctx.cfg.gan_gt
    prompts = read_prompts(ctx.inputs["prompts"])
    if not prompts:
        raise InputError("the prompts stage holds no prompts; gan_gt has nothing to generate")
    work = [(p, k) for p in prompts for k in range(gcfg.samples_per_prompt)]
    shards = [work[i : i + gcfg.shard_size] for i in range(0, len(work), gcfg.shard_size)]
    names = [shard_name(n) for n in range(len(shards))]
    pending = shards_to_do(ctx, names)
    reused = len(shards) - len(pending)
    device = resolve_device(ctx.cfg)
    speed = _Throughput()
    base = None
    bar = shard_bar(len(work), len(work) - sum(len(shards[n]) for n in pending), "gan_gt")
    ctx.progress(bar.n, bar.total, f"{bar.n} images in committed shards")  # the baseline of the rate
    try:
        for n in pending:
            check_fail_hook(ctx, n)
            if base is None:
                base = load_stage_sampler(ctx, device)
            _generate_shard(ctx, base, n, shards[n], speed, bar)
    finally:
        bar.close()
    if ctx.shard_part is not None:  # a fan-out part: the preview and the manifest come with the last call
        del base
        free_memory()
        return part_summary(ctx, names, len(pending)) | {"images_generated": speed.images}
    vae = base.vae if base is not None else None
    del base  # keep only the VAE, for the preview
    first = _first_latents(ctx, shards, gcfg.preview_images)
    preview = _write_preview(ctx, vae, first, device)
    del vae
    free_memory()
    return {"prompts": len(prompts), "samples_per_prompt": gcfg.samples_per_prompt, "samples": len(work),
            "shards": len(shards), "shards_generated": len(pending),
            "shards_reused": reused, "images_generated": speed.images,
            "images_per_s": round(speed.per_second, 4), "latent_shape": list(first.shape[1:]),
            "latent_dtype": "float32", "preview": preview}


def _generate_shard(ctx, base, n: int, work: list[tuple[dict, int]], speed: _Throughput, bar) -> None:
    gcfg = ctx.cfg.gan_gt
    seeds = [sample_seed(gcfg.seed, p["prompt_id"], k) for p, k in work]
    prompts = [p for p, _ in work]
    chunks = []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), gcfg.batch_size):
        batch = prompts[i : i + gcfg.batch_size]
        t = time.perf_counter()
        chunks.append(generate_latents(base, [p["text"] for p in batch], seeds[i : i + len(batch)]))
        speed.images += len(batch)
        speed.seconds += time.perf_counter() - t
        bar.set_postfix(shard=n, refresh=False)
        bar.update(len(batch))
        ctx.progress(bar.n, bar.total, f"gan_gt: {speed.per_second:.2f} images/s")
    latents = torch.cat(chunks)
    rows = [{"prompt_id": p["prompt_id"], "sample": k, "seed": s, "row": r}
            for r, ((p, k), s) in enumerate(zip(work, seeds))]
    # one metadata key: safetensors writes metadata in hash-map order, so several keys change the bytes
    ctx.writer.put_tensors(latents_file(n), {"latents": latents}, metadata={"space": "scaled"})
    ctx.writer.put_table(index_file(n), pa.Table.from_pylist(rows, schema=INDEX_SCHEMA))
    seconds = time.perf_counter() - t0
    ctx.writer.commit_shard(shard_name(n), [latents_file(n), index_file(n)],
                            {"prompts": len(prompts), "seconds": round(seconds, 3),
                             "images_per_s": round(len(prompts) / seconds, 4) if seconds > 0 else None})


def _first_latents(ctx, shards: list[list], count: int) -> torch.Tensor:
    """The first ``count`` latents (at least one), read from the committed shards (verified by ``shard_done``)."""
    from safetensors.torch import load

    chunks, have = [], 0
    for n in range(len(shards)):
        chunks.append(load(ctx.store.read_bytes(ctx.writer.path(latents_file(n))))["latents"])
        have += len(chunks[-1])
        if have >= max(count, 1):
            break
    return torch.cat(chunks)[: max(count, 1)]


def _write_preview(ctx, vae, latents: torch.Tensor, device) -> str | None:
    """``preview.png``: the first ``preview_images`` latents decoded, in one grid."""
    if ctx.cfg.gan_gt.preview_images == 0:
        return None
    from comat_core.models.backbones import decode_latents
    from comat_core.runtime import weight_dtype

    if vae is None:
        vae = config_vae(ctx.cfg, weight_dtype(ctx.cfg, device), device)
    with torch.no_grad():
        ctx.writer.put_image(PREVIEW, image_grid(decode_latents(vae, latents, clamp=True)))
    return PREVIEW


def image_grid(images: torch.Tensor):
    """``[B, 3, H, W]`` in [0, 1] → one PIL image, ``ceil(sqrt(B))`` columns."""
    from PIL import Image

    b, _, h, w = images.shape
    cols = math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = torch.zeros(3, rows * h, cols * w)
    for i, img in enumerate(images.cpu()):
        r, c = divmod(i, cols)
        grid[:, r * h : (r + 1) * h, c * w : (c + 1) * w] = img
    array = (grid.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype("uint8")
    return Image.fromarray(array)


# ----------------------------------------------------------------------------------------------
# Reader


class GanGtReader:
    """Ground-truth latents and seeds of a completed ``gan_gt`` stage, by (prompt id, sample).

    The index (every shard's ``index-*.parquet``) is read once; ``latents`` reads only the shards it
    needs and keeps the last ``max_cached_shards`` of them in memory (every read is sha256-verified
    against the manifest by the ``StageReader``).
    """

    def __init__(self, stage_reader, max_cached_shards: int | None = 16):
        self.reader = stage_reader
        self.max_cached_shards = max_cached_shards
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._index = self._read_index()
        columns = [self._index[c].to_pylist() for c in ("prompt_id", "sample", "shard", "row", "seed")]
        self._where = {(pid, k): (shard, row) for pid, k, shard, row, _ in zip(*columns)}
        self._seed = {(pid, k): seed for pid, k, _, _, seed in zip(*columns)}
        self._samples: dict[str, list[int]] = {}
        for pid, k in sorted(self._where, key=lambda key: key[1]):
            self._samples.setdefault(pid, []).append(k)

    def _read_index(self) -> pa.Table:
        tables = []
        for rel in self.reader.list(prefix="index-", suffix=".parquet"):
            shard = int(rel[len("index-") : -len(".parquet")])
            table = self.reader.read_table(rel)
            tables.append(table.append_column("shard", pa.array([shard] * table.num_rows, pa.int32())))
        if not tables:
            return pa.table({"prompt_id": pa.array([], pa.string()), "sample": pa.array([], pa.int32()),
                             "seed": pa.array([], pa.int64()), "row": pa.array([], pa.int32()),
                             "shard": pa.array([], pa.int32())})
        return pa.concat_tables(tables)

    def index(self) -> pa.Table:
        """Every stored latent: ``prompt_id``, ``sample``, ``seed``, ``row``, ``shard``."""
        return self._index

    def prompt_ids(self) -> list[str]:
        """Each prompt that has a latent, once, in stored order."""
        return list(self._samples)

    def samples(self, prompt_id: str) -> list[int]:
        """The sample indices stored for a prompt (``0 .. samples_per_prompt - 1``)."""
        return self._samples.get(prompt_id, [])

    def __contains__(self, prompt_id: str) -> bool:
        return prompt_id in self._samples

    def _keys(self, prompt_ids: list[str], samples: list[int] | None) -> list[tuple[str, int]]:
        keys = list(zip(prompt_ids, samples if samples is not None else [0] * len(prompt_ids)))
        missing = [k for k in keys if k not in self._where]
        if missing:
            raise InputError(f"gan_gt at {self.reader.url} has no latent for (prompt id, sample) {missing[:3]}; "
                             "rerun gan_gt on the current prompts")
        return keys

    def seeds(self, prompt_ids: list[str], samples: list[int] | None = None) -> list[int]:
        """The seed each sample was drawn with (``sample_seed``), to replay its noise."""
        return [self._seed[k] for k in self._keys(prompt_ids, samples)]

    def latents(self, prompt_ids: list[str], samples: list[int] | None = None) -> torch.Tensor:
        """``[N, 4, h, w]`` float32 scaled latents of (prompt id, sample) (sample 0 when not given), in order."""
        return torch.stack([self._shard(self._where[k][0])[self._where[k][1]] for k in self._keys(prompt_ids, samples)])

    def _shard(self, shard: int) -> torch.Tensor:
        if shard in self._cache:
            self._cache.move_to_end(shard)
            return self._cache[shard]
        tensors = self.reader.read_tensors(latents_file(shard))
        if "latents" not in tensors:
            raise IntegrityError(f"{self.reader.url}: {latents_file(shard)} has no 'latents' tensor; rerun gan_gt")
        self._cache[shard] = tensors["latents"]
        if self.max_cached_shards is not None:
            while len(self._cache) > self.max_cached_shards:
                self._cache.popitem(last=False)
        return self._cache[shard]
