"""Seconds per CoMat training step of the production trainer, at real model sizes with random weights.

Usage (from the repository root):
  python benchmarks/train_step.py --variants plain,merged,merged+compile,merged+compile+vaeckpt --steps 5
  python benchmarks/train_step.py --model sdxl --batch 6 --variants plain,merged+compile+vaeckpt --steps 3
  python benchmarks/train_step.py --preset tiny --device cpu --steps 1 --variants plain,merged   # CPU smoke run
  python benchmarks/train_step.py --count-merged      # parameters the merged no-grad copy stores (meta device)
  python benchmarks/train_step.py --memory-estimate   # bytes the VAE decode keeps for backward (meta device)

What it builds, once, with ``save_pretrained`` into ``--models`` (default
``<$COMAT_CACHE or ~/.cache/comat>/bench-models/<preset>``): the SD1.5 pipeline (UNet 860 M, SD
VAE, CLIP ViT-L/14 text encoder), for ``--model sdxl`` the SDXL base pipeline (UNet 2.6 B, CLIP
ViT-L + OpenCLIP bigG text encoders, SD VAE config with scaling 0.13025), and BLIP-large
captioning, all from configs in this file with random weights (nothing is downloaded; the CLIP/BERT
tokenizers are the tiny zoo's, which random weights do not care about).
The production config (``load_config("sd15" | "sdxl")``) is pointed at those folders
(``models.pretrained``, ``models.captioner``, ``models.discriminator`` = the SD1.5 folder) and the
timed call is the production ``comat_core.method.trainer.train_step`` on a ``build_training`` result: 50
DDPM steps, K = 5 gradient steps, CFG 7.5, concept activation, attribute concentration ON (two
entities per prompt with synthetic half-image masks, through the production ``TrainingData``), the
latent discriminator's G-side and D step, AdamW on the LoRAs (rank 128).

Variants (``--variants``, comma separated; tokens joined with ``+``): ``plain`` (every switch off),
``merged`` (``train.merge_lora_for_nograd``), ``compile`` (``train.compile_nograd_unet``, mode
reduce-overhead), ``compile_default`` / ``compile_autotune`` (the same with mode default /
max-autotune), ``vaeckpt`` (``train.vae_decode_checkpointing``), ``bN`` (batch N instead of
``--batch``). Each variant is built fresh from the same folders, runs one warm-up step (compilation
happens there; its time is reported), ``--steps`` timed steps (median; ``torch.cuda.synchronize``
around each step only), then one instrumented step whose phases are separated by synchronising
timers that wrap production objects from here (no timing code in the production modules). Every
variant runs the same seeds on the same data, so its losses are compared with the first variant's.
Peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps.

The reference-style step (a stand-alone script in the style of the CoMat reference code: fp16, plain
attention everywhere; not shipped with comat, pass its path with ``--reference-script`` or
``COMAT_REFERENCE_STEP``) runs in the same invocation as a subprocess, ``reference_step.py --phases A``
(``--model sdxl`` for SDXL, ``--tiny --device cpu`` for the tiny preset, where it is off unless ``--reference``: its fp16 variant A takes over
10 minutes on a 2-core CPU), and the ratio of its median to each variant's is printed.
Results go to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from comat_core.config import load_config  # noqa: E402
from comat_core.models.loader import cache_dir  # noqa: E402
from comat_core.runtime import free_memory  # noqa: E402

REFERENCE_SCRIPT = os.environ.get("COMAT_REFERENCE_STEP")  # the reference-style step script, if you have it
BUILD_VERSION = "1"  # bump when a config below changes: the model folders are rebuilt

# prompts with two entities each (noun and attribute character spans, as the prompts stage writes them)
PROMPTS = [
    ("a red cube and a blue sphere", [("cube", (6, 10), (2, 5)), ("sphere", (22, 28), (17, 21))]),
    ("a green apple and a yellow banana", [("apple", (8, 13), (2, 7)), ("banana", (27, 33), (20, 26))]),
    ("a black cat and a white dog", [("cat", (8, 11), (2, 7)), ("dog", (24, 27), (18, 23))]),
    ("a wooden table and a metallic chair", [("table", (9, 14), (2, 8)), ("chair", (30, 35), (21, 29))]),
]


# ----------------------------------------------------------------------------------------------
# Model configs (real sizes: the published SD1.5 / SDXL base / CLIP / BLIP-large configs)


def sd15_unet_config(tiny: bool) -> dict:
    cfg = dict(sample_size=64, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
               down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
               up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
               block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1,
               mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
               cross_attention_dim=768, attention_head_dim=8)
    if tiny:
        cfg.update(sample_size=8, block_out_channels=(32, 64, 64, 64), cross_attention_dim=32, attention_head_dim=4,
                   layers_per_block=1)
    return cfg


def sdxl_unet_config(tiny: bool, text_dims: tuple[int, int], pooled: int) -> dict:
    cfg = dict(sample_size=128, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
               block_out_channels=(320, 640, 1280), layers_per_block=2, downsample_padding=1,
               mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
               cross_attention_dim=sum(text_dims), transformer_layers_per_block=(1, 2, 10),
               attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
               addition_time_embed_dim=256, projection_class_embeddings_input_dim=6 * 256 + pooled)
    if tiny:
        cfg.update(sample_size=8, block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 1, 2),
                   attention_head_dim=(1, 2, 2), addition_time_embed_dim=8, layers_per_block=1,
                   projection_class_embeddings_input_dim=6 * 8 + pooled)
    return cfg


def vae_config(tiny: bool, scaling_factor: float) -> dict:
    cfg = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
               layers_per_block=2, act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512,
               scaling_factor=scaling_factor)
    if tiny:
        cfg.update(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64)
    return cfg


def clip_text_config(kind: str, tiny: bool, tokenizer):
    """CLIP ViT-L/14 (``L``, SD1.5 and SDXL's first encoder) or OpenCLIP ViT-bigG/14 (``G``) text encoder."""
    from transformers import CLIPTextConfig

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.eos_token_id, vocab_size=49408, max_position_embeddings=77)
    if tiny:
        return CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              projection_dim=32, hidden_act="quick_gelu", **ids)
    if kind == "L":
        return CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              projection_dim=768, hidden_act="quick_gelu", **ids)
    return CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                          projection_dim=1280, hidden_act="gelu", **ids)


