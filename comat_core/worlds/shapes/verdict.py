"""A verdict classifier for the shapes world: which colour-shape pairs an image shows, with a gradient.

The judge reads an image exactly but not differentiably; the captioner is differentiable but, on this
world, its gradient stops pointing at the right image long before the image is right. A *verdict* is a
small CNN distilled from the judge (``benchmarks/shapes_verdict_pilot.py`` trains one): one sigmoid per
colour-shape pair, "the judge finds this pair in the image". Its reward for a prompt is the binary
cross-entropy against the prompt's pairs (present) and every other pair (absent), so its minimum is
what the judge calls right. ``VerdictLoss`` has the captioner loss's call signature, so the trainer
can use it as the concept term (``train.losses.concept_reward: shapes_verdict`` with
``models.verdict`` naming the folder). It is a diagnostic of where CoMat's signal is lost, not CoMat:
real prompts have no judge to distil.

A verdict folder holds ``verdict.safetensors`` (the weights) and ``verdict.json`` (``width``, and the
pilot's training record).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from comat_core.errors import InputError
from comat_core.worlds.shapes.splits import all_pairs
from comat_core.worlds.shapes.vocab import parse_prompt

PAIRS = all_pairs()
INDEX = {pair: i for i, pair in enumerate(PAIRS)}
WEIGHTS, RECORD = "verdict.safetensors", "verdict.json"


class VerdictNet(nn.Module):
    """Four convolutions (three strided) and a linear head: an image in [0, 1] -> one logit per pair."""

    def __init__(self, width: int = 48):
        super().__init__()
        layers, channels = [], 3
        for out, stride in ((width, 1), (width, 2), (2 * width, 2), (2 * width, 2)):
            layers += [nn.Conv2d(channels, out, 3, stride, 1), nn.GroupNorm(8, out), nn.SiLU()]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, len(PAIRS))

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images01 * 2 - 1).mean(dim=(2, 3)))


def labels(readings: list[list[tuple[str, str]]]) -> torch.Tensor:
    """Multi-hot ``[N, len(PAIRS)]``: the pairs each image shows."""
    out = torch.zeros(len(readings), len(PAIRS))
    for row, pairs in enumerate(readings):
        for pair in pairs:
            out[row, INDEX[pair]] = 1.0
    return out


class VerdictLoss:
    """``loss(images01, prompts, generator) -> scalar``: the verdict's BCE against each prompt's pairs.

    The classifier is frozen; it follows the images to their device on first use."""

    def __init__(self, model: VerdictNet):
        self.model = model

    def __call__(self, images01: torch.Tensor, prompts: list[str], generator=None) -> torch.Tensor:
        if next(self.model.parameters()).device != images01.device:
            self.model.to(images01.device)
        target = labels([parse_prompt(p).pairs() for p in prompts]).to(images01.device)
        return F.binary_cross_entropy_with_logits(self.model(images01.float()), target)


def load_verdict(folder: str | Path) -> VerdictNet:
    """The frozen classifier saved in ``folder`` (``WEIGHTS`` and ``RECORD``); a one-line error if absent."""
    from safetensors.torch import load_file

    folder = Path(folder)
    missing = [name for name in (WEIGHTS, RECORD) if not (folder / name).is_file()]
    if missing:
        raise InputError(f"models.verdict={folder} lacks {', '.join(missing)}: train one with "
                         "benchmarks/shapes_verdict_pilot.py OUT and point models.verdict at OUT")
    model = VerdictNet(int(json.loads((folder / RECORD).read_text())["width"]))
    model.load_state_dict(load_file(folder / WEIGHTS))
    return model.eval().requires_grad_(False)
