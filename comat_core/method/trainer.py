"""The CoMat training loop (docs/method.md §2): one flat loop around one ``train_step`` function.

It reads like a diffusers training script, top to bottom: build (accelerator, frozen models, LoRAs,
losses, optimisers), one step, validation and export, the loop. Around it: the training data
(``data.py``), the run's state and its checkpoints (``state.py``, files in ``store/full_state.py``),
data parallelism (``distributed.py``) and what a run reports (``reporting.py``).

Per optimisation step, for each micro-batch (gradient accumulation):

1. encode the batch's prompts once (frozen text encoders; the empty prompt is cached),
2. sample with gradients (``DifferentiableSampler``: T DDPM steps, K with autograd, attention
   captured at the chosen steps, Mixed Latent when configured),
3. decode with autograd and compute concept activation, attribute concentration (per captured step,
   summed over steps as the reference does) and the non-saturating GAN generator loss, weighted
   by ``train.losses``; backward (terms with weight 0 are not computed at all);

then average the LoRA gradients over processes, clip (0.1), AdamW step, LR-scheduler step; then
one discriminator step: BCE on ``[D(z.detach()) -> 0, D(z_gt) -> 1]``, its own AdamW (betas
(0, 0.999)) and clip (1.0).

Distributed data parallel runs under ``accelerate launch``, without DDP (``distributed.py``).
accelerate provides the process group, the device, autocast for the mixed precision (bf16 where the
GPU supports it, fp16 otherwise, fp32 on CPU), the trackers and the collectives. fp16 uses one
``GradScaler`` per optimiser.

Randomness: every draw of a step (initial noise, gradient/attention steps, variance noise, Mixed
Latent, crop offsets) comes from generators seeded by ``(train.seed, step, slot)``, where the slot
``micro-batch x processes + process`` is the micro-batch's place in the global batch, and the data
order is a pure function of the position in a seeded, epoch-wise permutation, so a resumed run
repeats the uninterrupted one exactly, and P processes x A micro-batches train like 1 x (P x A),
which is what lets a run resume with another process count. The global RNG states are saved as well.

Performance (``benchmarks/RESULTS.md``): the switches ``train.merge_lora_for_nograd``,
``train.compile_nograd_unet`` (``comat_core.method.nograd``) and ``train.vae_decode_checkpointing``
(``Backbone.enable_decode_checkpointing``) are off by default and compute the same step. The step's
logged values stay on the device until one read at its end (``_host_values``), so the host never
waits for the GPU inside a step.

Artifacts (through the stage writer): ``checkpoints/step-NNNNNN/`` (full state, see
``store/full_state.py``), ``samples/step-NNNNNN.png`` (validation grids, each committed as its own shard),
and at the end ``lora/`` (diffusers-loadable) and ``metrics.parquet`` (one row per step).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from comat_core.config import ComatConfig
from comat_core.errors import ConfigError
from comat_core.method.data import PromptOrder, StepInputs, TrainingData, TrainingSources
from comat_core.method.distributed import average_gradients, mean_over_processes
from comat_core.method.losses.attribute import attribute_concentration_loss
from comat_core.method.losses.fidelity import discriminator_gan_loss, generator_gan_loss
from comat_core.method.reporting import (STEP_TIMING, flat_config, log_validation_image, numeric, peak_memory_mb,
                                         reset_peak_memory, step_line, trackers)
from comat_core.method.sampler import DifferentiableSampler
from comat_core.method.state import SAMPLES_SHARD_PREFIX, LoopState, Training, resume, save_training_checkpoint
from comat_core.models.backbones import Backbone
from comat_core.models.generation import SeededNoise
from comat_core.models.lora import add_lora, export_lora
from comat_core.progress import timing_text
from comat_core.runtime import DTYPES, mixed_precision, resolve_device
from comat_core.store.checkpoint import checkpoint_ref, committed_checkpoints
from comat_core.store.storage import StageWriter

log = logging.getLogger("comat.train")

ProgressFn = Callable[[int, int, str], None]
LOSS_TERMS = ("concept", "token", "pixel", "gan_g")


# ----------------------------------------------------------------------------------------------
# Models and optimisers


def make_accelerator(cfg: ComatConfig, project_dir: str | Path | None = None):
    """An ``Accelerator`` with the configured precision and the trackers that can run here."""
    from accelerate import Accelerator

    device = resolve_device(cfg)
    return Accelerator(mixed_precision=mixed_precision(cfg, device), cpu=device.type == "cpu", log_with=trackers(cfg) or None,
                       project_dir=str(project_dir) if project_dir else None)


def build_training(cfg: ComatConfig, accelerator=None, unet_override: str | None = None,
                   concept_override=None) -> Training:
    """Load the frozen models, inject the LoRAs, build losses, optimisers, schedulers and scalers.

    ``concept_override``: a concept term to use in place of the captioner's (``TrainingSources.concept``).
    """
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    from comat_core.method.attention import AttentionCapture
    from comat_core.method.discriminator import LatentDiscriminator
    from comat_core.method.losses.concept import ConceptActivationLoss
    from comat_core.models.loader import load_captioner

    tc, lc = cfg.train, cfg.train.losses
    if not any(w > 0 for w in (lc.concept_weight, lc.token_weight, lc.pixel_weight, lc.gan_weight)):
        raise ConfigError("every train.losses weight is 0: set at least one of concept/token/pixel/gan_weight > 0")
    accelerator = accelerator or make_accelerator(cfg)
    mode = mixed_precision(cfg, resolve_device(cfg))
    dtype = DTYPES[mode]
    device = accelerator.device
    set_seed(tc.seed)

    backbone = Backbone.load(cfg.models.pretrained, cfg.models.family, tc.resolution, dtype=dtype, device=device,
                             vae=cfg.models.vae, unet_override=unet_override,
                             decode_to_unit_range=tc.decode_to_unit_range)
    g_params = add_lora(backbone.unet, tc.lora.rank, tc.lora.alpha, tc.lora.target_modules)
    sampler = DifferentiableSampler(
        backbone, tc.num_inference_steps, tc.guidance_scale, tc.grad_steps,
        backprop_through_unet_input=tc.backprop_through_unet_input, attribute_steps=lc.attribute_steps,
        attribute_steps_with_replacement=lc.attribute_steps_with_replacement, p_mixed=tc.p_mixed,
        gradient_checkpointing=tc.gradient_checkpointing)
    concept = None
    if lc.concept_weight > 0:
        concept = concept_override
        if concept is None:
            model, processor = load_captioner(cfg.models.captioner, dtype=dtype, device=device, field="models.captioner")
            concept = ConceptActivationLoss(model, processor, lc.caption_prefix, lc.label_smoothing, lc.crop_max)
    attention = None
    if (lc.token_weight > 0 or lc.pixel_weight > 0) and lc.attribute_steps > 0:
        attention = AttentionCapture(backbone.unet, lc.attention_blocks)
    _apply_performance_switches(tc, backbone)
    discriminator, d_params, opt_d, sched_d = None, [], None, None
    if lc.gan_weight > 0:
        dc = tc.discriminator
        discriminator = LatentDiscriminator.load(cfg.models.discriminator, timestep=dc.timestep, lora_rank=dc.lora_rank,
                                                 target_modules=tc.lora.target_modules, dtype=dtype, device=device)
        discriminator.set_trainable(False)
        d_params = discriminator.trainable_parameters()
        opt_d = torch.optim.AdamW(d_params, lr=dc.learning_rate, betas=tuple(dc.betas), weight_decay=dc.weight_decay)
        sched_d = get_scheduler("constant", optimizer=opt_d)
    opt_g = torch.optim.AdamW(g_params, lr=tc.learning_rate, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    sched_g = get_scheduler(tc.lr_scheduler, optimizer=opt_g, num_warmup_steps=tc.warmup_steps,
                            num_training_steps=tc.max_steps)
    scaler_device = "cuda" if device.type == "cuda" else "cpu"
    scaler_g = torch.amp.GradScaler(scaler_device, enabled=mode == "fp16")
    scaler_d = torch.amp.GradScaler(scaler_device, enabled=mode == "fp16")
    return Training(cfg, accelerator, backbone, sampler, concept, attention, discriminator, g_params, d_params,
                    opt_g, opt_d, sched_g, sched_d, scaler_g, scaler_d)


def _apply_performance_switches(tc, backbone: Backbone) -> None:
    """Issue-8 switches (all off by default): the no-grad UNet and VAE decode checkpointing."""
    if tc.vae_decode_checkpointing:
        backbone.enable_decode_checkpointing()
    if tc.merge_lora_for_nograd or tc.compile_nograd_unet:
        from comat_core.method.nograd import NoGradUNet

        backbone.nograd_unet = NoGradUNet(backbone.unet, merge_lora=tc.merge_lora_for_nograd,
                                          compile=tc.compile_nograd_unet, compile_mode=tc.nograd_compile_mode,
                                          max_shapes=tc.nograd_compile_max_shapes)


# ----------------------------------------------------------------------------------------------
# One step


def step_seed(seed: int, step: int) -> int:
    """The seed of optimisation step ``step`` (0-based)."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def step_generators(seed: int, process: int, micro: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """(CPU generator for the plan and crop offsets, device generator for every noise tensor)."""
    a, b = np.random.SeedSequence([seed, process, micro]).generate_state(2, dtype=np.uint64)
    cpu = torch.Generator().manual_seed(int(a) & (2**63 - 1))
    noise = torch.Generator(device=device).manual_seed(int(b) & (2**63 - 1))
    return cpu, noise


def generator_losses(tr: Training, inputs: StepInputs, cpu_gen: torch.Generator,
                     noise_gen: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Sample with gradients and compute the unweighted loss terms whose weight is not 0.

    The noise: when the inputs carry gan_gt seeds each sample replays its gan_gt sample's draws
    (``SeededNoise`` of its seed), else fresh batch noise from ``noise_gen``. With online targets
    the attribute targets come from segmenting this step's own image (detached) after sampling.
    """
    lc = tr.cfg.train.losses
    cond = tr.backbone.encode_prompts(inputs.texts)
    gt = inputs.gt_latents.to(tr.device, torch.float32, non_blocking=True)
    plan = tr.sampler.plan(len(inputs.texts), cpu_gen, with_ground_truth=True)
    online = inputs.online_targets is not None
    has_targets = online or (inputs.targets is not None and any(inputs.targets))
    attention = tr.attention if has_targets else None
    noise = SeededNoise(inputs.seeds) if inputs.seeds is not None else noise_gen
    terms: dict[str, torch.Tensor] = {}
    with tr.accelerator.autocast():
        out = tr.sampler.sample(cond, plan, noise, gt_latents=gt, attention=attention)
        images = None
        if tr.concept is not None:
            images = tr.backbone.decode(out.latents)
            terms["concept"] = tr.concept(images, inputs.texts, cpu_gen)
        if tr.attention is not None:
            targets = inputs.targets
            if online and out.attention_maps:
                if images is None:
                    with torch.no_grad():
                        images = tr.backbone.decode(out.latents)
                targets = inputs.online_targets(images.detach().float())
            zero = out.latents.new_zeros(())
            token, pixel = zero, zero
            for maps in out.attention_maps:
                t, p = attribute_concentration_loss(maps, targets, lc.token_loss_layer_scale)
                token, pixel = token + t, pixel + p
            terms["token"], terms["pixel"] = token, pixel
        if tr.discriminator is not None:
            terms["gan_g"] = generator_gan_loss(tr.discriminator(out.latents))
    return terms, out.latents


