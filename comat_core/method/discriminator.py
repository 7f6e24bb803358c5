"""The latent discriminator of fidelity preservation (docs/method.md §5).

A UNet of the SD1.5 architecture (initialised from ``models.discriminator``, its ``unet``) with its
own LoRA and a per-latent-pixel ``Linear(4 -> 1)`` head on the UNet output. It is conditioned on
the null-text embedding (the empty prompt through the discriminator model's own text encoder,
computed once; the text encoder and VAE are then dropped) and queried at a fixed timestep
(``train.discriminator.timestep``, 1) on clean latents. For SDXL generators it is still the
SD1.5-architecture UNet: SDXL latents have the same 4 channels.

``forward(z)`` returns per-pixel logits ``[B, h, w, 1]`` ("real" = ground-truth latent).
"""

from __future__ import annotations

import torch
from torch import nn

from comat_core.models.lora import add_lora, load_lora_state_dict, lora_state_dict


class LatentDiscriminator(nn.Module):
    def __init__(self, unet: nn.Module, null_embeds: torch.Tensor, timestep: int, lora_rank: int,
                 target_modules: list[str]):
        super().__init__()
        self.unet = unet
        self.weight_dtype = next(unet.parameters()).dtype
        self.lora_parameters = add_lora(unet, lora_rank, lora_rank, target_modules)
        channels = int(unet.config.out_channels)
        self.head = nn.Linear(channels, 1).to(device=null_embeds.device, dtype=torch.float32)
        self.register_buffer("null_embeds", null_embeds.to(self.weight_dtype), persistent=False)
        self.timestep = int(timestep)
        # a device tensor: a Python int makes diffusers copy it to the device (a sync) on every call
        self.register_buffer("timestep_tensor", torch.tensor(self.timestep, device=null_embeds.device),
                             persistent=False)

    @classmethod
    def load(cls, name: str, *, timestep: int, lora_rank: int, target_modules: list[str],
             dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "LatentDiscriminator":
        """Build from an SD1.5-architecture pipeline (Hub id, path or tiny://): its UNet and null text."""
        from comat_core.models.loader import load_sd_pipeline

        pipe = load_sd_pipeline(name, "sd15", dtype=dtype, device=device, field="models.discriminator")
        with torch.no_grad():
            null, _ = pipe.encode_prompt([""], torch.device(device), 1, do_classifier_free_guidance=False)
        unet = pipe.unet
        del pipe  # text encoder, VAE and tokenizer are not needed any more
        return cls(unet, null, timestep, lora_rank, target_modules)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.lora_parameters) + list(self.head.parameters())

    def set_trainable(self, flag: bool) -> None:
        """Generator side: frozen (gradients flow through D into the latents only); D step: trainable."""
        for p in self.trainable_parameters():
            p.requires_grad_(flag)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        batch = latents.shape[0]
        cond = self.null_embeds.expand(batch, *self.null_embeds.shape[1:])
        out = self.unet(latents.to(self.weight_dtype), self.timestep_tensor, encoder_hidden_states=cond,
                        return_dict=False)[0]
        return self.head(out.float().permute(0, 2, 3, 1))

    # ------------------------------------------------------------------ checkpoint state
    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        state = {f"lora.{k}": v for k, v in lora_state_dict(self.unet).items()}
        state.update({f"head.{k}": v.detach().clone() for k, v in self.head.state_dict().items()})
        return state

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        load_lora_state_dict(self.unet, {k[5:]: v for k, v in state.items() if k.startswith("lora.")})
        self.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
