"""The reward-descent probe (benchmarks/shapes_reward_descent.py) and the verdict pilot it can follow.

The probe follows the captioner's gradient into the initial noise of the frozen evaluation sampler.
Its figures mean something only if its differentiable sampler is the evaluation's sampler (the
diffusers pipeline with the same seeds) and the gradient reaches the noise; and its colour-swap
control must not ask for the same scene when both objects share a shape.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCHMARKS = str(Path(__file__).parents[1] / "benchmarks")


def _benchmark(name: str):
    """Import a benchmark script as a module (fresh), with the benchmarks folder on the path while in use."""
    sys.path.insert(0, BENCHMARKS)
    sys.modules.pop(name, None)
    yield importlib.import_module(name)
    sys.path.remove(BENCHMARKS)


@pytest.fixture(scope="module")
def probe():
    yield from _benchmark("shapes_reward_descent")


@pytest.fixture(scope="module")
def pipe():
    from comat_core.worlds.shapes import PRETRAINED
    from comat_core.worlds.shapes.measure import load_base

    pipe = load_base(PRETRAINED / "base")
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    return pipe


PROMPTS = ["a red circle and a blue square", "a green triangle and a yellow diamond"]


def test_the_probe_samples_what_the_evaluation_samples(probe, pipe):
    from comat_core.worlds.shapes.measure import generate

    seeds = [10_000, 10_001]
    sampler = probe.FrozenSampler(pipe, PROMPTS, seeds, steps=4, guidance=7.5)
    with torch.no_grad():
        mine = probe.to_uint8(sampler.image(sampler.latent(sampler.x_T)))
    reference = generate(pipe, PROMPTS, seeds, steps=4, guidance=7.5)
    assert mine.shape == reference.shape
    assert np.abs(mine.astype(int) - reference.astype(int)).max() <= 1  # float rounding only


def test_the_captioner_gradient_reaches_the_initial_noise(probe, pipe):
    from comat_core.method.losses.concept import ConceptActivationLoss
    from comat_core.models.loader import load_captioner
    from comat_core.worlds.shapes import PRETRAINED
    from comat_core.worlds.shapes.captioner import LABEL_SMOOTHING, PREFIX

    model, processor = load_captioner(str(PRETRAINED / "captioner"))
    loss_fn = ConceptActivationLoss(model, processor, prefix=PREFIX, label_smoothing=LABEL_SMOOTHING)
    sampler = probe.FrozenSampler(pipe, PROMPTS, [0, 1], steps=3, guidance=7.5)
    x = sampler.x_T.clone().requires_grad_(True)
    loss_fn(sampler.image(sampler.latent(x)), PROMPTS, torch.Generator().manual_seed(0)).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert (x.grad.flatten(1).norm(dim=1) > 0).all()  # each image's noise gets its own gradient


def test_the_swap_control_exchanges_colours_and_skips_same_shape_pairs(probe):
    assert probe.swapped("a red circle and a blue square") == "a blue circle and a red square"
    assert probe.swapped("a red circle and a blue circle") is None


@pytest.fixture(scope="module")
def verdict():
    yield from _benchmark("shapes_verdict_pilot")


def test_the_verdict_pilot_labels_what_the_judge_reads_and_its_reward_reaches_the_image(verdict):
    """Its labels are the judge's reading of a render (the scene's pairs); its reward is the BCE against
    the prompt's pairs, with a gradient on the image, and lower for the prompt the image's labels name."""
    from comat_core.worlds.shapes.render import render, sample_scene
    from comat_core.worlds.shapes.verdict import INDEX, VerdictLoss, VerdictNet, labels

    scene = sample_scene(np.random.default_rng(3), [("red", "circle"), ("blue", "square")])
    image = render(scene)[0]
    assert sorted(verdict.reading(image)) == [("blue", "square"), ("red", "circle")]
    target = labels([verdict.reading(image)])
    assert target.sum() == 2 and target[0, INDEX[("red", "circle")]] == 1

    torch.manual_seed(0)
    net = VerdictNet(width=8)
    with torch.no_grad():  # a net that outputs exactly the labels' logits (+/-6) for every image
        net.head.weight.zero_()
        net.head.bias.copy_(target[0] * 12 - 6)
    loss_fn = VerdictLoss(net)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(255).requires_grad_(True)
    right = loss_fn(x, ["a red circle and a blue square"])
    swapped = loss_fn(x, ["a blue circle and a red square"])
    assert right < swapped
    net.head.weight.data.normal_()
    loss_fn(x, ["a red circle and a blue square"]).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