def _weights(tr: Training) -> dict[str, float]:
    lc = tr.cfg.train.losses
    return {"concept": lc.concept_weight, "token": lc.token_weight, "pixel": lc.pixel_weight, "gan_g": lc.gan_weight}


def _optimizer_step(tr: Training, params, optimizer, scaler, clip: float) -> torch.Tensor | float:
    """Average over processes, unscale (fp16), clip, step; returns the gradient norm before clipping
    (a device tensor: read it with the step's other logs, see ``_host_values``)."""
    average_gradients(tr.accelerator, params)
    if all(p.grad is None for p in params):  # nothing was learned from this step
        return 0.0
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm.detach()


def _host_values(logs: dict[str, Any]) -> dict[str, float]:
    """The step's logs as floats, with one device-to-host copy for all tensor values.

    Reading each loss with ``float()`` as it is produced would make the host wait for the GPU queue
    to drain several times per step; one read at the end keeps the host ahead of the GPU.
    """
    keys = [k for k, v in logs.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in logs.items() if k not in keys}
    if keys:
        values = torch.stack([logs[k].detach().float().reshape(()) for k in keys]).cpu().tolist()
        out.update(zip(keys, values))
    return out


def train_step(tr: Training, micro_batches: list[StepInputs], seed: int) -> dict[str, float]:
    """One optimisation step of the generator LoRA, then one of the discriminator; returns the logs."""
    tc = tr.cfg.train
    n = len(micro_batches)
    weights = _weights(tr)
    sums: dict[str, float] = {}
    fakes = []
    tr.unet.train()
    for m, inputs in enumerate(micro_batches):
        slot = m * tr.accelerator.num_processes + tr.accelerator.process_index  # place in the global batch
        cpu_gen, noise_gen = step_generators(seed, 0, slot, tr.device)  # draws independent of the process layout
        terms, latents = generator_losses(tr, inputs, cpu_gen, noise_gen)
        loss = sum(weights[k] * v for k, v in terms.items())
        if loss.requires_grad:  # False only when the batch has nothing to learn from (e.g. attribute-only, no entity)
            tr.scaler_g.scale(loss / n).backward()
        for k, v in [*terms.items(), ("total", loss)]:
            sums[k] = sums.get(k, 0.0) + v.detach().float() / n
        fakes.append(latents.detach())
    logs: dict[str, Any] = {f"{k}_loss": sums.get(k, math.nan) for k in LOSS_TERMS}  # NaN: weight 0, not computed
    logs["loss"] = sums["total"]
    logs["lr"] = tr.opt_g.param_groups[0]["lr"]  # the rate this step uses
    logs["grad_norm_g"] = _optimizer_step(tr, tr.g_params, tr.opt_g, tr.scaler_g, tc.grad_clip)
    tr.sched_g.step()
    logs.update(discriminator_step(tr, micro_batches, fakes))
    return mean_over_processes(tr.accelerator, _host_values(logs))


