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
    entity_masks, segment = None, None
    if ctx.cfg.train.attribute_masks == "online":
        segment = OnlineSegmenter(ctx.cfg)
    elif "masks" in ctx.inputs:
        from comat_core.stages.masks.reader import MaskReader

        entity_masks = MaskReader(ctx.inputs["masks"]).entity_masks
    return TrainingSources(records, gt.latents, entity_masks, seeds=gt.seeds, samples=gt.samples, segment=segment)


class OnlineSegmenter:
    """``train.attribute_masks: online`` (the reference): segment the trained image itself at each attribute step.

    The configured masks backend (``masks.backend``, loaded on first use on the images' device) runs on
    the detached online images with the masks stage's rules (background and repeated nouns dropped,
    one mask per noun); each kept entity gets its mask resized to the attention resolution the
    trainer asks for, or ``detected=False``. Cost: one detector + segmenter pass per training image
    and attribute step (see benchmarks/RESULTS.md).
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.backend = None

    def __call__(self, images, records: list[dict], resolution: int) -> list[list]:
        import torch

        from comat_core.stages.masks.reader import EntityMask, resize_mask
        from comat_core.stages.masks.stage import caption_nouns, kept_entities, noun_key

        if self.backend is None:
            from comat_core.stages.masks.factory import make_backend

            self.backend = make_backend(self.cfg, images.device, torch.float32)
        kept = [kept_entities(r["entities"], self.cfg.masks)[0] for r in records]
        with torch.no_grad():
            found = self.backend.detect_and_segment(images.detach().float(), [caption_nouns(k) for k in kept])
        out = []
        for entities, per_noun in zip(kept, found):
            masks = []
            for index, noun in entities:
                mask = per_noun[noun_key(noun)][2]
                masks.append(EntityMask(index, noun, mask is not None,
                                        None if mask is None else resize_mask(mask, resolution)))
            out.append(masks)
        return out


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
