"""The shapes world's build settings (``WorldConfig``) and version, apart from the build so that
``measure`` and the ``world`` stage read them without importing the trainers."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from comat_core.worlds.shapes.render import IMAGE_SIZE, SIZE_RANGES

WORLD_VERSION = 3  # bump when the world's rendering or recipe changes meaning

class WorldConfig(BaseModel):
    """Sizes, steps and seeds of a world build (defaults: version 3, about 2.5-3 hours on one core at one
    thread: the shipped world is copied, so users never pay it).

    Version 3 (the defaults): 16x16 latents (a VAE with two downsamplings), objects of 16-26 px,
    every colour-shape pair equally common, loose multi-object captions (``swap_p``) and a text
    encoder trained with the UNet for ``freeze_text_after`` steps, then frozen while the UNet goes on
    (as CLIP is frozen while Stable Diffusion's UNet learns); then phase 3, ``refine_steps`` more
    steps of UNet and text encoder at ``refine_lr`` with a fresh schedule, which took held-out binding
    from 0.16 to 0.48 and shape recall from 0.57 to 0.78 (a second, lower-lr pilot: 0.37 / 0.74). ``WorldConfig.version2()`` is the
    previous world (8x8 latents, a Latin square of seen/rare/unseen pairs, exact captions).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(0, ge=0)
    threads: int = Field(1, ge=1, description="torch threads while training (part of what makes weights reproducible)")
    # what the world's images hold
    size_ranges: dict[str, tuple[float, float]] = Field(
        default_factory=lambda: {"small": (16.0, 20.0), "large": (22.0, 26.0)},
        description="box side range of each size word, pixels (version 2: 12-16 and 20-26)")
    pair_design: Literal["uniform", "latin"] = Field(
        "uniform", description="pair frequencies in the base model's data: uniform, or version 2's Latin square "
        "of seen/rare/unseen pairs")
    swap_p: float = Field(0.5, ge=0, le=1, description="probability that a multi-object training caption of the "
                          "base model attaches the colours to the wrong objects (0: exact captions)")
    # VAE (trained first, on renders of every pair)
    vae_images: int = Field(4000, ge=16)
    vae_steps: int = Field(1200, ge=1)
    vae_batch: int = Field(16, ge=1)
    vae_lr: float = Field(2e-3, gt=0)
    vae_widths: tuple[int, ...] = Field((16, 32, 32), description="one level per width: latents are "
                                        "64 / 2**(levels - 1) cells wide (version 2: four levels, 8x8)")
    # UNet + text encoder (latent diffusion on the base model's captions)
    base_images: int = Field(24000, ge=16)
    base_object_counts: tuple[float, float, float] = Field(
        (0.25, 0.6, 0.15), description="share of 1-, 2- and 3-object scenes in the base model's data (version 2: "
        "0.3/0.55/0.15)")
    unet_steps: int = Field(4000, ge=1, description="denoising steps in all (both phases)")
    freeze_text_after: int | None = Field(
        1500, ge=0, description="train the text encoder with the UNet for this many steps, then freeze it and "
        "train the UNet alone (None: jointly throughout, version 2)")
    refine_steps: int = Field(2500, ge=0, description="phase 3 (0: none): after both phases the UNet goes on from "
                              "their EMA weights for this many more steps at refine_lr, with a fresh schedule "
                              "(the shipped world: 2500 at 1e-3 with the text encoder)")
    refine_lr: float = Field(1e-3, gt=0)
    refine_text: bool = Field(True, description="phase 3 trains the text encoder too (False: it stays frozen)")
    unet_batch: int = Field(64, ge=1)
    unet_lr: float = Field(1e-3, gt=0)
    unet_widths: tuple[int, ...] = (32, 64, 64)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    # captioner (uniform over all pairs, exact captions)
    captioner_images: int = Field(8000, ge=16)
    captioner_steps: int = Field(3000, ge=1)
    captioner_batch: int = Field(32, ge=1)
    captioner_lr: float = Field(1e-3, gt=0)
    captioner_hidden: int = Field(64, ge=8)
    captioner_layers: int = Field(2, ge=1)
    # prompts and measurement
    n_eval_prompts: int = Field(64, ge=1, description="held-out two-object evaluation prompts")
    probe_seeds: int = Field(4, ge=1, description="images per prompt when measuring the base model")
    probe_steps: int = Field(25, ge=1, description="sampling steps when measuring the base model")
    probe_guidance: float = Field(7.5, ge=0)
    captioner_probe: int = Field(400, ge=10, description="two-object renders for the captioner's binding")

    @property
    def latent_size(self) -> int:
        return IMAGE_SIZE // 2 ** (len(self.vae_widths) - 1)

    @classmethod
    def version2(cls, **overrides) -> "WorldConfig":
        """The version-2 world's recipe (8x8 latents, Latin-square pairs, exact captions, joint text encoder)."""
        values = dict(size_ranges={k: tuple(map(float, v)) for k, v in SIZE_RANGES.items()}, pair_design="latin",
                      swap_p=0.0, vae_widths=(16, 32, 32, 32), base_object_counts=(0.3, 0.55, 0.15), unet_steps=3200,
                      freeze_text_after=None, unet_widths=(32, 64), refine_steps=0)
        return cls(**{**values, **overrides})

    @model_validator(mode="after")
    def _phases(self) -> "WorldConfig":
        if self.freeze_text_after is not None and self.freeze_text_after > self.unet_steps:
            raise ValueError(f"freeze_text_after ({self.freeze_text_after}) exceeds unet_steps ({self.unet_steps})")
        return self

    @field_validator("size_ranges")
    @classmethod
    def _sizes(cls, value: dict) -> dict:
        if set(value) != {"small", "large"} or any(not 4 <= lo <= hi <= 30 for lo, hi in value.values()):
            raise ValueError("size_ranges needs 'small' and 'large', each (low, high) with 4 <= low <= high <= 30 px")
        return value

    @field_validator("base_object_counts")
    @classmethod
    def _shares(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(value) < 0 or sum(value) <= 0:
            raise ValueError("shares of 1-, 2- and 3-object scenes must be >= 0 with a positive sum")
        return value

    @classmethod
    def smoke(cls, **overrides) -> "WorldConfig":
        """A tiny build for CI: every part runs, nothing is expected to be good."""
        values = dict(vae_images=64, vae_steps=3, vae_batch=8, base_images=64, unet_steps=3, freeze_text_after=2,
                      unet_batch=8, refine_steps=2,
                      captioner_images=64, captioner_steps=3, captioner_batch=8, n_eval_prompts=4, probe_seeds=1,
                      probe_steps=2, captioner_probe=10)
        return cls(**{**values, **overrides})