def discriminator_step(tr: Training, micro_batches: list[StepInputs], fakes: list[torch.Tensor]) -> dict[str, Any]:
    """BCE on ``[D(z_online) -> 0, D(z_gt) -> 1]`` (one D call on both), own AdamW and clip.

    The logged values are device tensors (``train_step`` reads them all at once)."""
    if tr.discriminator is None:
        return {"d_loss": math.nan, "d_real_logit": math.nan, "d_fake_logit": math.nan, "grad_norm_d": math.nan,
                "lr_d": math.nan}
    n = len(micro_batches)
    out: dict[str, Any] = {"d_loss": 0.0, "d_real_logit": 0.0, "d_fake_logit": 0.0}  # device tensors after the loop
    tr.discriminator.set_trainable(True)
    try:
        for inputs, fake in zip(micro_batches, fakes):
            real = inputs.gt_latents.to(tr.device, torch.float32, non_blocking=True)
            with tr.accelerator.autocast():
                logits = tr.discriminator(torch.cat([fake, real]))
                fake_logits, real_logits = logits[: len(fake)], logits[len(fake):]
                d_loss = discriminator_gan_loss(fake_logits, real_logits)
            tr.scaler_d.scale(d_loss / n).backward()
            out["d_loss"] = out["d_loss"] + d_loss.detach().float() / n
            out["d_real_logit"] = out["d_real_logit"] + real_logits.detach().float().mean() / n
            out["d_fake_logit"] = out["d_fake_logit"] + fake_logits.detach().float().mean() / n
        out["lr_d"] = tr.opt_d.param_groups[0]["lr"]
        out["grad_norm_d"] = _optimizer_step(tr, tr.d_params, tr.opt_d, tr.scaler_d, tr.cfg.train.discriminator.grad_clip)
        tr.sched_d.step()
    finally:
        tr.discriminator.set_trainable(False)
    return out


