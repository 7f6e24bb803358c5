"""The world's captioner: a tiny BLIP trained from scratch on renders, uniform over every (colour, shape) pair.

It is the class and folder the concept loss uses (``BlipForConditionalGeneration`` + ``BlipProcessor``,
loaded by ``models.loader.load_captioner``), trained with exactly that loss: the label-smoothed
caption cross-entropy of ``"a photography of " + caption`` on the concept loss's own differentiable
preprocessing (random 0-2 px crop, bicubic resize, CLIP normalisation). So what it learns is what
CoMat's concept loss asks of a generated image.

``binding_accuracy`` is its own binding: on two-object renders with two different colours and two
different shapes, how often the true caption has a lower loss than the same caption with the two
colours swapped ("a red circle and a blue square" vs "a blue circle and a red square"). The method
can only transfer what the captioner knows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from comat_core.method.losses.concept import ConceptActivationLoss, next_token_loss
from comat_core.models.tiny import _blip_config, _blip_processor  # the tiny zoo's BLIP, reused as is
from comat_core.worlds.shapes.base_model import Progress, _quiet
from comat_core.worlds.shapes.render import sample_scene, render
from comat_core.worlds.shapes.splits import all_pairs, two_object_prompt

PREFIX = "a photography of "  # the concept loss's prefix
LABEL_SMOOTHING = 0.1  # the concept loss's label smoothing


def to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> float ``[N, 3, H, W]`` in [0, 1] (what the concept loss takes)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)


def build_captioner(seed: int, hidden: int = 64, layers: int = 3):
    """A BLIP captioner with the tiny zoo's tokenizer and image size, ``hidden`` wide and ``layers`` deep."""
    from transformers import BlipForConditionalGeneration

    processor = _blip_processor()
    config = _blip_config(processor.tokenizer)
    for sub in (config.text_config, config.vision_config):
        sub.hidden_size, sub.intermediate_size = hidden, 2 * hidden
        sub.num_hidden_layers = layers
        sub.initializer_range = hidden**-0.5
    config.text_config.encoder_hidden_size = hidden
    torch.manual_seed(seed)
    return BlipForConditionalGeneration(config), processor


