"""The one latent-to-image decoder (``models.backbones.decode_latents``, ``Backbone.decode``).

Pinned against the two decoders it replaced, on the tiny SD1.5 VAE and the shapes world's shipped VAE
in fp32 (bitwise), for an SD1.5-like config and an SDXL-like one with ``latents_mean``/``latents_std``;
and ``force_upcast``: an fp16 VAE (or an fp16 autocast around an fp32 one) decodes in fp32, as
diffusers' SDXL pipeline does, while a VAE that does not ask for it stays in fp16.
"""

import copy

import pytest
import torch

from comat_core.models.backbones import Backbone, decode_latents
from comat_core.models.loader import load_vae
from comat_core.worlds.shapes import PRETRAINED


def previous_stage_decode(vae, latents):
    """The masks stage's and previews' former decoder (``gan_gt.decode_latents``), fp32 path."""
    config = vae.config
    z = latents.to(torch.float32)
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1)
        z = z * std / config.scaling_factor + mean
    else:
        z = z / config.scaling_factor
    image = vae.decode(z, return_dict=False)[0].float()
    return (image / 2 + 0.5).clamp(0, 1)


def previous_backbone_decode(vae, latents):
    """The trainer's former decoder (``Backbone.decode``): scaling and shift factor only, no clamp."""
    z = latents / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None) is not None:
        z = z + vae.config.shift_factor
    return vae.decode(z, return_dict=False)[0].float() / 2 + 0.5


@pytest.fixture(scope="module")
def sd15():
    return Backbone.load("tiny://sd15", "sd15", 64)


@pytest.fixture(scope="module", params=["tiny", "shapes"])
def vae(request, sd15):
    if request.param == "tiny":
        return sd15.vae
    return load_vae(str(PRETRAINED / "base"), torch.float32, "cpu", pipeline=True)


def sdxl_like(vae):
    """A copy of ``vae`` whose config carries per-channel latents_mean/latents_std (as SDXL-style VAEs do)."""
    other = copy.deepcopy(vae)
    other.register_to_config(latents_mean=[0.1, -0.2, 0.3, 0.05], latents_std=[0.9, 1.1, 0.8, 1.2])
    return other


LATENTS = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 2


@torch.no_grad()
def test_decoder_equals_the_previous_decoders_in_fp32(vae):
    assert vae.config.latents_mean is None and vae.config.shift_factor is None  # the SD1.5-like case
    assert torch.equal(decode_latents(vae, LATENTS, clamp=True), previous_stage_decode(vae, LATENTS))
    assert torch.equal(decode_latents(vae, LATENTS), previous_backbone_decode(vae, LATENTS))
    xl = sdxl_like(vae)
    image = decode_latents(xl, LATENTS, clamp=True)
    assert torch.equal(image, previous_stage_decode(xl, LATENTS))
    assert not torch.equal(image, previous_stage_decode(vae, LATENTS))  # the mean/std are honoured
    raw = decode_latents(xl, LATENTS, unit_range=False, clamp=True)
    assert raw.min() >= -1 and raw.max() <= 1 and torch.equal(raw / 2 + 0.5, image)


def test_backbone_decode_is_the_one_decoder_with_autograd(sd15):
    z = LATENTS.clone().requires_grad_()
    image = sd15.decode(z)
    with torch.no_grad():
        assert torch.equal(image, previous_backbone_decode(sd15.vae, LATENTS))
        assert torch.equal(sd15.decode(z, clamp=True), decode_latents(sd15.vae, LATENTS, clamp=True))
    image.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def conv_in_dtypes(vae):
    """Record the dtype the decoder's first convolution computes in (its output's dtype)."""
    seen = []
    vae.decoder.conv_in.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


@torch.no_grad()
def test_force_upcast_decodes_an_fp16_vae_in_fp32(sd15):
    fp16 = copy.deepcopy(sd15.vae).to(torch.float16)
    reference = copy.deepcopy(fp16).to(torch.float32)  # the same (fp16-rounded) weights in fp32
    assert fp16.config.force_upcast
    seen = conv_in_dtypes(fp16)
    image = decode_latents(fp16, LATENTS, clamp=True)
    assert seen == [torch.float32] and next(fp16.parameters()).dtype == torch.float32  # upcast in place, once
    assert torch.equal(image, previous_stage_decode(reference, LATENTS))

    fp32 = copy.deepcopy(reference)
    seen = conv_in_dtypes(fp32)
    with torch.autocast("cpu", dtype=torch.float16):  # the trainer decodes inside accelerate's autocast
        image = decode_latents(fp32, LATENTS, clamp=True)
    assert seen == [torch.float32] and torch.equal(image, previous_stage_decode(reference, LATENTS))


@torch.no_grad()
def test_without_force_upcast_an_fp16_vae_stays_fp16(sd15):
    fp16 = copy.deepcopy(sd15.vae).to(torch.float16)
    fp16.register_to_config(force_upcast=False)
    seen = conv_in_dtypes(fp16)
    image = decode_latents(fp16, LATENTS)
    assert seen == [torch.float16] and next(fp16.parameters()).dtype == torch.float16
    assert image.dtype == torch.float32
    fp32 = copy.deepcopy(sd15.vae)  # force_upcast set, but bf16 has fp32's range: no upcast, as in diffusers
    seen = conv_in_dtypes(fp32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decode_latents(fp32, LATENTS)
    assert seen == [torch.bfloat16]