def blip_config(tiny: bool, tokenizer):
    """BLIP-large captioning: ViT-L/16 at 384 px and a BERT-base text decoder."""
    from transformers import BlipConfig

    from comat_core.models.tiny import BLIP_DECODER_BOS

    text = dict(vocab_size=30524, hidden_size=768, encoder_hidden_size=1024, intermediate_size=3072,
                num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=512, layer_norm_eps=1e-12,
                bos_token_id=tokenizer.convert_tokens_to_ids(BLIP_DECODER_BOS), eos_token_id=tokenizer.sep_token_id,
                sep_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=384, patch_size=16, layer_norm_eps=1e-5, initializer_range=0.02)
    if tiny:
        text.update(hidden_size=32, encoder_hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2)
        vision.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=64, patch_size=8)
    return BlipConfig(text_config=text, vision_config=vision, projection_dim=32 if tiny else 512)


# ----------------------------------------------------------------------------------------------
# Building the model folders (once)


def _scheduler():
    from diffusers import DDPMScheduler

    from comat_core.models.tiny import SD_SCHEDULER

    return DDPMScheduler(**SD_SCHEDULER)


def _random(cls, config, device, dtype, **kwargs):
    """``cls`` with random weights, initialised on ``device`` (fast on a GPU), in ``dtype``."""
    with torch.device(device):
        model = cls(config, **kwargs) if not isinstance(config, dict) else cls(**config, **kwargs)
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def build_sd15(out: Path, tiny: bool, device: str, dtype: torch.dtype) -> None:
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from comat_core.models.tiny import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=_random(AutoencoderKL, vae_config(tiny, 0.18215), device, dtype),
        text_encoder=_random(CLIPTextModel, clip_text_config("L", tiny, tokenizer), device, dtype),
        tokenizer=tokenizer, unet=_random(UNet2DConditionModel, sd15_unet_config(tiny), device, dtype),
        scheduler=_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)


