"""One small interface over the Stable Diffusion families CoMat fine-tunes (SD v1.x and SDXL).

The sampler, the losses and the trainer talk to a :class:`Backbone` only, so none of them branches
on the model family. A backbone wraps a frozen diffusers pipeline and offers:

* ``encode_prompts(prompts)`` -> :class:`Conditioning` (SD v1: the CLIP text embeddings; SDXL: the
  two encoders' concatenated embeddings, the pooled embedding of the second encoder and the six
  micro-conditioning ``add_time_ids`` = (res, res) original size, crop (0, 0), (res, res) target size),
* ``null_conditioning(batch)``: the unconditional branch exactly as the model's own pipeline builds it
  for an empty negative prompt: SD v1 encodes ""; the SDXL base, whose config sets
  ``force_zeros_for_empty_prompt``, uses zero embeddings (prompt and pooled). One definition for
  gan_gt, training and evaluation (the reference trainer encoded "" for SDXL while its inference used
  zeros, so the LoRA was trained under another guidance than it is used with),
* ``unet_call(latents, t, cond)`` -> noise prediction (classifier-free guidance belongs to the
  sampler, which passes the ``[uncond, cond]`` batch),
* ``decode(latents)`` -> images in [0, 1] with autograd (``decode_to_unit_range=False`` reproduces
  the reference SDXL path, which handed the VAE's [-1, 1] output to the losses), through
  :func:`decode_latents`, the one latent-to-image decoder (latents_mean/std, shift_factor,
  force_upcast, optional clamp) that the stages use with a bare VAE too,
* ``scheduler``: a ``DDPMScheduler`` built from the model's own scheduler config,
* ``latent_shape(res)`` and ``vae_scale``.

Performance (measured against a reference-style step; see ``benchmarks/RESULTS.md``):

* timesteps reach the UNet as 0-d tensors cached on the device, one per timestep value. Given a
  Python int, diffusers builds ``torch.tensor([t], device=...)`` on every call, a blocking
  host-to-device copy (a stream synchronisation) in each of the 50 sampling calls;
* ``nograd_unet`` (None by default): the module used for UNet calls made under ``torch.no_grad``
  (``comat_core.method.nograd.NoGradUNet``: LoRA merged, optionally compiled). Calls with autograd always
  use ``unet``;
* ``enable_decode_checkpointing()``: gradient checkpointing of the VAE decoder, layer by layer
  (see :func:`checkpoint_decoder_layers`); its non-checkpointed backward sets the step's memory
  peak (24.4 GiB of 38.6 at SD1.5 batch 4).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch

from comat_core.errors import ConfigError

Family = Literal["sd15", "sdxl"]


@dataclass
class Conditioning:
    """What the UNet is conditioned on, for a batch of prompts.

    ``pooled`` and ``time_ids`` are None for SD v1 models and set for SDXL.
    """

    prompt_embeds: torch.Tensor  # [B, L, D]
    pooled: torch.Tensor | None = None  # [B, P]
    time_ids: torch.Tensor | None = None  # [B, 6]

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def _map(self, fn) -> "Conditioning":
        return Conditioning(
            fn(self.prompt_embeds),
            None if self.pooled is None else fn(self.pooled),
            None if self.time_ids is None else fn(self.time_ids),
        )

    def expand(self, batch: int) -> "Conditioning":
        """A batch-1 conditioning repeated to ``batch`` rows (a view, no copy)."""
        if len(self) != 1:
            raise ValueError(f"expand needs a batch-1 conditioning, got {len(self)} rows")
        return self._map(lambda x: x.expand(batch, *x.shape[1:]))

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        """Rows of several conditionings, in order (the CFG batch is ``cat([uncond, cond])``)."""
        first = parts[0]
        return Conditioning(
            torch.cat([p.prompt_embeds for p in parts]),
            None if first.pooled is None else torch.cat([p.pooled for p in parts]),
            None if first.time_ids is None else torch.cat([p.time_ids for p in parts]),
        )


class Backbone:
    """A frozen SD v1 or SDXL pipeline behind one interface (see the module docstring).

    ``dtype`` is the dtype of the frozen weights (the UNet input is cast to it); outputs are fp32.
    The UNet attribute may be replaced (e.g. after LoRA injection it is the same module object).
    """

    def __init__(self, pipe, family: Family, resolution: int, decode_to_unit_range: bool = True):
        from diffusers import DDPMScheduler

        if family not in ("sd15", "sdxl"):
            raise ConfigError(f"unknown model family {family!r}: use sd15 or sdxl")
        self.pipe = pipe
        self.family = family
        self.resolution = resolution
        self.decode_to_unit_range = decode_to_unit_range
        self.unet = pipe.unet
        self.vae = pipe.vae
        self.tokenizer = pipe.tokenizer
        self.dtype = pipe.unet.dtype
        self.device = pipe.unet.device
        self.vae_scale = int(pipe.vae_scale_factor)
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        if resolution % self.vae_scale:
            raise ConfigError(f"train.resolution {resolution} must be a multiple of the VAE factor {self.vae_scale}")
        self._null: Conditioning | None = None
        self._timesteps: dict[int, torch.Tensor] = {}
        self.nograd_unet = None  # a NoGradUNet, set by the trainer when a performance switch asks for it

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(
        cls,
        pretrained: str,
        family: Family,
        resolution: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        vae: str | None = None,
        unet_override: str | None = None,
        decode_to_unit_range: bool = True,
    ) -> "Backbone":
        """Load the frozen pipeline by name (Hub id, local path or tiny://), optionally with a VAE/UNet override."""
        from comat_core.models.loader import load_sd_pipeline

        pipe = load_sd_pipeline(pretrained, family, dtype=dtype, device=device, unet_override=unet_override,
                                field="models.pretrained", vae=vae)
        return cls(pipe, family, resolution, decode_to_unit_range)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [m for m in (getattr(self.pipe, "text_encoder", None), getattr(self.pipe, "text_encoder_2", None))
                if m is not None]

    @property
    def pipeline_class(self) -> type:
        """The diffusers pipeline class (its ``save_lora_weights`` writes the loadable LoRA format)."""
        return type(self.pipe)

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Frozen text encoders on a batch of prompts (no gradients)."""
        prompts = list(prompts)
        if self.family == "sd15":
            embeds, _ = self.pipe.encode_prompt(prompts, self.device, 1, do_classifier_free_guidance=False)
            return Conditioning(embeds.to(self.dtype))
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        time_ids = self.add_time_ids().expand(len(prompts), -1)
        return Conditioning(embeds.to(self.dtype), pooled.to(self.dtype), time_ids)

    def null_conditioning(self, batch: int) -> Conditioning:
        """The unconditional branch as the pipeline builds it (see the module doc), once, expanded to ``batch`` rows."""
        if self._null is None:
            self._null = self._encode_negative()
        return self._null.expand(batch)

    @torch.no_grad()
    def _encode_negative(self) -> Conditioning:
        """The pipeline's own negative embeddings for an empty prompt (``negative_prompt=None``)."""
        if self.family == "sd15":
            _, negative = self.pipe.encode_prompt([""], self.device, 1, do_classifier_free_guidance=True)
            return Conditioning(negative.to(self.dtype))
        _, negative, _, negative_pooled = self.pipe.encode_prompt(
            [""], device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=True)
        return Conditioning(negative.to(self.dtype), negative_pooled.to(self.dtype), self.add_time_ids())

    def add_time_ids(self) -> torch.Tensor:
        """SDXL micro-conditioning: original size (res, res), crop (0, 0), target size (res, res)."""
        r = self.resolution
        ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=self.dtype, device=self.device)
        expected = self.unet.add_embedding.linear_1.in_features
        pooled_dim = self.pipe.text_encoder_2.config.projection_dim
        passed = self.unet.config.addition_time_embed_dim * ids.shape[1] + pooled_dim
        if expected != passed:
            raise ConfigError(f"the SDXL UNet expects {expected} added-embedding features, the encoders give {passed}")
        return ids

    # ------------------------------------------------------------------ model calls
    def timestep(self, t: int | torch.Tensor) -> torch.Tensor:
        """``t`` as a 0-d int64 tensor on the device, created once per value (no copy per call)."""
        if isinstance(t, torch.Tensor):
            return t
        cached = self._timesteps.get(int(t))
        if cached is None:
            cached = self._timesteps[int(t)] = torch.tensor(int(t), dtype=torch.int64, device=self.device)
        return cached

    def unet_call(self, latents: torch.Tensor, t: int | torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The noise prediction for ``latents`` at timestep ``t`` (rows of ``latents`` match ``cond``).

        Under ``torch.no_grad`` the call goes to ``nograd_unet`` when one is set.
        """
        added = None
        if cond.pooled is not None:
            added = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
        unet = self.unet
        if self.nograd_unet is not None and not torch.is_grad_enabled():
            unet = self.nograd_unet
        out = unet(latents.to(self.dtype), self.timestep(t), encoder_hidden_states=cond.prompt_embeds,
                   added_cond_kwargs=added, return_dict=False)[0]
        return out.float()

    def enable_decode_checkpointing(self) -> int:
        """Checkpoint the VAE decoder layer by layer (:func:`checkpoint_decoder_layers`); returns the layer count."""
        return checkpoint_decoder_layers(self.vae)

    def decode(self, latents: torch.Tensor, unit_range: bool | None = None, clamp: bool = False) -> torch.Tensor:
        """:func:`decode_latents` with this backbone's VAE, with autograd.

        ``unit_range`` overrides the backbone's ``decode_to_unit_range`` (validation images always want [0, 1]).
        """
        unit = self.decode_to_unit_range if unit_range is None else unit_range
        return decode_latents(self.vae, latents, unit_range=unit, clamp=clamp)

    def latent_shape(self, resolution: int | None = None) -> tuple[int, int, int]:
        res = resolution or self.resolution
        return (int(self.unet.config.in_channels), res // self.vae_scale, res // self.vae_scale)


def decode_latents(vae, latents: torch.Tensor, *, unit_range: bool = True, clamp: bool = False) -> torch.Tensor:
    """Scaled latents ``[B, C, h, w]`` -> float32 images ``[B, 3, H, W]`` on the VAE's device: the one
    latent-to-image decoder (trainer, validation grids, gan_gt's preview, the masks stage).

    Undoes the scaling the pipelines apply, as diffusers' pipelines do: ``z * latents_std /
    scaling_factor + latents_mean`` when the VAE config has ``latents_mean``/``latents_std`` (SDXL
    style), else ``z / scaling_factor``, then ``+ shift_factor`` when the config has one. Decodes in
    fp32 when the config sets ``force_upcast`` and the VAE would run in fp16 (its weights, or an fp16
    autocast around the call): the SDXL VAE overflows in fp16. As in ``StableDiffusionXLPipeline``
    this is fp16 only (bf16 has fp32's range); unlike it, the VAE stays in fp32 afterwards (moved in
    place once, not back and forth each call). Autograd flows through unless the caller disables it.
    ``unit_range``: [0, 1] (``image / 2 + 0.5``), else the VAE's [-1, 1]; ``clamp``: clip to that range.
    """
    config = vae.config
    device = next(vae.parameters()).device
    z = latents.to(device, torch.float32)
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        z = z * std / config.scaling_factor + mean
    else:
        z = z / config.scaling_factor
    shift = getattr(config, "shift_factor", None)
    if shift is not None:
        z = z + shift
    upcast = _needs_upcast(vae, device)
    if upcast and next(vae.parameters()).dtype != torch.float32:
        vae.to(torch.float32)
    with torch.autocast(device.type, enabled=False) if upcast else nullcontext():
        image = vae.decode(z.to(next(vae.parameters()).dtype), return_dict=False)[0].float()
    if unit_range:
        image = image / 2 + 0.5
    if clamp:
        image = image.clamp(0, 1) if unit_range else image.clamp(-1, 1)
    return image


def _needs_upcast(vae, device: torch.device) -> bool:
    """``force_upcast`` set and the decode would run in fp16 (fp16 weights, or inside an fp16 autocast)."""
    if not getattr(vae.config, "force_upcast", False):
        return False
    if next(vae.parameters()).dtype == torch.float16:
        return True
    return torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.float16


def checkpoint_decoder_layers(vae) -> int:
    """Gradient-checkpoint every resnet, attention and upsampler of ``vae.decoder`` (non-reentrant).

    Only the layers' inputs are kept for backward, and each layer's activations are recomputed
    there, one layer at a time. diffusers' own ``enable_gradient_checkpointing`` works per block; at
    512 px its last up block alone re-creates 5.75 GiB (bf16, batch 4) in backward, the largest
    single layer 2.75 GiB (``benchmarks/train_step.py --memory-estimate``). The recomputation is the
    same forward either way (about one extra decoder forward). The layers' ``forward`` is wrapped
    on the instance, so the module tree and the state dict are unchanged; the VAE is frozen, only
    the latents get gradients. Without autograd (validation, ``torch.no_grad``) the plain forward runs.
    """
    from torch.utils.checkpoint import checkpoint

    decoder = vae.decoder
    layers = []
    for block in [decoder.mid_block, *decoder.up_blocks]:
        for group in ("resnets", "attentions", "upsamplers"):
            layers += [m for m in (getattr(block, group, None) or []) if m is not None]
    for layer in layers:
        if getattr(layer, "_comat_checkpointed", False):
            continue
        forward = layer.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        layer.forward = checkpointed
        layer._comat_checkpointed = True
    return len(layers)

