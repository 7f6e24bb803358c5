"""Data parallelism without DDP: the LoRA gradients and the step's logs averaged over processes.

Distributed data parallel runs under ``accelerate launch``: the models are not wrapped in DDP (the
UNet is called dozens of times per step, which DDP's once-per-forward gradient hooks do not handle),
the LoRA gradients are averaged explicitly after the backward passes instead. accelerate provides the
process group, the device and the collectives. Both functions are no-ops with one process.
"""

from __future__ import annotations

import torch


def average_gradients(accelerator, params: list[torch.nn.Parameter], bucket_elements: int = 2**24) -> None:
    """Mean of the gradients over processes, in flat buckets of about ``bucket_elements`` (no-op with one process)."""
    if accelerator.num_processes == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    buckets: list[list[torch.Tensor]] = [[]]
    size = 0
    for p in params:
        if buckets[-1] and size + p.numel() > bucket_elements:
            buckets.append([])
            size = 0
        buckets[-1].append(p.grad)
        size += p.numel()
    for bucket in buckets:
        flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in bucket]), reduction="mean")
        for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
            g.copy_(part.view_as(g))


def mean_over_processes(accelerator, logs: dict[str, float]) -> dict[str, float]:
    """Loss and gradient values averaged over the data-parallel processes (what one global step saw)."""
    if accelerator.num_processes == 1:
        return logs
    keys = sorted(logs)
    values = torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    values = accelerator.reduce(values, reduction="mean")
    return dict(zip(keys, values.tolist()))
