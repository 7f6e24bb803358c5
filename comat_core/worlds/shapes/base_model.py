"""The world's base text-to-image model: the tiny SD1.5-shaped architecture trained from scratch on renders.

Same classes and folder layout as the ``tiny`` preset's ``sd15`` model (``AutoencoderKL``,
``UNet2DConditionModel``, ``CLIPTextModel`` + the tiny CLIP tokenizer, ``DDPMScheduler``), saved as
a ``StableDiffusionPipeline`` folder that ``models.loader.load_sd_pipeline`` loads. The recipe,
chosen by measurement (a pixel-space model learns "texture soup" at this budget):

1. **VAE first.** The tiny VAE (64 px -> 4 x 8 x 8 latents) is trained alone on renders as a
   deterministic autoencoder (squared error on the decoded posterior mean, object pixels weighted
   x5, + a tiny KL term that keeps the latents bounded), then frozen. Measured: sampling the
   posterior while training left dark blobs after 300 steps (the initial unit-variance noise
   drowns the signal), and a plain L1 loss learns the background only (its median); its
   scaling factor is set so the latents have unit variance.
2. **Latent diffusion.** The renders are encoded once; the UNet and a CLIP text encoder are trained
   jointly on those latents with the denoising loss, **v-prediction** (the scheduler's
   ``prediction_type``), 10 % empty captions (for classifier-free guidance) and an **EMA** of the
   UNet and text encoder weights, which is what is saved.

Deterministic: every random draw comes from generators seeded from ``seed``; with the same torch
build and thread count the same seed gives the same weights.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

# The tiny zoo's component configs, reused so the world's models have the tiny preset's shapes.
from comat_core.models.tiny import SD_IMAGE_SIZE, SD_SCHEDULER, TEXT_HIDDEN, _clip_text_config, build_clip_tokenizer

from comat_core.worlds.shapes.vocab import BACKGROUND

OBJECT_WEIGHT = 5.0  # VAE loss weight of object pixels (objects cover ~10 % of an image)
Progress = Callable[[str, int, int, dict], None]  # (phase, step, total, metrics)


def _quiet(*_args) -> None:
    return None


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> float ``[N, 3, H, W]`` in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# ----------------------------------------------------------------------------------------------
# VAE


def build_vae(seed: int, widths: tuple[int, ...] = (16, 32, 32, 32)):
    """A tiny VAE with ``len(widths) - 1`` downsamples and 4 latent channels (the tiny preset's shape,
    latents image / 8, is the default; the world's version 3 uses three widths: latents image / 4)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(widths), up_block_types=("UpDecoderBlock2D",) * len(widths),
        block_out_channels=widths, layers_per_block=1, latent_channels=4, norm_num_groups=8,
        sample_size=SD_IMAGE_SIZE, scaling_factor=1.0,
    )


def train_vae(vae, images: np.ndarray, *, steps: int, batch_size: int, lr: float, seed: int,
              kl_weight: float = 1e-6, device: str = "cpu", progress: Progress = _quiet) -> dict:
    """Train ``vae`` in place on renders (L1 reconstruction + ``kl_weight`` KL); returns metrics.

    ``device`` only moves the arithmetic: every draw comes from CPU generators, as on a CPU.
    """
    rng = np.random.default_rng(seed)
    vae.to(device)
    background = torch.tensor(BACKGROUND, dtype=torch.float32).div(127.5).sub(1.0).view(1, 3, 1, 1).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    vae.train()
    start, loss_avg = time.time(), None
    for step in range(steps):
        x = to_tensor(images[rng.integers(0, len(images), batch_size)]).to(device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.mean).sample  # deterministic: sampled latents drown the early signal
        weight = 1.0 + (OBJECT_WEIGHT - 1.0) * (x - background).abs().amax(1, keepdim=True).gt(0.05).float()
        loss = (weight * (recon - x) ** 2).mean() + kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            progress("vae", step + 1, steps, {"loss": round(loss_avg, 4)})
    vae.eval().to("cpu")
    return {"vae_loss": loss_avg, "vae_seconds": time.time() - start}


