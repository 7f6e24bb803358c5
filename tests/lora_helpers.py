"""Shared test helper: give a fresh LoRA trained-like weights."""

import torch

from comat_core.models.lora import lora_named_parameters


def perturb_lora(unet, seed=0):
    """LoRA B starts at zero (so the LoRA is the identity and A gets no gradient); set B to small
    random values so the LoRA changes the function, as a trained one does."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora_named_parameters(unet).items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
