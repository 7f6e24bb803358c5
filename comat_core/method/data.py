"""The training data: what the train stage gives the trainer, and the order the trainer visits it in.

``TrainingSources`` (built by ``stages/train/inputs.py``) holds the prompt records and the readers of
the stages before train; ``PromptOrder`` is the seeded, epoch-wise data order; ``TrainingData`` turns
prompt indices into a micro-batch's ``StepInputs``. Token positions come stored with each entity (the
prompts stage aligns them for the configured tokenizer), so nothing here reads text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from comat_core.errors import InputError
from comat_core.method.losses.attribute import EntityTarget


@dataclass
class TrainingSources:
    """What the train stage reads: prompt records that have ground-truth latents, and the readers.

    Built in one place (``stages/train/inputs.training_sources``, from ``train.noise`` and
    ``train.masks``); the trainer reads only which readers are there. Every reader takes prompt ids
    and, per id, a gan_gt sample index (``gan_gt.samples_per_prompt``): ``gt_latents(prompt_ids,
    samples) -> Tensor[N, 4, h, w]``; ``seeds(prompt_ids, samples)``: the gan_gt seed of each sample,
    whose noise every sample replays (None: fresh noise at every step); ``entity_masks(prompt_ids,
    resolution, samples) -> list[list[EntityMask]]`` (offline masks, or None); ``samples(prompt_id)``:
    the sample indices stored for a prompt. ``segment(images, records, resolution)`` segments online
    images into, per image, its ``EntityMask`` list at ``resolution`` (online masks, or None).
    ``concept(images01, prompts, generator) -> scalar``: a concept term in place of the captioner's
    (the shapes world's judge oracle, ``train.losses.concept_reward: shapes_judge``, or its verdict
    classifier, ``shapes_verdict``), or None.
    """

    prompts: list[dict]
    gt_latents: Callable[..., torch.Tensor]
    entity_masks: Callable[..., list[list[Any]]] | None = None
    seeds: Callable[[list[str], list[int]], list[int]] | None = None
    samples: Callable[[str], list[int]] | None = None
    segment: Callable[[torch.Tensor, list[dict], int], list[list[Any]]] | None = None
    concept: Callable[[torch.Tensor, list[str], torch.Generator], torch.Tensor] | None = None


@dataclass
class StepInputs:
    """One micro-batch: prompts, the gan_gt samples they replay, ground-truth latents, attribute targets."""

    prompt_ids: list[str]
    texts: list[str]
    gt_latents: torch.Tensor
    targets: list[list[EntityTarget]] | None = None
    samples: list[int] = field(default_factory=list)  # gan_gt sample index of each prompt
    seeds: list[int] | None = None  # gan_gt seed of each sample: its noise, replayed (None: fresh noise)
    records: list[dict] = field(default_factory=list)
    online_targets: Callable[[torch.Tensor], list[list[EntityTarget]]] | None = None  # online masks: image -> targets


class PromptOrder:
    """The data order: epoch e visits the prompts in the permutation seeded by (seed, e).

    ``take(position, count)`` gives the prompt indices at stream positions ``position .. +count``
    (crossing epochs as needed): a pure function, so resuming at a position needs no other state.
    """

    def __init__(self, n_prompts: int, seed: int):
        if n_prompts < 1:
            raise InputError("no training prompts have ground-truth latents; run the gan_gt stage on the prompts")
        self.n, self.seed = n_prompts, seed
        self._cache: tuple[int, list[int]] | None = None

    def permutation(self, epoch: int) -> list[int]:
        if self._cache is None or self._cache[0] != epoch:
            seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed)).tolist()
            self._cache = (epoch, perm)
        return self._cache[1]

    def take(self, position: int, count: int) -> list[int]:
        return [self.permutation(p // self.n)[p % self.n] for p in range(position, position + count)]

    def epochs(self, position: int, count: int) -> list[int]:
        """The epoch of each stream position ``position .. +count``."""
        return [p // self.n for p in range(position, position + count)]


class TrainingData:
    """Turns prompt indices into ``StepInputs``: texts, ground-truth latents, entity targets.

    Entity targets: for each entity with a mask (``EntityMask.entity_index`` into the prompt's
    ``entities``), the text-encoder token positions of its noun and attribute words (the entity's
    ``token_indices``, stored by the prompts stage) and its mask at ``mask_resolution``. Undetected
    entities are dropped (**Decision**) or, with ``drop_undetected=False``, supervised with an all-zero
    mask (the reference).
    """

    def __init__(self, sources: TrainingSources, mask_resolution: int, drop_undetected: bool = True,
                 with_targets: bool = True, seed: int = 0):
        self.sources = sources
        self.records = sources.prompts
        self.mask_resolution = mask_resolution
        self.drop_undetected = drop_undetected
        self.online = with_targets and sources.segment is not None
        self.with_targets = with_targets and sources.entity_masks is not None and not self.online
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    def visit_sample(self, index: int, epoch: int) -> int:
        """The gan_gt sample a visit of prompt ``index`` in ``epoch`` uses: the prompt's samples in turn, from a
        per-prompt offset, so every sample is used once per N epochs and one epoch mixes them across prompts."""
        samples = self.sources.samples(str(self.records[index]["prompt_id"])) if self.sources.samples else [0]
        offset = int(np.random.SeedSequence([self.seed, index]).generate_state(1)[0])
        return samples[(epoch + offset) % len(samples)]

    def inputs(self, indices: list[int], epochs: list[int] | None = None) -> StepInputs:
        records = [self.records[i] for i in indices]
        ids = [str(r["prompt_id"]) for r in records]
        samples = [self.visit_sample(i, e) for i, e in zip(indices, epochs or [0] * len(indices))]
        latents = self.sources.gt_latents(ids, samples)
        seeds = self.sources.seeds(ids, samples) if self.sources.seeds is not None else None
        targets = None
        if self.with_targets:
            masks = self.sources.entity_masks(ids, self.mask_resolution, samples)
            targets = [self._targets(r, m) for r, m in zip(records, masks)]
        online = (lambda images: self.online_targets(images, records)) if self.online else None
        return StepInputs(ids, [str(r["text"]) for r in records], latents, targets, samples, seeds, records, online)

    def online_targets(self, images: torch.Tensor, records: list[dict]) -> list[list[EntityTarget]]:
        """Attribute targets from segmenting ``images`` (the online images, detached) with ``sources.segment``."""
        masks = self.sources.segment(images.detach(), records, self.mask_resolution)
        return [self._targets(record, m) for record, m in zip(records, masks)]

    def _targets(self, record: dict, masks: list[Any]) -> list[EntityTarget]:
        out = []
        for m in masks:
            if not m.detected or m.mask is None:
                if self.drop_undetected:
                    continue
                mask = torch.zeros(self.mask_resolution, self.mask_resolution)
            else:
                mask = m.mask.float()
            tokens = self._token_indices(record, m.entity_index)
            if tokens:
                out.append(EntityTarget(tokens, mask))
        return out

    @staticmethod
    def _token_indices(record: dict, entity_index: int) -> list[int]:
        tokens = record["entities"][entity_index].get("token_indices")
        if tokens is None:
            raise InputError(f"prompt {record['prompt_id']}: its entities have no token_indices (a prompts stage "
                             "output from before they were stored); re-run the prompts stage")
        return list(tokens)
