"""Image generation with fixed per-sample seeds, shared by gan_gt, sdxl_prefinetune, evaluate and the trainer.

Every image gets its own CPU ``torch.Generator`` seeded with its seed, passed to the pipeline as a
list: the initial noise and the DDPM noise of each sample depend only on its seed, not on the batch
it lands in, so the base and the tuned model start from the same noise for the same (prompt, seed),
and a resumed run draws what an uninterrupted run draws. The scheduler is DDPM built from the
model's own scheduler config (the sampler CoMat trains with).

The draws, defined here once: sample i's generator gives, in order of use, its initial latent
``randn(1, C, h, w)`` (times the scheduler's ``init_noise_sigma``) and then one ``randn(1, C, h, w)``
of variance noise per DDPM step whose timestep is above 0, each drawn on the CPU in the latents'
dtype and moved to the device; this is what diffusers' ``randn_tensor`` does with a list of
generators. :class:`SeededNoise` draws the same way, so the trainer (``train.attribute_masks:
gt_noise``) replays a gan_gt sample exactly: same seed, same noise, same image at the LoRA's start.
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


class SeededNoise:
    """Per-sample noise streams: row i of every draw comes from sample i's own CPU generator (see the module doc)."""

    def __init__(self, seeds: Sequence[int]):
        self.seeds = [int(s) for s in seeds]
        self._generators = generators(self.seeds)

    def randn(self, shape: Sequence[int], device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if shape[0] != len(self._generators):
            raise ValueError(f"a draw of batch {shape[0]} from {len(self._generators)} per-sample noise streams")
        rows = [torch.randn((1, *shape[1:]), generator=g, device="cpu", dtype=dtype) for g in self._generators]
        return torch.cat(rows).to(device)

    def randn_rows(self, shape: Sequence[int], device: torch.device | str, rows: Sequence[bool]) -> torch.Tensor:
        """A draw for the selected rows only (zeros elsewhere): the other samples' streams stay untouched."""
        out = torch.zeros(tuple(shape))
        for i, (g, take) in enumerate(zip(self._generators, rows)):
            if take:
                out[i : i + 1] = torch.randn((1, *shape[1:]), generator=g, device="cpu")
        return out.to(device)


class BatchNoise:
    """One generator draws whole-batch tensors on the device (fresh noise per training step, the reference's way)."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def randn(self, shape: Sequence[int], device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.generator, device=device, dtype=dtype)

    def randn_rows(self, shape: Sequence[int], device: torch.device | str, rows: Sequence[bool]) -> torch.Tensor:
        """A whole-batch draw (the rows not selected are not used)."""
        return self.randn(shape, device)


@torch.no_grad()
def draw(pipe, prompts: Sequence[str], seeds: Sequence[int], *, resolution: int, num_inference_steps: int,
         guidance_scale: float, output_type: str = "pil"):
    """Generate one image per (prompt, seed); returns PIL images (or a ``[B, 3, H, W]`` tensor in [0, 1])."""
    out = pipe(prompt=list(prompts), height=resolution, width=resolution, num_inference_steps=num_inference_steps,
               guidance_scale=guidance_scale, generator=generators(seeds), output_type=output_type)
    return out.images