def build_sdxl(out: Path, tiny: bool, device: str, dtype: torch.dtype) -> None:
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from comat_core.models.tiny import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    config_l, config_g = clip_text_config("L", tiny, tokenizer), clip_text_config("G", tiny, tokenizer)
    unet = sdxl_unet_config(tiny, (config_l.hidden_size, config_g.hidden_size), config_g.projection_dim)
    pipe = StableDiffusionXLPipeline(
        vae=_random(AutoencoderKL, vae_config(tiny, 0.13025), device, dtype),
        text_encoder=_random(CLIPTextModel, config_l, device, dtype),
        text_encoder_2=_random(CLIPTextModelWithProjection, config_g, device, dtype),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=_random(UNet2DConditionModel, unet, device, dtype),
        scheduler=_scheduler(), force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.save_pretrained(out, safe_serialization=True)


def build_blip(out: Path, tiny: bool, device: str, dtype: torch.dtype) -> None:
    from transformers import BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    from comat_core.models.tiny import BLIP_DECODER_BOS, build_bert_tokenizer

    tokenizer = build_bert_tokenizer((BLIP_DECODER_BOS,), bos_token=BLIP_DECODER_BOS)
    config = blip_config(tiny, tokenizer)
    _random(BlipForConditionalGeneration, config, device, dtype).save_pretrained(out, safe_serialization=True)
    size = config.vision_config.image_size
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": size, "width": size}),
                  tokenizer=tokenizer).save_pretrained(out)


def ensure_models(root: Path, model: str, tiny: bool, device: str, dtype: torch.dtype) -> dict[str, Path]:
    """Build the folders that are missing (each marked complete by a stamp file); return their paths."""
    builders = {"sd15": build_sd15, "blip": build_blip}
    if model == "sdxl":
        builders["sdxl"] = build_sdxl
    paths = {}
    for name, build in builders.items():
        folder = root / name
        stamp = folder / ".complete"
        expected = f"{BUILD_VERSION} {dtype}"
        if not (stamp.is_file() and stamp.read_text() == expected):
            t = time.perf_counter()
            folder.mkdir(parents=True, exist_ok=True)
            build(folder, tiny, device, dtype)
            stamp.write_text(expected)
            log(f"built {name} into {folder} in {time.perf_counter() - t:.1f}s")
            free_memory()
        paths[name] = folder
    return paths


# ----------------------------------------------------------------------------------------------
# Production config, data and variants


VARIANT_TOKENS = {
    "plain": [],
    "merged": ["train.merge_lora_for_nograd=true"],
    "compile": ["train.compile_nograd_unet=true", "train.nograd_compile_mode=reduce-overhead"],
    "compile_default": ["train.compile_nograd_unet=true", "train.nograd_compile_mode=default"],
    "compile_autotune": ["train.compile_nograd_unet=true", "train.nograd_compile_mode=max-autotune"],
    "vaeckpt": ["train.vae_decode_checkpointing=true"],
}


def variant_overrides(variant: str, batch: int) -> tuple[list[str], int]:
    """``--set`` overrides and batch size of a variant name such as ``merged+compile+vaeckpt+b8``."""
    overrides = []
    for token in variant.split("+"):
        if token in VARIANT_TOKENS:
            overrides += VARIANT_TOKENS[token]
        elif token.startswith("b") and token[1:].isdigit():
            batch = int(token[1:])
        else:
            raise SystemExit(f"unknown variant token {token!r}: use {', '.join(VARIANT_TOKENS)} or bN")
    return overrides, batch


