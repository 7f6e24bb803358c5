"""The ``train`` stage: CoMat fine-tuning of the configured model (METHOD.md §1-6).

Inputs: ``prompts`` (texts and entity spans), ``gan_gt`` (one ground-truth latent per prompt, the
discriminator's "real" data and the Mixed Latent start points), ``masks`` (per-entity object masks
for attribute concentration) and, for SDXL, ``sdxl_prefinetune`` (its ``unet/`` folder replaces the
generator's UNet). Trains on the prompts that have a ground-truth latent and writes
``checkpoints/``, ``samples/``, ``lora/`` and ``metrics.parquet`` (see ``trainer.py``). A rerun of
an interrupted stage resumes from its latest complete checkpoint. With ``train.num_processes > 1``
the training runs data parallel under ``accelerate launch`` and this stage waits (``train_launch.py``).
"""

from __future__ import annotations

from .errors import InputError
from .pipeline import StageContext
from .prefinetune import prefinetuned_unet
from .prompts import read_prompts
from .trainer import TrainingSources, train


def sources_from_inputs(ctx: StageContext) -> TrainingSources:
    """Prompt records that have ground-truth latents, with the latent and mask readers."""
    from .gan_gt import GanGtReader

    prompts = read_prompts(ctx.inputs["prompts"])
    gt = GanGtReader(ctx.inputs["gan_gt"])
    available = set(gt.prompt_ids())
    records = [p for p in prompts if str(p["prompt_id"]) in available]
    if not records:
        raise InputError("no prompt has a ground-truth latent in the gan_gt stage; rerun gan_gt with --force")
    entity_masks = None
    if "masks" in ctx.inputs:
        from .masks.reader import MaskReader

        entity_masks = MaskReader(ctx.inputs["masks"]).entity_masks
    return TrainingSources(records, gt.latents, entity_masks)


def run(ctx: StageContext) -> dict:
    """Stage entry point: in this process, or under ``accelerate launch`` with ``train.num_processes > 1``."""
    from .train_launch import launched, run_launched

    if launched(ctx.cfg):
        return run_launched(ctx)
    return train_in_process(ctx)


def train_in_process(ctx: StageContext) -> dict:
    """Train in this process (alone, or as one process of a launched group; see train_launch.py)."""
    sources = sources_from_inputs(ctx)
    return train(ctx.cfg, sources, ctx.writer, ctx.scratch(), progress=ctx.progress, hooks=trainer_hooks(ctx.hooks),
                 unet_override=prefinetuned_unet(ctx))


def trainer_hooks(hooks: dict) -> dict:
    """Stage hooks → trainer hooks. ``fail_after_step: k`` (tests; plain data, so it also reaches launched
    processes) becomes an ``after_step`` hook that raises once step k's checkpoint is written."""
    out = dict(hooks)
    fail_after = out.pop("fail_after_step", None)
    if fail_after is not None and "after_step" not in out:
        def after_step(step: int) -> None:
            if step == int(fail_after):
                raise RuntimeError(f"test hook: fail_after_step={step}")

        out["after_step"] = after_step
    return out
