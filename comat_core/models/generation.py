"""Image generation with fixed per-sample seeds, shared by gan_gt, sdxl_prefinetune and evaluate.

Every image gets its own CPU ``torch.Generator`` seeded with its seed, passed to the pipeline as a
list: the initial noise and the DDPM noise of each sample depend only on its seed, not on the batch
it lands in, so the base and the tuned model start from the same noise for the same (prompt, seed),
and a resumed run draws what an uninterrupted run draws. The scheduler is DDPM built from the
model's own scheduler config (the sampler CoMat trains with).
"""

from __future__ import annotations

from typing import Sequence

import torch

from comat_core.config import ComatConfig
from comat_core.runtime import weight_dtype


def load_generator(cfg: ComatConfig, device: torch.device, unet_dir: str | None = None, lora_dir: str | None = None):
    """The configured pipeline (with ``models.vae`` when set) and a DDPM scheduler, optionally another UNet and a LoRA.

    ``unet_dir``: a UNet folder (the SDXL pre-finetuned UNet); ``lora_dir``: a diffusers/PEFT LoRA
    folder loaded with ``load_lora_weights``.
    """
    from diffusers import DDPMScheduler

    from comat_core.models.loader import load_sd_pipeline

    pipe = load_sd_pipeline(cfg.models.pretrained, cfg.models.family, dtype=weight_dtype(cfg, device), device=device,
                            unet_override=unet_dir, field="models.pretrained", vae=cfg.models.vae)
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