def production_config(args, paths: dict[str, Path], overrides: list[str], batch: int):
    tiny = args.preset == "tiny"
    preset = {"sd15": "sd15", "sdxl": "sdxl"}[args.model]
    base = [f"models.pretrained={paths[args.model]}", f"models.captioner={paths['blip']}",
            f"models.discriminator={paths['sd15']}", "models.vae=null", f"train.batch_size={batch}",
            "train.trackers=[]", f"runtime.device={args.device}", f"train.resolution={64 if tiny else 512}",
            f"gan_gt.resolution={64 if tiny else 512}"]
    if tiny:
        base += ["train.lora.rank=4", "train.lora.alpha=4", "train.discriminator.lora_rank=4",
                 f"train.num_inference_steps={args.tiny_steps}", f"gan_gt.num_inference_steps={args.tiny_steps}",
                 "train.grad_steps=2", "train.losses.attribute_steps=1"]
    return load_config(preset, overrides=base + overrides + list(args.set))


def step_inputs(tr, batch: int, seed: int):
    """One micro-batch through the production ``TrainingData`` (stored token positions, mask resizing)."""
    from comat_core.method.data import TrainingData, TrainingSources
    from comat_core.stages.entities import entities_from_records
    from comat_core.stages.masks.reader import EntityMask
    from comat_core.text import entity_token_indices

    records = []
    for i in range(batch):
        text, entities = PROMPTS[i % len(PROMPTS)]
        records.append({"prompt_id": f"p{i}", "text": text, "entities": [
            {"noun": noun, "noun_span": list(span), "attribute_spans": [list(attr)],
             "phrase_span": [attr[0], span[1]]} for noun, span, attr in entities]})
        tokens = entity_token_indices(tr.backbone.tokenizer, text, entities_from_records(records[-1]["entities"]))
        for entity, indices in zip(records[-1]["entities"], tokens):
            entity["token_indices"] = indices  # as the prompts stage stores them
    shape = tr.backbone.latent_shape()
    g = torch.Generator().manual_seed(seed)
    latents = {r["prompt_id"]: torch.randn(*shape, generator=g) for r in records}

    def entity_masks(ids, resolution, samples=None):
        left = torch.zeros(resolution, resolution)
        left[:, : resolution // 2] = 1
        return [[EntityMask(0, "a", True, left), EntityMask(1, "b", True, 1 - left)] for _ in ids]

    sources = TrainingSources(records, lambda ids, samples=None: torch.stack([latents[i] for i in ids]), entity_masks)
    data = TrainingData(sources, shape[-1], with_targets=tr.attention is not None)
    return data.inputs(list(range(batch)))


# ----------------------------------------------------------------------------------------------
# Timing


def log(*parts) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Exclusive wall time per phase, with a device synchronisation at every phase boundary.

    ``wrap`` replaces a callable so that its calls are timed as a phase; an ``opaque`` phase keeps
    everything nested in it (e.g. the discriminator step's own backward and optimizer step).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.stack = ["other (text encoding, data, logs)"]
        self.opaque = 0
        self.t = None

    def _mark(self) -> None:
        sync(self.device)
        now = time.perf_counter()
        self.seconds[self.stack[-1]] += now - self.t
        self.t = now

    @contextlib.contextmanager
    def phase(self, name: str, opaque: bool = False):
        if self.opaque:
            yield
            return
        self._mark()
        self.stack.append(name)
        self.opaque += opaque
        try:
            yield
        finally:
            self._mark()
            self.stack.pop()
            self.opaque -= opaque

    def wrap(self, fn, name):
        """``fn`` timed as phase ``name`` (a string, or a function of nothing giving the name)."""
        def timed(*args, **kwargs):
            with self.phase(name() if callable(name) else name, opaque=name == "discriminator step"):
                return fn(*args, **kwargs)
        return timed

    @contextlib.contextmanager
    def running(self):
        sync(self.device)
        self.t = time.perf_counter()
        yield
        self._mark()


@contextlib.contextmanager
def instrumented(tr, timer: PhaseTimer):
    """Wrap the production objects of ``tr`` (and two trainer functions) with phase timers, then restore."""
    import comat_core.method.trainer as trainer

    class _Timed:  # ``tr.concept(...)`` looks ``__call__`` up on the type: wrap the object instead
        def __init__(self, inner):
            self.inner, self.call = inner, timer.wrap(inner, "concept loss fwd (crop, resize, BLIP)")

        def __call__(self, *args, **kwargs):
            return self.call(*args, **kwargs)

    saved_module = {name: getattr(trainer, name) for name in ("attribute_concentration_loss", "_optimizer_step",
                                                               "discriminator_step")}
    saved_backward = torch.autograd.backward
    backbone, sampler = tr.backbone, tr.sampler
    trainer.attribute_concentration_loss = timer.wrap(trainer.attribute_concentration_loss, "attribute loss fwd")
    trainer._optimizer_step = timer.wrap(trainer._optimizer_step, "clip + AdamW (G)")
    trainer.discriminator_step = timer.wrap(trainer.discriminator_step, "discriminator step")
    torch.autograd.backward = timer.wrap(saved_backward, "backward (G)")
    backbone.unet_call = timer.wrap(backbone.unet_call, lambda: "UNet fwd, grad calls" if torch.is_grad_enabled()
                                    else "UNet no-grad calls")
    backbone.decode = timer.wrap(backbone.decode, "VAE decode fwd")
    backbone.encode_prompts = timer.wrap(backbone.encode_prompts, "text encoding")
    sampler.sample = timer.wrap(sampler.sample, "sampler rest (DDPM update, noise, CFG)")
    concept = tr.concept
    if concept is not None:
        tr.concept = _Timed(concept)
    discriminator_forward = tr.discriminator.forward if tr.discriminator is not None else None
    if tr.discriminator is not None:
        tr.discriminator.forward = timer.wrap(discriminator_forward, "discriminator G-side fwd")
    try:
        yield
    finally:
        for name, value in saved_module.items():
            setattr(trainer, name, value)
        torch.autograd.backward = saved_backward
        for obj, name in ((backbone, "unet_call"), (backbone, "decode"), (backbone, "encode_prompts"),
                          (sampler, "sample")):
            delattr(obj, name)  # back to the class's method
        tr.concept = concept
        if tr.discriminator is not None:
            del tr.discriminator.forward


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def count_sync_warnings(tr, inputs, seed: int) -> int | None:
    """Synchronising CUDA calls during one sampling run with its gradient steps (``set_sync_debug_mode``)."""
    import warnings

    from comat_core.method.trainer import step_generators

    if tr.device.type != "cuda":
        return None
    cpu, noise = step_generators(seed, 0, 0, tr.device)
    cond = tr.backbone.encode_prompts(inputs.texts)
    plan = tr.sampler.plan(len(inputs.texts), cpu)
    with tr.accelerator.autocast():
        tr.sampler.sample(cond, plan, noise)  # caches the empty prompt and the timestep tensors
    sync(tr.device)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with tr.accelerator.autocast():
                out = tr.sampler.sample(cond, plan, noise)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    del out
    return sum("synchroniz" in str(w.message) for w in seen)


LOSS_KEYS = ("loss", "concept_loss", "token_loss", "pixel_loss", "gan_g_loss", "d_loss")


def run_variant(args, paths, variant: str) -> dict:
    from comat_core.method.trainer import build_training, train_step

    overrides, batch = variant_overrides(variant, args.batch)
    cfg = production_config(args, paths, overrides, batch)
    free_memory()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    tr = build_training(cfg)
    build_s = time.perf_counter() - t
    inputs = step_inputs(tr, batch, seed=0)
    result = {"variant": variant, "batch": batch, "overrides": overrides, "build_s": round(build_s, 2)}
    sync(device)
    t = time.perf_counter()
    logs = [train_step(tr, [inputs], seed=1000)]
    sync(device)
    result["warmup_s"] = round(time.perf_counter() - t, 2)
    log(f"{variant}: warm-up step {result['warmup_s']}s (build {build_s:.1f}s)")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for s in range(args.steps):
        sync(device)
        t = time.perf_counter()
        logs.append(train_step(tr, [inputs], seed=1001 + s))
        sync(device)
        times.append(time.perf_counter() - t)
        log(f"{variant}: step {s + 1}/{args.steps} {times[-1]:.3f}s")
    result.update(s_per_step=statistics.median(times), all_s=[round(x, 4) for x in times],
                  peak_alloc_GiB=peak_gib(device),
                  peak_reserved_GiB=torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None,
                  losses=[{k: row[k] for k in LOSS_KEYS} for row in logs])
    timer = PhaseTimer(device)
    with instrumented(tr, timer), timer.running():
        train_step(tr, [inputs], seed=1001 + args.steps)
    result["phases_s"] = {k: round(v, 4) for k, v in sorted(timer.seconds.items(), key=lambda kv: -kv[1])}
    result["instrumented_total_s"] = round(sum(timer.seconds.values()), 4)
    result["sync_warnings_in_sampling"] = count_sync_warnings(tr, inputs, seed=7) if args.sync_check else None
    nograd = tr.backbone.nograd_unet
    if nograd is not None:
        result["merged_parameters_M"] = round(nograd.merged_parameters / 1e6, 2)
        result["compiled_shapes"] = len(nograd.shapes)
    del tr, inputs, nograd
    free_memory()
    torch._dynamo.reset()
    return result


def compare_losses(results: list[dict]) -> None:
    """Largest relative difference of each variant's step losses from the first variant's (same seeds)."""
    first = results[0]
    for r in results[1:]:
        if r["batch"] != first["batch"]:
            continue
        worst = 0.0
        for a, b in zip(r["losses"], first["losses"]):
            for k in LOSS_KEYS:
                if b[k] == b[k] and a[k] == a[k]:  # skip NaN (a term not computed)
                    worst = max(worst, abs(a[k] - b[k]) / max(abs(b[k]), 1e-12))
        r["max_rel_loss_diff_vs_first"] = worst


# ----------------------------------------------------------------------------------------------
# The reference-style step


def run_reference(args, workdir: Path) -> dict:
    if not args.reference_script:
        return {"error": "no reference script given (--reference-script or COMAT_REFERENCE_STEP)"}
    script = Path(args.reference_script)
    if not script.is_file():
        return {"error": f"reference script not found: {script}"}
    out = workdir / "reference.json"
    cmd = [sys.executable, str(script), "--phases", "A", "--B", str(args.batch), "--reps", str(args.reference_reps),
           "--out", str(out), "--model", args.model]
    if args.preset == "tiny":
        cmd += ["--tiny", "--device", args.device, "--steps_total", str(args.tiny_steps)]
    log("reference:", " ".join(cmd))
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=script.parent)
    result = {"command": " ".join(cmd), "wall_s": round(time.perf_counter() - t, 1), "returncode": proc.returncode}
    if out.is_file():
        data = json.loads(out.read_text())
        a = data.get("variant_A", {})
        result.update(s_per_step=a.get("s_per_step_median"), peak_alloc_GiB=a.get("peak_alloc_GiB"),
                      batch=a.get("B"), phases_s=a.get("instrumented_step_phases_s"), env=data.get("env"))
        if "variant_A_errors" in data:
            result["errors"] = data["variant_A_errors"]
    if proc.returncode or result.get("s_per_step") is None:
        result["stderr_tail"] = proc.stderr[-2000:]
    return result


# ----------------------------------------------------------------------------------------------
# Meta-device counts (no GPU needed)


def count_merged_parameters() -> dict:
    """Parameters of the LoRA-targeted projections (what the merged no-grad copy stores), real configs."""
    from diffusers import UNet2DConditionModel

    out = {}
    targets = ("to_q", "to_k", "to_v", "to_out.0")
    for name, config in (("sd15", sd15_unet_config(False)), ("sdxl", sdxl_unet_config(False, (768, 1280), 1280))):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config)
        merged = sum(m.weight.numel() for n, m in unet.named_modules() if n.endswith(targets))
        total = sum(p.numel() for p in unet.parameters())
        out[name] = {"unet_params_M": round(total / 1e6, 1), "merged_params_M": round(merged / 1e6, 1),
                     "merged_bf16_GiB": round(merged * 2 / 2**30, 2)}
    return out