def per_sample_loss(loss: ConceptActivationLoss, images01: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """The concept loss of each (image, caption) pair (no crop: offsets 0), shape ``[B]``."""
    saved, loss.crop_max = loss.crop_max, 0
    try:
        pixels = loss.preprocess(images01)
    finally:
        loss.crop_max = saved
    ids, mask, labels = loss.tokenize(captions)
    logits = loss.model(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits
    return torch.stack([next_token_loss(logits[i : i + 1], labels[i : i + 1], loss.label_smoothing)
                        for i in range(len(captions))])


def _training_loss(loss_fn: ConceptActivationLoss, images01: torch.Tensor, captions: list[str],
                   generator: torch.Generator) -> torch.Tensor:
    """The concept loss, computed on the scored positions only (the same value, about twice as fast:
    the log-softmax over the vocabulary dominates the step)."""
    pixels = loss_fn.preprocess(images01, generator)
    ids, mask, labels = loss_fn.tokenize(captions, images01.device)
    logits = loss_fn.model(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits[:, :-1]
    target = labels[:, 1:]
    scored = target != -100
    return F.cross_entropy(logits[scored].float(), target[scored], label_smoothing=loss_fn.label_smoothing)


def train_captioner(model, processor, images: np.ndarray, captions: list[str], *, steps: int, batch_size: int,
                    lr: float, seed: int, device: str = "cpu", progress: Progress = _quiet,
                    augment: Callable[[torch.Tensor, list[str], torch.Generator], torch.Tensor] | None = None) -> dict:
    """Train ``model`` in place with the concept loss on (render, caption) pairs; returns metrics.

    ``device`` only moves the arithmetic (the crop offsets are drawn on the CPU either way).
    ``augment(images01, captions, generator)``: changes each batch's images before the loss, knowing
    their captions (None: the world's recipe, renders as they are)."""
    model.to(device)
    loss_fn = ConceptActivationLoss(model, processor, prefix=PREFIX, label_smoothing=LABEL_SMOOTHING)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    model.train()
    start, loss_avg = time.time(), None
    for step in range(steps):
        idx = rng.integers(0, len(images), batch_size)
        batch = to_unit(images[idx])
        texts = [captions[i] for i in idx]
        if augment is not None:
            batch = augment(batch, texts, gen)
        loss = _training_loss(loss_fn, batch.to(device), texts, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            progress("captioner", step + 1, steps, {"loss": round(loss_avg, 4)})
    model.eval().to("cpu")
    return {"captioner_loss": loss_avg, "captioner_seconds": time.time() - start}


def swap_test_set(n: int, seed: int) -> tuple[np.ndarray, list[str], list[str]]:
    """``n`` two-object renders (different colours, different shapes), true and colour-swapped captions."""
    rng = np.random.default_rng(seed)
    pairs = all_pairs()
    images, true, swapped = [], [], []
    while len(images) < n:
        a, b = (pairs[i] for i in rng.choice(len(pairs), 2, replace=False))
        if a[0] == b[0] or a[1] == b[1]:
            continue
        images.append(render(sample_scene(rng, [a, b]))[0])
        true.append(two_object_prompt(a, b))
        swapped.append(two_object_prompt((b[0], a[1]), (a[0], b[1])))
    return np.stack(images), true, swapped


@torch.no_grad()
def binding_accuracy(model, processor, n: int = 400, seed: int = 12345, batch_size: int = 50) -> float:
    """How often the true caption's loss is below the colour-swapped caption's (see the module docstring)."""
    images, true, swapped = swap_test_set(n, seed)
    loss_fn = ConceptActivationLoss(model, processor, prefix=PREFIX, label_smoothing=LABEL_SMOOTHING)
    wins = 0
    for i in range(0, n, batch_size):
        x = to_unit(images[i : i + batch_size])
        wins += int((per_sample_loss(loss_fn, x, true[i : i + batch_size])
                     < per_sample_loss(loss_fn, x, swapped[i : i + batch_size])).sum())
    return wins / n


@torch.no_grad()
def binding_on_images(model, processor, images: np.ndarray, batch_size: int = 50) -> float | None:
    """The captioner's binding on generated images: among ``images`` the judge reads as two clean objects
    of two different colours and two different shapes, how often the caption of what is drawn has a
    lower loss than the same caption with the colours swapped (None when no image qualifies)."""
    from comat_core.worlds.shapes.judge import segment

    kept, true, swapped = [], [], []
    for image in images:
        found = segment(image)
        if len(found) != 2 or any(f.shape is None for f in found):
            continue
        a, b = ((f.colour, f.shape) for f in found)
        if a[0] == b[0] or a[1] == b[1]:
            continue
        kept.append(image)
        true.append(two_object_prompt(a, b))
        swapped.append(two_object_prompt((b[0], a[1]), (a[0], b[1])))
    if not kept:
        return None
    loss_fn = ConceptActivationLoss(model, processor, prefix=PREFIX, label_smoothing=LABEL_SMOOTHING)
    wins = 0
    for i in range(0, len(kept), batch_size):
        x = to_unit(np.stack(kept[i : i + batch_size]))
        wins += int((per_sample_loss(loss_fn, x, true[i : i + batch_size])
                     < per_sample_loss(loss_fn, x, swapped[i : i + batch_size])).sum())
    return wins / len(kept)


def load_for_probe(path: Path):
    """A saved captioner folder as ``(model, processor)``, on the CPU, in eval mode."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    return BlipForConditionalGeneration.from_pretrained(path).eval(), BlipProcessor.from_pretrained(path)


def save_captioner(out_dir: Path, model, processor) -> Path:
    """A folder ``load_captioner`` reads (safetensors + processor files)."""
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return Path(out_dir)