# ----------------------------------------------------------------------------------------------
# Validation images, export


@torch.no_grad()
def validation_grid(tr: Training, prompts: list[str], seed: int):
    """One row of images for ``prompts`` (no-grad DDPM sampling with the current LoRA, fixed seed)."""
    from PIL import Image

    cond = tr.backbone.encode_prompts(prompts)
    generator = torch.Generator(device=tr.device).manual_seed(seed)
    with tr.accelerator.autocast():
        out = tr.sampler.sample(cond, tr.sampler.no_grad_plan(), generator)
        images = tr.backbone.decode(out.latents, unit_range=True)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()  # [N, 3, H, W]
    row = torch.cat(list(images), dim=2).permute(1, 2, 0).numpy()
    return Image.fromarray(row)


def write_validation(tr: Training, writer: StageWriter, step: int) -> str | None:
    if not tr.cfg.train.validation_prompts:
        return None
    rel = f"samples/step-{step:06d}.png"
    image = validation_grid(tr, list(tr.cfg.train.validation_prompts), tr.cfg.train.seed)
    writer.put_image(rel, image)
    writer.commit_shard(f"{SAMPLES_SHARD_PREFIX}{step:06d}", [rel], meta={"step": step})
    log_validation_image(tr.accelerator, image, step)
    return rel


