"""Image generation with fixed per-sample seeds, for the evaluate stage (and the SDXL pre-finetune).

Every image gets its own CPU ``torch.Generator`` seeded with its seed, passed to the pipeline as a
list: the initial noise and the DDPM noise of each sample depend only on its seed, not on the batch
it lands in, so the base and the tuned model start from the same noise for the same (prompt, seed),
and a resumed run draws what an uninterrupted run draws. The scheduler is DDPM built from the
model's own scheduler config (the sampler CoMat trains with).
"""

from __future__ import annotations

import gc
from typing import Sequence

import torch

from ..config import ComatConfig
from .metrics import EvalSample


def resolve_device(cfg: ComatConfig) -> torch.device:
    """``runtime.device``: auto picks the GPU when there is one."""
    if cfg.runtime.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.runtime.device)


def weight_dtype(cfg: ComatConfig, device: torch.device) -> torch.dtype:
    """The frozen models' dtype: fp32 on CPU; on GPU bf16 (auto: where supported, else fp16)."""
    mode = cfg.runtime.mixed_precision
    if device.type != "cuda" or mode == "no":
        return torch.float32
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if mode == "bf16" else torch.float16


def load_generator(cfg: ComatConfig, device: torch.device, unet_dir: str | None = None, lora_dir: str | None = None):
    """The configured pipeline with a DDPM scheduler, optionally with another UNet and a LoRA.

    ``unet_dir``: a UNet folder (the SDXL pre-finetuned UNet); ``lora_dir``: a diffusers/PEFT LoRA
    folder loaded with ``load_lora_weights``.
    """
    from diffusers import AutoencoderKL, DDPMScheduler

    from ..models.loader import freeze, load_sd_pipeline, resolve_model

    dtype = weight_dtype(cfg, device)
    pipe = load_sd_pipeline(cfg.models.pretrained, cfg.models.family, dtype=dtype, device=device,
                            unet_override=unet_dir, field="models.pretrained")
    if cfg.models.vae:
        vae = AutoencoderKL.from_pretrained(resolve_model(cfg.models.vae, "models.vae"), dtype=dtype,
                                            use_safetensors=True)
        pipe.vae = freeze(vae.to(device))
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample, seeded with the sample's seed."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


@torch.no_grad()
def draw(pipe, prompts: Sequence[str], seeds: Sequence[int], *, resolution: int, num_inference_steps: int,
         guidance_scale: float, output_type: str = "pil"):
    """Generate one image per (prompt, seed); returns PIL images (or a ``[B, 3, H, W]`` tensor in [0, 1])."""
    out = pipe(prompt=list(prompts), height=resolution, width=resolution, num_inference_steps=num_inference_steps,
               guidance_scale=guidance_scale, generator=generators(seeds), output_type=output_type)
    return out.images


def generate_images(pipe, samples: Sequence[EvalSample], cfg: ComatConfig) -> list:
    """The evaluation images of ``samples`` (PIL), in batches of ``evaluate.batch_size``."""
    ev = cfg.evaluate
    images = []
    for i in range(0, len(samples), ev.batch_size):
        batch = samples[i : i + ev.batch_size]
        images += draw(pipe, [s.prompt for s in batch], [s.seed for s in batch], resolution=ev.resolution,
                       num_inference_steps=ev.num_inference_steps, guidance_scale=ev.guidance_scale)
    return images


def free_memory() -> None:
    """Return the memory of models the caller has just dropped (call after ``del pipe``)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def plan_samples(model: str, prompts: dict[str, list[str]], images_per_prompt: int, seed: int) -> list[EvalSample]:
    """Every image one model draws: categories in order, prompts in file order, seeds ``seed + k``."""
    return [EvalSample(model, category, p, text, seed + k)
            for category, texts in prompts.items()
            for p, text in enumerate(texts)
            for k in range(images_per_prompt)]


def shard_plan(samples: Sequence[EvalSample], shard_size: int) -> list[tuple[str, list[EvalSample]]]:
    """``(name, samples)`` shards of at most ``shard_size``; names ``<model>-NNNNN`` are stable across runs."""
    model = samples[0].model if samples else "none"
    return [(f"{model}-{i // shard_size:05d}", list(samples[i : i + shard_size]))
            for i in range(0, len(samples), shard_size)]
