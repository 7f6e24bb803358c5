"""Image generation with fixed per-sample seeds, shared by gan_gt, sdxl_prefinetune, evaluate and the trainer.

Every image gets its own CPU ``torch.Generator`` seeded with its seed: the initial noise and the DDPM
noise of each sample depend only on its seed, not on the batch it lands in, so the base and the tuned
model start from the same noise for the same (prompt, seed), and a resumed run draws what an
uninterrupted run draws. Evaluate and the SDXL pre-finetune draw through the model's diffusers
pipeline (:func:`load_generator`, :func:`draw`: the generators passed as a list, DDPM built from the
model's own scheduler config); gan_gt and the trainer draw through the trainer's sampler
(``comat_core.method.sampler``) with :class:`SeededNoise`.

The draws, defined here once: sample i's generator gives, in order of use, its initial latent
``randn(1, C, h, w)`` (times the scheduler's ``init_noise_sigma``) and then one ``randn(1, C, h, w)``
of variance noise per DDPM step whose timestep is above 0, each drawn on the CPU in float32; this is
what diffusers' ``randn_tensor`` does with a list of generators. With Mixed Latent the sample's
restart noise is one more draw after all of these, so it never shifts the variance noise, and a
sample consumes its stream the same way whatever its batch-mates. :class:`SeededNoise` draws a
sample's whole stream before the first step and moves it to the device in one non-blocking copy
(from pinned memory on CUDA), so the sampling loop never waits for the host; the trainer
(``train.noise: replay``) replays a gan_gt sample exactly: same seed, same noise, same image at the
LoRA's start.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass
class NoiseStream:
    """One trajectory's noise, drawn before its first step (see the module doc).

    ``initial``: ``[B, C, h, w]``; ``variance[k]``: the noise of the k-th step that adds noise
    (``[S, B, C, h, w]``); ``mix``: the Mixed Latent restart noise ``[B, C, h, w]``, or None.
    """

    initial: torch.Tensor
    variance: torch.Tensor
    mix: torch.Tensor | None = None


def _split(draws: torch.Tensor, variance: int, mix: bool) -> NoiseStream:
    """``[1 + S (+1), B, C, h, w]`` → its parts, in the order of the stream."""
    return NoiseStream(draws[0], draws[1: 1 + variance], draws[1 + variance] if mix else None)


class SeededNoise:
    """Per-sample noise streams: sample i's draws come from its own CPU generator (see the module doc)."""

    def __init__(self, seeds: Sequence[int]):
        self.seeds = [int(s) for s in seeds]
        self._generators = generators(self.seeds)

    def stream(self, batch: int, shape: Sequence[int], variance: int, mix: bool,
               device: torch.device | str) -> NoiseStream:
        """Each sample's initial latent, ``variance`` step draws and (``mix``) its restart noise, drawn on
        the CPU one ``randn(1, *shape)`` at a time and moved to ``device`` in one non-blocking copy."""
        if batch != len(self._generators):
            raise ValueError(f"a draw of batch {batch} from {len(self._generators)} per-sample noise streams")
        device = torch.device(device)
        count = 1 + variance + int(mix)
        host = torch.empty((batch, count, 1, *shape), pin_memory=device.type == "cuda")
        for g, rows in zip(self._generators, host):
            for row in rows:
                torch.randn(row.shape, generator=g, out=row)
        draws = host.to(device, non_blocking=True).squeeze(2).transpose(0, 1)
        return _split(draws, variance, mix)


class BatchNoise:
    """One generator draws a whole batch's stream on the device in one call (fresh noise per training step,
    the reference's way)."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def stream(self, batch: int, shape: Sequence[int], variance: int, mix: bool,
               device: torch.device | str) -> NoiseStream:
        draws = torch.randn((1 + variance + int(mix), batch, *shape), generator=self.generator, device=device)
        return _split(draws, variance, mix)


@torch.no_grad()
def draw(pipe, prompts: Sequence[str], seeds: Sequence[int], *, resolution: int, num_inference_steps: int,
         guidance_scale: float, output_type: str = "pil"):
    """Generate one image per (prompt, seed); returns PIL images (or a ``[B, 3, H, W]`` tensor in [0, 1])."""
    out = pipe(prompt=list(prompts), height=resolution, width=resolution, num_inference_steps=num_inference_steps,
               guidance_scale=guidance_scale, generator=generators(seeds), output_type=output_type)
    return out.images
