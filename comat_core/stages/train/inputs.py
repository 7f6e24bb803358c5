"""The train stage's work in one process: read its inputs and run the trainer on them.

Both the stage function (``stage.run``, one process) and every process of a launched group
(``launch.train_from_request``) call :func:`train_in_process`; neither module imports the other's
entry point, so the launcher never imports the stage back.
"""

from __future__ import annotations

from comat_core.errors import InputError
from comat_core.method.trainer import TrainingSources, train
from comat_core.stages.prefinetune import prefinetuned_unet
from comat_core.stages.prompts import read_prompts
from comat_core.stages.registry import StageContext


def sources_from_inputs(ctx: StageContext) -> TrainingSources:
    """Prompt records that have ground-truth latents, with the latent and mask readers."""
    from comat_core.stages.gan_gt import GanGtReader

    prompts = read_prompts(ctx.inputs["prompts"])
    gt = GanGtReader(ctx.inputs["gan_gt"])
    available = set(gt.prompt_ids())
    records = [p for p in prompts if str(p["prompt_id"]) in available]
    if not records:
        raise InputError("no prompt has a ground-truth latent in the gan_gt stage; rerun gan_gt with --force")
    entity_masks = None
    if "masks" in ctx.inputs:
        from comat_core.stages.masks.reader import MaskReader

        entity_masks = MaskReader(ctx.inputs["masks"]).entity_masks
    return TrainingSources(records, gt.latents, entity_masks)


def train_in_process(ctx: StageContext) -> dict:
    """Train in this process (alone, or as one process of a launched group; see ``launch``)."""
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
