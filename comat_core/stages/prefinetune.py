"""The ``sdxl_prefinetune`` stage: teach SDXL to draw at 512 px before CoMat (docs/method.md §7).

SDXL renders poorly at 512 px, CoMat's training resolution. So, first:

1. **Generate** — SDXL (base) draws one image per training prompt at ``generation_resolution``
   (1024), each from its own seed (derived from the prompt id and ``seed``); the image is resized to
   ``resolution`` (512) with an antialiased bicubic filter on the decoded tensor and stored as PNG.
   Shards of ``shard_size`` images (``images/*.png`` + ``index-NNNNN.parquet``) are committed one by
   one, so a crash costs one shard and a rerun draws only the missing ones.
2. **Fine-tune** — every UNet parameter is trained with the standard denoising loss (MSE to the noise,
   or to the velocity when the scheduler's ``prediction_type`` is ``v_prediction``) for ``max_steps``
   steps of ``batch_size`` images: AdamW (``learning_rate``, torch's default betas and weight decay
   0.01), gradient norm clipped at 1.0, bf16 autocast on GPU through accelerate (fp16 where bf16 is
   missing; fp32 on CPU), fp32 master weights, seeded data order, noise and timesteps.
3. **Write** the UNet as a diffusers folder (safetensors, fp32) under ``unet/``; ``gan_gt``, ``train``
   and ``evaluate`` load it with ``UNet2DConditionModel.from_pretrained``.

Why PNG shards at 512 px and not latents: the resize is defined on pixels (a 1024-px image resized to
512 px, not a resized latent); PNG keeps the resized image exactly (after the usual 8-bit
quantisation, as any saved generation), is a quarter the size of the 1024-px original, can be looked
at, and does not tie the shards to one VAE. Encoding ``max_steps × batch_size`` images (400 by
default) with the VAE during fine-tuning costs seconds.

SDXL micro-conditioning: the fine-tune conditions on original size = target size = ``resolution``
and crop (0, 0), which is what the SDXL pipeline passes when it is asked for a 512-px image.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from comat_core.errors import ConfigError, InputError
from comat_core.models.generation import draw, load_generator
from comat_core.stages.prompts import read_prompts
from comat_core.runtime import free_memory, mixed_precision, resolve_device
from comat_core.store.shards import check_fail_hook, part_summary, shards_to_do

log = logging.getLogger("comat.prefinetune")

GRAD_CLIP = 1.0
INDEX_SCHEMA = pa.schema([("row", pa.int64()), ("prompt_id", pa.string()), ("text", pa.string()),
                          ("seed", pa.int64()), ("image", pa.string())])


def run(ctx) -> dict:
    """Stage entry point (see comat_core.stages.registry)."""
    cfg, pf = ctx.cfg, ctx.cfg.sdxl_prefinetune
    if cfg.models.family != "sdxl":
        raise ConfigError(f"sdxl_prefinetune is for the sdxl model family, not {cfg.models.family}; "
                          "set sdxl_prefinetune.enabled=false")
    prompts = read_prompts(ctx.inputs["prompts"])[: pf.num_images]
    if not prompts:
        raise InputError("the prompts stage holds no prompts; sdxl_prefinetune has nothing to draw")
    device = resolve_device(cfg)
    items = [{"row": i, "prompt_id": p["prompt_id"], "text": p["text"], "seed": prompt_seed(pf.seed, p["prompt_id"]),
              "image": f"images/{i:06d}.png"} for i, p in enumerate(prompts)]
    shards = [(f"images-{k // pf.shard_size:05d}", items[k : k + pf.shard_size])
              for k in range(0, len(items), pf.shard_size)]
    generated = generate_shards(ctx, shards, device)
    if ctx.shard_part is not None:  # a fan-out part: the fine-tune and the manifest come with the last call
        return part_summary(ctx, [name for name, _ in shards], generated)
    losses = finetune(ctx, items, device)
    return {"images": len(items), "shards": len(shards), "shards_generated": generated, "steps": len(losses),
            "first_loss": losses[0], "final_loss": losses[-1], "mean_loss": float(np.mean(losses))}


def prompt_seed(seed: int, prompt_id: str) -> int:
    """A per-prompt seed from the stage seed and the prompt id (stable across prompt order)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()[:4], "big") & 0x7FFFFFFF


def prefinetuned_unet(ctx) -> str | None:
    """This stage's ``unet/`` folder (the SDXL 512-px UNet), materialised locally, when a stage has it as input."""
    reader = ctx.inputs.get("sdxl_prefinetune")
    if reader is None:
        return None
    if not reader.list(prefix="unet/"):
        raise InputError(f"the sdxl_prefinetune stage at {reader.url} has no unet/ folder; rerun it with --force")
    return str(reader.download_tree("unet", ctx.scratch() / "prefinetuned-unet"))


# ----------------------------------------------------------------------------------------------
# 1. Generation