def vae_memory_estimate(batch: int, resolution: int) -> dict:
    """Bytes the SD VAE decode keeps for backward in bf16 (meta device: exact counts, no compute).

    Three ways: plain; diffusers' per-block ``enable_gradient_checkpointing``; the production
    per-layer ``checkpoint_decoder_layers``. With checkpointing the backward also re-creates the
    activations of one checkpointed piece at a time: the largest such piece is reported. Without
    autocast: under bf16 autocast GroupNorm runs in fp32, so real figures are higher (about 4/3 for
    a resnet). On meta, SDPA takes its math path, so the one mid-block attention is counted with its
    4096 x 4096 probabilities (0.125 GiB per copy at batch 4), which the fused GPU kernels do not keep.
    """
    from diffusers import AutoencoderKL

    from comat_core.models.backbones import checkpoint_decoder_layers

    def saved_bytes(fn, per_module: dict | None = None) -> int:
        total, stack = 0, []

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            for name in stack:
                per_module[name] += t.numel() * t.element_size()
            return t

        handles = []
        if per_module is not None:
            for name, module in decoder_pieces().items():
                handles.append(module.register_forward_pre_hook(lambda m, a, _n=name: stack.append(_n)))
                handles.append(module.register_forward_hook(lambda m, a, o: None if stack.pop() else None))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        for h in handles:
            h.remove()
        return total

    def build():
        with torch.device("meta"):
            return AutoencoderKL(**vae_config(False, 0.18215)).to(torch.bfloat16).requires_grad_(False)

    vae = build()

    def decoder_pieces(blocks_only=False):
        d = vae.decoder
        blocks = {"mid_block": d.mid_block, **{f"up_blocks.{i}": b for i, b in enumerate(d.up_blocks)}}
        if blocks_only:
            return blocks
        return {f"{n}.{g}.{k}": m for n, b in blocks.items() for g in ("resnets", "attentions", "upsamplers")
                for k, m in enumerate(getattr(b, g, None) or []) if m is not None}

    z = torch.empty(batch, 4, resolution // 8, resolution // 8, device="meta", dtype=torch.bfloat16,
                    requires_grad=True)
    layers = defaultdict(int)
    plain = saved_bytes(lambda: vae.decode(z), layers)
    blocks = {name: sum(v for k, v in layers.items() if k.startswith(name + ".")) for name in decoder_pieces(True)}
    vae.enable_gradient_checkpointing()
    per_block = saved_bytes(lambda: vae.decode(z))
    vae = build()
    checkpoint_decoder_layers(vae)
    per_layer = saved_bytes(lambda: vae.decode(z))
    gib = 2**30
    return {"batch": batch, "resolution": resolution, "dtype": "bf16, no autocast",
            "plain_GiB": round(plain / gib, 2),
            "per_block_kept_GiB": round(per_block / gib, 2),
            "per_block_largest_recompute_GiB": round(max(blocks.values()) / gib, 2),
            "per_layer_kept_GiB": round(per_layer / gib, 2),
            "per_layer_largest_recompute_GiB": round(max(layers.values()) / gib, 2)}