@torch.no_grad()
def encode(vae, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    """The posterior means of ``images`` (unscaled latents ``[N, 4, h, w]``, on the CPU)."""
    device = next(vae.parameters()).device
    return torch.cat([vae.encode(to_tensor(images[i : i + batch_size]).to(device)).latent_dist.mean.cpu()
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def decode(vae, latents: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Scaled latents -> uint8 ``[N, H, W, 3]`` images."""
    device = next(vae.parameters()).device
    out = [vae.decode(latents[i : i + batch_size].to(device) / vae.config.scaling_factor).sample.cpu()
           for i in range(0, len(latents), batch_size)]
    x = torch.cat(out).clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def reconstruct(vae, images: np.ndarray) -> np.ndarray:
    """The VAE's reconstructions of uint8 ``[N, H, W, 3]`` images (encode to the posterior mean, decode)."""
    return decode(vae, encode(vae, images) * vae.config.scaling_factor)


# ----------------------------------------------------------------------------------------------
# UNet + text encoder


def build_text_encoder(tokenizer, seed: int):
    from transformers import CLIPTextModel

    torch.manual_seed(seed + 1)
    config = _clip_text_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    return CLIPTextModel(config)


def build_unet(seed: int, widths: tuple[int, ...] = (32, 64), latent_size: int = SD_IMAGE_SIZE // 8):
    """An SD1.5-style UNet (cross-attention in every block) with one level per width, on
    ``latent_size`` latents (the tiny preset's: two levels on 8x8)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed + 2)
    n = len(widths)
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
        block_out_channels=widths, layers_per_block=1, attention_head_dim=tuple(max(2, w // 16) for w in widths),
        cross_attention_dim=TEXT_HIDDEN, norm_num_groups=32,
    )


def build_scheduler():
    """SD's DDPM schedule, with v-prediction (see the module docstring)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**{**SD_SCHEDULER, "prediction_type": "v_prediction"})


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's max length, as the pipeline encodes prompts."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def train_unet(unet, text_encoder, tokenizer, latents: torch.Tensor, captions: list[str], *, steps: int,
               batch_size: int, lr: float, seed: int, p_uncond: float = 0.1, ema_decay: float = 0.999,
               train_text: bool = True, phase: str = "unet", device: str = "cpu",
               progress: Progress = _quiet) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """Denoising training on scaled ``latents``; returns the EMA ``(unet, text_encoder)`` and metrics.

    ``train_text=False`` keeps the text encoder frozen (as CLIP is while Stable Diffusion's UNet
    learns): only the UNet is optimised, and the text encoder comes back unchanged.
    """
    scheduler = build_scheduler()
    unet.to(device)
    text_encoder.to(device)
    latents = latents.to(device)
    ids = tokenize(tokenizer, captions).to(device)
    empty = tokenize(tokenizer, [""])[0].to(device)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    text_encoder.requires_grad_(train_text)
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text else [])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    ema_unet = copy.deepcopy(unet).eval()
    ema_text = copy.deepcopy(text_encoder).eval() if train_text else text_encoder.eval()
    ema_params = list(ema_unet.parameters()) + (list(ema_text.parameters()) if train_text else [])
    alphas = scheduler.alphas_cumprod.to(device)
    unet.train()
    text_encoder.train(train_text)
    start, loss_avg = time.time(), None
    for step in range(steps):
        idx = torch.from_numpy(rng.integers(0, len(latents), batch_size)).to(device)
        x0 = latents[idx]
        tokens = ids[idx].clone()
        tokens[torch.from_numpy(rng.random(batch_size) < p_uncond).to(device)] = empty
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        a = alphas[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - alphas[t]).sqrt().view(-1, 1, 1, 1)
        noisy = a * x0 + s * noise
        target = a * noise - s * x0  # v
        with torch.set_grad_enabled(train_text):
            hidden = text_encoder(tokens)[0]
        pred = unet(noisy, t, hidden).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            progress(phase, step + 1, steps, {"loss": round(loss_avg, 4)})
    for model in (unet, text_encoder, ema_unet, ema_text):
        model.to("cpu")
    return ema_unet, ema_text, {f"{phase}_loss": loss_avg, f"{phase}_seconds": time.time() - start}


def save_pipeline(out_dir: Path, vae, text_encoder, tokenizer, unet) -> Path:
    """Write a ``StableDiffusionPipeline`` folder (safetensors) that ``load_sd_pipeline`` loads."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                   unet=unet.eval(), scheduler=build_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


__all__ = ["build_clip_tokenizer", "build_vae", "train_vae", "encode", "decode", "build_text_encoder",
           "build_unet", "build_scheduler", "train_unet", "save_pipeline"]
