"""Fidelity preservation: the GAN losses between online latents and the frozen model's latents (docs/method.md §5).

The discriminator outputs one logit per latent pixel. The generator is trained with the
non-saturating loss (its latents labelled real); the discriminator with binary cross-entropy on
the concatenation of generated latents (label 0) and ground-truth latents (label 1), averaged over
every logit of both, as the reference does (``BCEWithLogitsLoss`` on ``cat([fake, real])``).
Computed in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def generator_gan_loss(d_fake_logits: Tensor) -> Tensor:
    """Non-saturating generator loss: ``BCE_with_logits(D(z_online), 1)``, mean over all logits."""
    logits = d_fake_logits.float()
    return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))


def discriminator_gan_loss(d_fake_logits: Tensor, d_real_logits: Tensor) -> Tensor:
    """``BCE_with_logits`` over ``[D(z_online.detach()) -> 0, D(z_gt) -> 1]``, mean over all logits."""
    fake, real = d_fake_logits.float().reshape(-1), d_real_logits.float().reshape(-1)
    logits = torch.cat([fake, real])
    targets = torch.cat([torch.zeros_like(fake), torch.ones_like(real)])
    return F.binary_cross_entropy_with_logits(logits, targets)