# ----------------------------------------------------------------------------------------------


def environment(args) -> dict:
    import diffusers
    import peft
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "diffusers": diffusers.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "args": vars(args)}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def print_table(results: list[dict], reference: dict | None) -> None:
    ref = (reference or {}).get("s_per_step")
    print(f"\n{'variant':34s} {'batch':>5s} {'s/step':>8s} {'warm-up s':>9s} {'peak GiB':>8s} {'ref/this':>8s} "
          f"{'max rel loss diff':>17s}")
    for r in results:
        peak = f"{r['peak_alloc_GiB']:.2f}" if r.get("peak_alloc_GiB") is not None else "-"
        ratio = f"{ref / r['s_per_step']:.2f}x" if ref else "-"
        diff = r.get("max_rel_loss_diff_vs_first")
        print(f"{r['variant']:34s} {r['batch']:5d} {r['s_per_step']:8.3f} {r['warmup_s']:9.1f} {peak:>8s} {ratio:>8s} "
              f"{'-' if diff is None else f'{diff:.2e}':>17s}")
    if reference is not None:
        shown = ref if ref is not None else reference.get("error", "failed")
        print(f"reference-style step (variant A): {shown} s/step, peak {reference.get('peak_alloc_GiB')} GiB")
    for r in results:
        print(f"\nphases of one instrumented step, {r['variant']} (synchronised, exclusive seconds; "
              f"total {r['instrumented_total_s']}):")
        for name, seconds in r["phases_s"].items():
            print(f"  {name:44s} {seconds:8.4f}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["sd15", "sdxl"], default="sd15")
    ap.add_argument("--preset", choices=["real", "tiny"], default="real", help="real model sizes or tiny configs")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="prompts per step (default: 4 for sd15, 6 for sdxl)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant (after one warm-up step)")
    ap.add_argument("--variants", default="plain,merged,merged+compile,merged+compile+vaeckpt")
    ap.add_argument("--models", default=None,
                    help="folder for the built models (default $COMAT_CACHE or ~/.cache/comat, /bench-models/<preset>)")
    ap.add_argument("--set", action="append", default=[], help="extra config override KEY=VALUE (repeatable)")
    ap.add_argument("--tiny-steps", type=int, default=6, help="DDPM steps with --preset tiny")
    ap.add_argument("--reference-script", default=REFERENCE_SCRIPT,
                    help="path of the reference-style step script (default: $COMAT_REFERENCE_STEP)")
    ap.add_argument("--reference-reps", type=int, default=3)
    ap.add_argument("--reference", dest="reference", action="store_true", default=None,
                    help="run the reference-style step (default: on for --preset real, off for tiny: its fp16 "
                         "variant A takes over 10 minutes on a 2-core CPU)")
    ap.add_argument("--no-reference", dest="reference", action="store_false")
    ap.add_argument("--sync-check", action="store_true", help="count synchronising CUDA calls in one sampling run")
    ap.add_argument("--count-merged", action="store_true", help="only print the merged-copy sizes (meta device)")
    ap.add_argument("--memory-estimate", action="store_true", help="only print the VAE decode memory estimate")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "train_step.json"))
    args = ap.parse_args(argv)
    if args.count_merged or args.memory_estimate:
        out = {}
        if args.count_merged:
            out["merged_copy"] = count_merged_parameters()
        if args.memory_estimate:
            out["vae_decode"] = [vae_memory_estimate(b, 512) for b in (4, 6)]
        print(json.dumps(out, indent=1))
        return out
    args.batch = args.batch or (4 if args.model == "sd15" else 6)
    tiny = args.preset == "tiny"
    if args.reference is None:
        args.reference = not tiny
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    root = Path(args.models) if args.models else cache_dir() / "bench-models" / args.preset
    env = environment(args)
    log("environment", json.dumps({k: v for k, v in env.items() if k != "args"}))
    paths = ensure_models(root, args.model, tiny, args.device, dtype)
    results = []
    for variant in [v for v in args.variants.split(",") if v]:
        results.append(run_variant(args, paths, variant))
        log(f"{variant}: {results[-1]['s_per_step']:.3f} s/step, peak {results[-1]['peak_alloc_GiB']} GiB")
    compare_losses(results)
    reference = None
    if args.reference:
        with tempfile.TemporaryDirectory() as tmp:
            reference = run_reference(args, Path(tmp))
    report = {"environment": env, "model": args.model, "preset": args.preset, "variants": results,
              "reference_A": reference}
    if reference and reference.get("s_per_step"):
        report["speedup_vs_reference_A"] = {r["variant"]: round(reference["s_per_step"] / r["s_per_step"], 3)
                                            for r in results}
    print_table(results, reference)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    log(f"results written to {args.out}")
    return report


if __name__ == "__main__":
    main()