def generate_shards(ctx, shards: list[tuple[str, list[dict]]], device) -> int:
    """Draw every shard that is not done (of ``ctx.shard_part`` only, when set); returns how many.

    ``hooks["fail_at_shard"] = k`` raises before shard k (tests)."""
    pf = ctx.cfg.sdxl_prefinetune
    pending = [(k, *shards[k]) for k in shards_to_do(ctx, [name for name, _ in shards])]
    log.info("sdxl_prefinetune: %d of %d image shards to generate", len(pending), len(shards))
    if not pending:
        return 0
    pipe = load_generator(ctx.cfg, device)
    for k, name, items in pending:
        check_fail_hook(ctx, k, name)
        for i in range(0, len(items), pf.generation_batch_size):
            batch = items[i : i + pf.generation_batch_size]
            images = draw(pipe, [it["text"] for it in batch], [it["seed"] for it in batch],
                          resolution=pf.generation_resolution, num_inference_steps=pf.num_inference_steps,
                          guidance_scale=pf.guidance_scale, output_type="pt")
            for it, png in zip(batch, to_png(resize(images, pf.resolution))):
                ctx.writer.put_bytes(it["image"], png)
        index = f"index-{name[len('images-'):]}.parquet"
        ctx.writer.put_table(index, pa.Table.from_pylist(items, schema=INDEX_SCHEMA))
        ctx.writer.commit_shard(name, [it["image"] for it in items] + [index], {"images": len(items)})
        ctx.progress(k + 1, len(shards), f"generated {name}")
    del pipe
    free_memory()
    return len(pending)


def resize(images01: torch.Tensor, size: int) -> torch.Tensor:
    """``[B, 3, H, W]`` in [0, 1] → ``size``×``size``, antialiased bicubic, clamped to [0, 1]."""
    if images01.shape[-1] == size and images01.shape[-2] == size:
        return images01.float()
    out = F.interpolate(images01.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return out.clamp(0, 1)


def to_png(images01: torch.Tensor) -> list[bytes]:
    from PIL import Image

    arrays = (images01.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    out = []
    for array in arrays:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


# ----------------------------------------------------------------------------------------------
# 2. Fine-tuning


def load_pixels(ctx, items: list[dict]) -> torch.Tensor:
    """Stored PNGs → ``[B, 3, H, W]`` in [-1, 1] (the VAE's input range)."""
    from PIL import Image

    arrays = []
    for it in items:
        image = Image.open(io.BytesIO(ctx.store.read_bytes(ctx.writer.path(it["image"])))).convert("RGB")
        arrays.append(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def batch_order(n: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """``steps`` batches of indices: seeded shuffles of ``range(n)``, epoch after epoch."""
    gen = torch.Generator().manual_seed(seed)
    flat: list[int] = []
    while len(flat) < steps * batch_size:
        flat += torch.randperm(n, generator=gen).tolist()
    return [flat[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def denoising_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon) or the velocity (v-prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ConfigError(f"the scheduler's prediction_type {kind!r} is not supported; use epsilon or v_prediction")


def finetune(ctx, items: list[dict], device) -> list[float]:
    """Fine-tune the whole SDXL UNet on the stored images; writes ``unet/`` and ``loss.parquet``."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, UNet2DConditionModel

    cfg, pf = ctx.cfg, ctx.cfg.sdxl_prefinetune
    accelerator = Accelerator(mixed_precision=mixed_precision(cfg, device), cpu=device.type == "cpu")
    frozen = load_generator(cfg, accelerator.device)  # text encoders, VAE and scheduler config
    unet = UNet2DConditionModel.from_pretrained(_unet_source(cfg), subfolder="unet", dtype=torch.float32,
                                                use_safetensors=True)
    frozen.unet = None
    free_memory()
    scheduler = DDPMScheduler.from_config(frozen.scheduler.config)
    unet.requires_grad_(True).train()
    if accelerator.device.type == "cuda":
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=pf.learning_rate)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    torch.manual_seed(pf.seed)
    noise_gen = torch.Generator(accelerator.device).manual_seed(pf.seed)
    losses = []
    for step, idx in enumerate(batch_order(len(items), pf.max_steps, pf.batch_size, pf.seed)):
        batch = [items[i] for i in idx]
        loss = denoising_step(frozen, unet, scheduler, load_pixels(ctx, batch), [b["text"] for b in batch],
                              pf.resolution, noise_gen, accelerator)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(unet.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"sdxl_prefinetune: loss is {value} at step {step}; lower the learning rate")
        losses.append(value)
        ctx.progress(step + 1, pf.max_steps, f"fine-tune loss {value:.4f}")
    out_dir = ctx.scratch() / "unet"
    accelerator.unwrap_model(unet).save_pretrained(out_dir, safe_serialization=True)
    ctx.writer.put_local_tree("unet", out_dir)
    log.info("sdxl_prefinetune: %d steps, loss %.4f -> %.4f", len(losses), losses[0], losses[-1])
    ctx.writer.put_table("loss.parquet", pa.table({"step": list(range(1, len(losses) + 1)), "loss": losses}))
    del frozen, unet, optimizer
    free_memory()
    return losses


def _unet_source(cfg) -> str:
    from comat_core.models.loader import resolve_model

    return resolve_model(cfg.models.pretrained, "models.pretrained")


def denoising_step(frozen, unet, scheduler, pixels: torch.Tensor, prompts: list[str], resolution: int,
                   generator: torch.Generator, accelerator) -> torch.Tensor:
    """The standard diffusion loss on one batch: encode, noise at a random timestep, predict, MSE."""
    device = accelerator.device
    with torch.no_grad():
        vae = frozen.vae
        posterior = vae.encode(pixels.to(device, vae.dtype)).latent_dist
        latents = posterior.sample(generator=generator).float() * vae.config.scaling_factor
        embeds, _, pooled, _ = frozen.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                    do_classifier_free_guidance=False)
    noise = torch.randn(latents.shape, generator=generator, device=device)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator,
                              device=device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=device)
    added = {"text_embeds": pooled.float(), "time_ids": time_ids.repeat(latents.shape[0], 1).float()}
    with accelerator.autocast():
        prediction = unet(noisy, timesteps, encoder_hidden_states=embeds.float(), added_cond_kwargs=added).sample
    return F.mse_loss(prediction.float(), denoising_target(scheduler, latents, noise, timesteps).float())