def export(tr: Training, writer: StageWriter, scratch: Path, loop: LoopState) -> list[str]:
    """``lora/`` (diffusers-loadable, plus ``comat.json`` describing it) and ``metrics.parquet``."""
    out = Path(scratch) / "lora"
    export_lora(tr.unet, tr.backbone.pipeline_class, out)
    tc = tr.cfg.train
    (out / "comat.json").write_text(json.dumps({
        "pretrained": tr.cfg.models.pretrained, "family": tr.cfg.models.family, "rank": tc.lora.rank,
        "alpha": tc.lora.alpha, "target_modules": list(tc.lora.target_modules), "steps": loop.step,
        "resolution": tc.resolution}, indent=2))
    files = writer.put_local_tree("lora", out)
    writer.put_table("metrics.parquet", loop.metrics)
    return files + ["metrics.parquet"]


# ----------------------------------------------------------------------------------------------
# The loop


def train(cfg: ComatConfig, sources: TrainingSources, writer: StageWriter, scratch: Path, *,
          progress: ProgressFn | None = None, hooks: dict | None = None, unet_override: str | None = None) -> dict:
    """Train (or resume) until ``train.max_steps``; export; return the stage summary.

    ``hooks["after_step"](step)`` is called after each step's artifacts are written (tests use it
    to interrupt a run). Every step is a row of ``metrics.parquet``; the trackers and the log get
    every ``train.log_every``-th step.
    """
    progress = progress or (lambda done, total, message="": None)
    hooks = hooks or {}
    t_start = time.time()
    tc = cfg.train
    accelerator = make_accelerator(cfg, Path(scratch) / "logs")
    tr = build_training(cfg, accelerator, unet_override, concept_override=sources.concept)
    data = TrainingData(sources, tr.backbone.latent_shape()[-1], tc.losses.drop_undetected_nouns,
                        with_targets=tr.attention is not None, seed=tc.seed)
    order = PromptOrder(len(data), tc.seed)
    processes, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    global_batch = tc.batch_size * processes * tc.gradient_accumulation_steps
    loop = LoopState()
    resume(tr, writer, loop, cleanup=main)
    if main:
        accelerator.init_trackers("comat", config=flat_config(cfg))
        if loop.step == 0:
            write_validation(tr, writer, 0)
    first_step, t_loop = loop.step, time.time()  # the rate (hence the ETA) counts this run's steps only
    progress(loop.step, tc.max_steps, f"resumed at step {loop.step}" if loop.step else "starting")
    while loop.step < tc.max_steps:
        step, epoch = loop.step, loop.position // len(data)
        positions = order.take(loop.position, global_batch)
        epochs = order.epochs(loop.position, global_batch)
        micro = []
        for m in range(tc.gradient_accumulation_steps):
            offset = (m * processes + rank) * tc.batch_size
            micro.append(data.inputs(positions[offset: offset + tc.batch_size], epochs[offset: offset + tc.batch_size]))
        reset_peak_memory(tr.device)
        t0 = time.perf_counter()
        logs = train_step(tr, micro, step_seed(tc.seed, step))
        loop.step += 1
        loop.position += global_batch
        logs.update(step=loop.step, step_seconds=time.perf_counter() - t0, peak_memory_mb=peak_memory_mb(tr.device),
                    epoch=epoch, data_position=loop.position,
                    prompt_ids=",".join(str(data.records[i]["prompt_id"]) for i in positions),
                    gt_samples=",".join(str(data.visit_sample(i, e)) for i, e in zip(positions, epochs)))
        loop.metrics.append(logs)
        if main and (loop.step % tc.log_every == 0 or loop.step == tc.max_steps):
            accelerator.log(numeric(logs), step=loop.step)
            rate = (loop.step - first_step) / max(time.time() - t_loop, 1e-9)
            log.info("step %d/%d: %s | %s", loop.step, tc.max_steps, step_line(logs),
                     timing_text(loop.step, tc.max_steps, time.time() - t_start, rate, "step", STEP_TIMING))
        progress(loop.step, tc.max_steps, f"step {loop.step}/{tc.max_steps} loss {logs['loss']:.4f}")
        if main and (loop.step % tc.validation_every == 0 or loop.step == tc.max_steps):
            write_validation(tr, writer, loop.step)
        if main and (loop.step % tc.checkpoint_every == 0 or loop.step == tc.max_steps):
            save_training_checkpoint(tr, writer, loop, global_batch)
            if "on_checkpoint" in hooks:  # e.g. a Prefect event (tasks/events.py)
                hooks["on_checkpoint"](loop.step, checkpoint_ref(loop.step).folder)
        accelerator.wait_for_everyone()
        if "after_step" in hooks:
            hooks["after_step"](loop.step)
    files = export(tr, writer, Path(scratch), loop) if main else []
    accelerator.wait_for_everyone()
    accelerator.end_training()
    logs_dir = Path(scratch) / "logs"
    if main and logs_dir.is_dir() and any(p.is_file() for p in logs_dir.rglob("*")):
        files += writer.put_local_tree("logs", logs_dir)  # tracker files (TensorBoard), kept with the stage
    if tr.attention is not None:
        tr.attention.remove()
    last = loop.metrics[-1] if loop.metrics else {}
    return {
        "steps": loop.step,
        "resumed_from": loop.resumed_from,
        "prompts": len(data),
        "global_batch": global_batch,
        "trainable_parameters": sum(p.numel() for p in tr.g_params),
        "discriminator_parameters": sum(p.numel() for p in tr.d_params),
        "final": {k: v for k, v in numeric(last).items() if k.endswith("loss")},
        "checkpoints": [r.step for r in committed_checkpoints(writer)],
        "lora": "lora/",
        "files": len(files),
        "seconds": round(time.time() - t_start, 3),
    }


