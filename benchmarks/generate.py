"""Throughput of the ``gan_gt`` stage: ground-truth latents per second (a measurement, not a test).

Usage:
  python benchmarks/generate.py --preset tiny                       # CPU smoke run, tiny zoo models
  python benchmarks/generate.py --preset sd15 --size real --batch-size 16 --reps 3   # GPU, real size
  python benchmarks/generate.py --preset sdxl --size real --batch-size 8

``--size preset`` loads the models the preset names (the tiny zoo for tiny presets; Hub ids or local
paths otherwise) exactly as the stage does (``gan_gt.load_base_sampler``). ``--size real``
builds the preset family's real architecture with random weights in memory (SD1.5: UNet 860 M,
CLIP ViT-L text encoder, SD VAE; SDXL: UNet 2.6 B, CLIP ViT-L + OpenCLIP bigG text encoders, VAE)
with the tiny CLIP tokenizer (random weights need no real vocabulary), so nothing is downloaded.
Either way the timed call is the stage's own ``comat_core.stages.gan_gt.generate_latents`` (the trainer's
DDPM sampler from the scheduler config, CFG, per-sample CPU generators), with the preset's resolution, steps and
guidance (``--steps`` / ``--resolution`` override them), in the precision ``runtime.mixed_precision``
gives (bf16 on a recent GPU, fp32 on CPU).

Timing: ``--warmup`` untimed batches, then the median of ``--reps`` batches, CUDA-synchronised.
Results (images/s, seconds per batch, peak GPU memory, environment) go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from comat_core.config import load_config
from comat_core.stages.gan_gt import BaseSampler, generate_latents, load_base_sampler, prompt_seed
from comat_core.runtime import mixed_precision, resolve_device, weight_dtype

PROMPTS = ["a red cube and a blue sphere", "a green apple and a yellow banana", "a black cat and a white dog",
           "a wooden table and a metallic chair"]


# ----------------------------------------------------------------------------------------------
# Shared with benchmarks/masks.py


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, warmup: int, reps: int) -> dict:
    """``warmup`` untimed calls, then ``reps`` synchronised ones; median and all times in seconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    out = {"median_s": statistics.median(times), "all_s": [round(t, 4) for t in times]}
    if device.type == "cuda":
        out["peak_alloc_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def environment(args) -> dict:
    import diffusers
    import transformers

    env = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
           "threads": torch.get_num_threads(), "args": vars(args)}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def write_json(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {path}")


def build_on(device: torch.device, ctor, *args, **kwargs):
    """Random-init a module directly on ``device`` (fast for GB-sized models), then make sure all of it is there."""
    with torch.device(device):
        module = ctor(*args, **kwargs)
    return module.to(device).eval().requires_grad_(False)


def real_vae(device: torch.device, family: str):
    """The SD / SDXL VAE architecture (83.7 M parameters), random weights."""
    from diffusers import AutoencoderKL

    sdxl = family == "sdxl"
    return build_on(device, AutoencoderKL, in_channels=3, out_channels=3,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                    sample_size=1024 if sdxl else 512, scaling_factor=0.13025 if sdxl else 0.18215, force_upcast=sdxl)


# ----------------------------------------------------------------------------------------------
# Models


def _clip_text(device, tokenizer, hidden: int, layers: int, heads: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                            projection_dim=hidden,
                            hidden_act="gelu" if projection else "quick_gelu", bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    return build_on(device, CLIPTextModelWithProjection if projection else CLIPTextModel, config)


def real_sampler(cfg, pipe, precision: str) -> BaseSampler:
    """The stage's sampler around a random-init real-size pipeline (as ``load_base_sampler`` builds it)."""
    from comat_core.method.sampler import DifferentiableSampler
    from comat_core.models.backbones import Backbone

    gcfg = cfg.gan_gt
    sampler = DifferentiableSampler(Backbone(pipe, cfg.models.family, gcfg.resolution), gcfg.num_inference_steps,
                                    gcfg.guidance_scale, grad_steps=1, attribute_steps=0, gradient_checkpointing=False)
    return BaseSampler(sampler, precision)


def real_pipeline(family: str, device: torch.device, dtype: torch.dtype):
    """A random-init SD1.5 or SDXL pipeline at real size, set up as ``load_generator`` sets up the stage's."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    from comat_core.models.tiny import SD_SCHEDULER, build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    if family == "sd15":
        unet = build_on(device, UNet2DConditionModel, sample_size=64, cross_attention_dim=768)
        pipe = StableDiffusionPipeline(
            vae=real_vae(device, family), text_encoder=_clip_text(device, tokenizer, 768, 12, 12, False),
            tokenizer=tokenizer, unet=unet, scheduler=DDPMScheduler(**SD_SCHEDULER), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
    else:
        unet = build_on(device, UNet2DConditionModel, sample_size=128, block_out_channels=(320, 640, 1280),
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                        cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
        pipe = StableDiffusionXLPipeline(
            vae=real_vae(device, family), text_encoder=_clip_text(device, tokenizer, 768, 12, 12, False),
            text_encoder_2=_clip_text(device, tokenizer, 1280, 32, 20, True), tokenizer=tokenizer,
            tokenizer_2=tokenizer, unet=unet, scheduler=DDPMScheduler(**SD_SCHEDULER), add_watermarker=False)
    pipe = pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=["tiny", "tiny-sdxl", "sd15", "sdxl"])
    ap.add_argument("--size", default="preset", choices=["preset", "real"],
                    help="preset: load the preset's models by name; real: random-init real-size architecture")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the preset's gan_gt.batch_size")
    ap.add_argument("--steps", type=int, default=None, help="default: the preset's gan_gt.num_inference_steps")
    ap.add_argument("--resolution", type=int, default=None, help="default: the preset's gan_gt.resolution")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. runtime.device=cpu")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench-generate.json"))
    args = ap.parse_args(argv)

    overrides = list(args.set)
    flags = {"batch_size": args.batch_size, "num_inference_steps": args.steps, "resolution": args.resolution}
    for key, flag in flags.items():
        if flag is not None:
            overrides.append(f"gan_gt.{key}={flag}")
    cfg = load_config(args.preset, overrides=overrides)
    if args.size == "real" and cfg.gan_gt.resolution < 256:
        cfg.gan_gt.resolution = 512  # the tiny presets' 64 px means nothing for real-size models
    device = resolve_device(cfg)
    dtype = weight_dtype(cfg, device)
    gcfg = cfg.gan_gt

    t = time.perf_counter()
    if args.size == "preset":
        base = load_base_sampler(cfg, device)
    else:
        base = real_sampler(cfg, real_pipeline(cfg.models.family, device, dtype), mixed_precision(cfg, device))
    pipe = base.sampler.backbone.pipe
    load_s = time.perf_counter() - t
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(gcfg.batch_size)]
    seeds = [prompt_seed(gcfg.seed, f"bench-{i}") for i in range(gcfg.batch_size)]
    timing = timed(lambda: generate_latents(base, texts, seeds), device, args.warmup, args.reps)
    params = {name: round(sum(p.numel() for p in m.parameters()) / 1e6, 1)
              for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    result = {
        "benchmark": "gan_gt", "preset": args.preset, "size": args.size, "family": cfg.models.family,
        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "batch_size": gcfg.batch_size,
        "resolution": gcfg.resolution, "steps": gcfg.num_inference_steps, "guidance_scale": gcfg.guidance_scale,
        "model_load_s": round(load_s, 2), "params_M": params, **timing,
        "images_per_s": round(gcfg.batch_size / timing["median_s"], 4), "env": environment(args),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "env"}, indent=1))
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
