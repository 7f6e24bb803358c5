"""The three CoMat objectives: concept activation, attribute concentration, fidelity preservation."""

from comat_core.method.losses.attribute import (
    EntityTarget,
    attribute_concentration_loss,
    pixel_loss,
    resize_mask_bilinear_any,
    token_loss,
)
from comat_core.method.losses.concept import ConceptActivationLoss, next_token_loss, smoothed_cross_entropy
from comat_core.method.losses.fidelity import discriminator_gan_loss, generator_gan_loss

__all__ = [
    "ConceptActivationLoss",
    "EntityTarget",
    "attribute_concentration_loss",
    "discriminator_gan_loss",
    "generator_gan_loss",
    "next_token_loss",
    "pixel_loss",
    "resize_mask_bilinear_any",
    "smoothed_cross_entropy",
    "token_loss",
]
