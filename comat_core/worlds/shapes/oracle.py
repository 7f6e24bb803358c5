"""An oracle reward for the shapes world: the judge's corrected image as a pixel target.

CoMat's concept activation asks a learned captioner how likely the prompt is given the image; when a
run lowers binding, the fault may lie in that reward (the captioner rewards images that are not
right) or in the optimisation path (gradients through the sampler into the LoRA, and what a LoRA
trained on some prompts does to others). This loss replaces the captioner by what the judge knows,
so the path can be tested with a reward that is right by construction.

For each generated image (detached) the judge finds its objects; each object the prompt names is
given a place: the largest found object of its colour, else the largest found object left, else
(none left, or that place would touch one already given) a free spot drawn from the prompt's seed. The
*target* is the world's renderer drawing the prompt's objects, with their right colours and shapes,
at those places (sides clamped to the world's object sizes). The loss is the mean squared error
between the image (in [0, 1], with its gradient) and the target: a right image is pulled to its clean
render, a wrong one toward the nearest right one. It has
``ConceptActivationLoss``'s call signature, so the trainer uses it in its place
(``train.losses.concept_reward: shapes_judge``). It is a diagnostic, not CoMat: real prompts have
no judge.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
from torch import Tensor

from comat_core.worlds.shapes.judge import Found, segment
from comat_core.worlds.shapes.render import IMAGE_SIZE, MARGIN, ObjectSpec, Scene, boxes_overlap, render
from comat_core.worlds.shapes.vocab import parse_prompt

MIN_SIDE, MAX_SIDE = 12.0, 26.0  # a target object's box side, pixels of a 64 px image (the world's object sizes)


def _placement(found: Found, colour: str, shape: str) -> ObjectSpec:
    """The prompt's object in a found object's bounding square, the side clamped to the world's object sizes."""
    x0, y0, x1, y1 = found.box
    side = float(np.clip(max(x1 - x0, y1 - y0), MIN_SIDE, MAX_SIDE))
    return ObjectSpec(shape, colour, "large", (x0 + x1) / 2, (y0 + y1) / 2, side)


def _free_spot(rng: np.random.Generator, size: int, taken: list, colour: str, shape: str) -> ObjectSpec:
    """The prompt's object at a random place whose box keeps the renderer's margin from the boxes ``taken``
    (smallest size if crowded)."""
    for attempt in range(200):
        side = MIN_SIDE if attempt >= 100 else float(rng.uniform(MIN_SIDE, MAX_SIDE))
        half = side / 2
        x, y = (float(rng.uniform(MARGIN + half, size - MARGIN - half)) for _ in range(2))
        spec = ObjectSpec(shape, colour, "large", x, y, side)
        if not boxes_overlap(spec.box(), taken):
            return spec
    raise RuntimeError("no free place for another object")  # pragma: no cover - three objects always fit


def target_scene(found: list[Found], prompt: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Scene:
    """The prompt's objects, right colour and shape, where the image's found objects stand (see the module).

    A found object's place is taken only if it keeps clear of the places already given (else a free
    spot), so the target's objects never touch and the judge reads it as right.
    """
    left = sorted(found, key=lambda f: -f.area)
    objects, taken = [], []
    for obj in parse_prompt(prompt).objects:
        pick = ([f for f in left if f.colour == obj.colour] or left or [None])[0]
        spec = None
        if pick is not None:
            left.remove(pick)
            spec = _placement(pick, obj.colour, obj.shape)
            if boxes_overlap(spec.box(), taken):
                spec = None
        spec = spec or _free_spot(rng, size, taken, obj.colour, obj.shape)
        taken.append(spec.box())
        objects.append(spec)
    return Scene(tuple(objects), size)


class JudgeTargetLoss:
    """``loss(images01, prompts, generator)``: mean squared error to the judge's corrected images (scalar).

    ``images01``: ``[B, 3, H, W]`` in [0, 1] with autograd (square, the world's 64 px or any size:
    the judge reads the image as it is). ``generator``: unused (the concept term's signature).

    Free spots come from the prompt's own seed, the same at every step (drawn afresh, a missing
    object's target would wander and the pull would go to their mean, an empty background), and a
    right image is pulled to its clean render (left alone, nothing would hold it). Neither saved a
    run at lr 1e-3 on the shapes preset: with or without them the objects were erased (held-out
    binding 0.44 -> 0.04-0.09). At lr 1e-4 the loss halves while the judge's verdicts on the trained
    images do not move: a pixel target is reached by moving and softening pixels, so this oracle is
    right at its minimum but is not a binding gradient (benchmarks/RESULTS.md section 9).
    """

    def __call__(self, images01: Tensor, prompts: list[str], generator: torch.Generator) -> Tensor:
        if images01.shape[-1] != images01.shape[-2]:
            raise ValueError(f"the shapes oracle needs square images, got {tuple(images01.shape[-2:])}")
        size = images01.shape[-1]
        images = images01.detach().float().cpu()
        targets = []
        for image, prompt in zip(images, prompts):
            rng = np.random.default_rng(zlib.crc32(prompt.encode()))  # the same free spots for a prompt at every step
            drawn = render(target_scene(segment(image), prompt, rng, size), size)[0]
            targets.append(torch.from_numpy(drawn).permute(2, 0, 1).float() / 255.0)
        target = torch.stack(targets).to(images01.device)
        return (images01.float() - target).square().mean()
