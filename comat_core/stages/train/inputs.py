"""The train stage's work in one process: read its inputs and run the trainer on them.

Both the stage function (``stage.run``, one process) and every process of a launched group
(``launch.train_from_request``) call :func:`train_in_process`; neither module imports the other's
entry point, so the launcher never imports the stage back.
"""

from __future__ import annotations

from comat_core.errors import InputError
from comat_core.method.data import TrainingSources
from comat_core.method.trainer import train
from comat_core.stages.prefinetune import prefinetuned_unet
from comat_core.stages.prompts import read_prompts
from comat_core.stages.registry import StageContext


def sources_from_inputs(ctx: StageContext) -> TrainingSources:
    """Prompt records that have ground-truth latents, with the readers :func:`training_sources` picks."""
    from comat_core.stages.gan_gt import GanGtReader

    prompts = read_prompts(ctx.inputs["prompts"])
    gt = GanGtReader(ctx.inputs["gan_gt"])
    available = set(gt.prompt_ids())
    records = [p for p in prompts if str(p["prompt_id"]) in available]
    if not records:
        raise InputError("no prompt has a ground-truth latent in the gan_gt stage; rerun gan_gt with --force")
    masks = None
    if "masks" in ctx.inputs:
        from comat_core.stages.masks.reader import MaskReader

        masks = MaskReader(ctx.inputs["masks"])
    return training_sources(ctx.cfg, records, gt, masks)


def training_sources(cfg, records: list[dict], gt, masks=None) -> TrainingSources:
    """The one place ``train.noise`` and ``train.masks`` are read: what every loss term trains on.

    ``gt``: the gan_gt stage's ``GanGtReader``; ``masks``: the masks stage's ``MaskReader`` (needed,
    and only read, with ``train.masks: offline``). The trainer sees only the readers: gan_gt seeds
    to replay (``noise: replay``; without them it draws fresh noise), offline entity masks, or an
    online segmenter (``masks: online``).
    """
    tc = cfg.train
    entity_masks, segment = None, None
    if tc.offline_masks:
        if masks is None:
            raise InputError("train.masks=offline reads the masks stage, which is not an input here; run masks first")
        entity_masks = masks.entity_masks
    else:
        segment = OnlineSegmenter(cfg)
    seeds = gt.seeds if tc.noise == "replay" else None
    concept = None
    if tc.losses.concept_reward == "shapes_judge":
        from comat_core.worlds.shapes.oracle import JudgeTargetLoss

        concept = JudgeTargetLoss()
    elif tc.losses.concept_reward == "shapes_verdict":
        from comat_core.models.loader import resolve_model
        from comat_core.worlds.shapes.verdict import VerdictLoss, load_verdict

        concept = VerdictLoss(load_verdict(resolve_model(cfg.models.verdict, "models.verdict")))
    return TrainingSources(records, gt.latents, entity_masks, seeds=seeds, samples=gt.samples, segment=segment,
                           concept=concept)


class OnlineSegmenter:
    """``train.masks: online`` (the reference): segment the trained image itself at each attribute step.

    The configured masks backend (``masks.backend``, loaded on first use on the images' device, in the
    training precision: the frozen models' dtype of ``runtime.mixed_precision``) runs on
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

        from comat_core.stages.masks.reader import EntityMask, resize_mask_area_majority
        from comat_core.stages.masks.stage import caption_nouns, kept_entities, noun_key

        if self.backend is None:
            from comat_core.runtime import weight_dtype
            from comat_core.stages.masks.factory import make_backend

            self.backend = make_backend(self.cfg, images.device, weight_dtype(self.cfg, images.device))
        kept = [kept_entities(r["entities"], self.cfg.masks)[0] for r in records]
        with torch.no_grad():
            found = self.backend.detect_and_segment(images.detach().float(), [caption_nouns(k) for k in kept])
        out = []
        for entities, per_noun in zip(kept, found):
            masks = []
            for index, noun in entities:
                mask = per_noun[noun_key(noun)][2]
                masks.append(EntityMask(index, noun, mask is not None,
                                        None if mask is None else resize_mask_area_majority(mask, resolution)))
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
