"""Differentiable DDPM sampling with classifier-free guidance (docs/method.md §2 steps 2-3, §6).

One training sample is a full T-step DDPM trajectory from noise to a clean latent, of which only
K steps carry gradients:

* **Schedule**: the model's own scheduler config, ``set_timesteps(T)`` ("leading" spacing plus
  ``steps_offset``: for SD and T = 50 the timesteps are 981, 961, ..., 1).
* **Gradient steps**: indices ``start + j * (T // K)`` for j = 0..K-1, ``start`` uniform in
  ``0 .. T - (T // K) * (K - 1) - 1`` (the reference's range; ``0 .. T//K - 1`` when K divides T),
  drawn from a seeded generator. The UNet runs under autograd (with gradient checkpointing) only at
  those K steps and under ``torch.no_grad`` at the others, so the no-grad steps store no activations.
* **Latents in the graph**: from the first gradient step on, the DDPM update x_t -> x_{t-1} is
  recorded by autograd. It is linear in x_t and in the noise prediction, with constant per-step
  coefficients (Python floats, so nothing is saved for backward); at no-grad steps the noise
  prediction is a constant. The update is plain tensor math (no ``nonzero``/``.item()`` host
  syncs as in diffusers' ``step``), and the variance noise comes from the trajectory's noise stream
  (``comat_core.models.generation``), drawn before the first step.
* ``backprop_through_unet_input``: True (a **Decision**, docs/method.md §2; the SD1.5 reference) keeps the UNet
  input in the graph at gradient steps; False detaches it (the reference SDXL code).
* **Attention capture**: ``attribute_steps`` of the K gradient steps run inside
  ``AttentionCapture.capture()`` and their maps are returned (one dict per chosen step). Drawn
  without replacement by default (**Decision**); with replacement the reference's duplicates
  collapse to one step, as its per-timestep dictionary did.
* **Mixed Latent** (docs/method.md §6, default off): each sample is "mixed" with probability ``p_mixed``.
  One start index ``m`` per batch is drawn uniformly from ``0 .. last gradient index`` (so a mixed
  sample always keeps at least one gradient step). At step ``m``, before the UNet call, the mixed
  samples' latents are replaced by ``scheduler.add_noise(z_gt, eps, timesteps[m])`` and sampling
  continues from there. The replacement cuts the graph, so gradient steps before ``m`` carry no
  gradient for mixed samples (they are skipped for them); when every sample is mixed, steps before
  ``m`` are not computed at all. Every sample's stream holds its restart noise ``eps`` whenever Mixed
  Latent is on, mixed or not, so a sample consumes its stream the same way whatever its batch-mates
  draw (with a whole-batch draw too, whose values depend on the draw's size).

No host synchronisation inside the T-step loop (a CoMat step is host-bound, and
every blocking copy or ``.item()`` makes the host wait for the GPU queue to drain): every random
choice of a step (start index, attention steps, Mixed Latent samples and index) is drawn once, on
the host, from the CPU generator in :meth:`DifferentiableSampler.plan`; every noise tensor of the
trajectory (initial latent, variance noise of each step, Mixed Latent noise) is drawn once before
the loop (per-sample CPU streams reach the device in one non-blocking copy); the update coefficients
are Python floats; timesteps reach the UNet as cached device tensors (``Backbone.timestep``);
Mixed Latent noising uses the same float coefficients as ``DDPMScheduler.add_noise`` (which moves
its ``alphas_cumprod`` to the device on every call) and picks rows without building a device mask.
Under ``torch.no_grad`` the UNet call goes to ``Backbone.nograd_unet`` when the trainer set one
(LoRA merged and/or compiled, ``comat_core.method.nograd``); so attention can only be captured at
gradient steps, which :meth:`DifferentiableSampler.sample` checks.

The same sampler draws gan_gt's ground-truth latents (no-grad plan, the trainer's precision), so
``train.noise: replay`` at the LoRA's initial state repeats gan_gt's computation.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from comat_core.errors import ConfigError
from comat_core.models.backbones import Backbone, Conditioning
from comat_core.models.generation import BatchNoise, SeededNoise

Noise = BatchNoise | SeededNoise


# ----------------------------------------------------------------------------------------------
# The DDPM posterior step as tensor math


class DdpmSchedule:
    """The T inference timesteps of a ``DDPMScheduler`` and, per step index, the posterior coefficients.

    ``step(model_output, i, x_t, noise)`` equals ``DDPMScheduler.step(model_output, timesteps[i], x_t)``
    with that variance noise, without host syncs.
    """

    def __init__(self, scheduler, num_inference_steps: int):
        config = scheduler.config
        if config.thresholding:
            raise ConfigError("the scheduler uses dynamic thresholding, which the differentiable sampler does not support")
        if config.variance_type not in ("fixed_small", "fixed_small_log", "fixed_large"):
            raise ConfigError(f"scheduler variance_type {config.variance_type!r} is not supported "
                              "(use fixed_small, as Stable Diffusion does)")
        if config.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ConfigError(f"unknown prediction_type {config.prediction_type!r}")
        self.scheduler = copy.deepcopy(scheduler)
        self.scheduler.set_timesteps(num_inference_steps, device="cpu")
        self.timesteps: list[int] = [int(t) for t in self.scheduler.timesteps]
        self.prediction_type = config.prediction_type
        self.clip_range = float(config.clip_sample_range) if config.clip_sample else None
        self.init_noise_sigma = float(self.scheduler.init_noise_sigma)
        self._coefficients = [self._coefficients_at(i, config.variance_type) for i in range(len(self.timesteps))]
        noisy = [i for i in range(len(self.timesteps)) if self.needs_noise(i)]
        self.noise_draws = len(noisy)  # variance draws of one trajectory
        self._draw_index = {i: k for k, i in enumerate(noisy)}  # step index -> its draw in the stream

    def __len__(self) -> int:
        return len(self.timesteps)

    def _coefficients_at(self, i: int, variance_type: str) -> dict[str, float]:
        """Float32 tensor math exactly as diffusers computes it, stored as Python floats."""
        acp = self.scheduler.alphas_cumprod.float()
        t = self.timesteps[i]
        prev = self.timesteps[i + 1] if i + 1 < len(self.timesteps) else -1
        a_t = acp[t]
        a_prev = acp[prev] if prev >= 0 else torch.tensor(1.0)
        b_t, b_prev = 1 - a_t, 1 - a_prev
        cur_alpha = a_t / a_prev
        cur_beta = 1 - cur_alpha
        if variance_type == "fixed_large":
            std = cur_beta**0.5
        else:  # fixed_small and fixed_small_log are the same standard deviation
            std = torch.clamp(b_prev / b_t * cur_beta, min=1e-20) ** 0.5
        return {
            "sqrt_a": float(a_t**0.5),
            "sqrt_b": float(b_t**0.5),
            "c_x0": float((a_prev**0.5 * cur_beta) / b_t),
            "c_xt": float(cur_alpha**0.5 * b_prev / b_t),
            "std": float(std) if t > 0 else 0.0,
        }

    def predicted_x0(self, model_output: torch.Tensor, i: int, sample: torch.Tensor) -> torch.Tensor:
        c = self._coefficients[i]
        if self.prediction_type == "epsilon":
            x0 = (sample - c["sqrt_b"] * model_output) / c["sqrt_a"]
        elif self.prediction_type == "v_prediction":
            x0 = c["sqrt_a"] * sample - c["sqrt_b"] * model_output
        else:
            x0 = model_output
        if self.clip_range is not None:
            x0 = x0.clamp(-self.clip_range, self.clip_range)
        return x0

    def step(self, model_output: torch.Tensor, i: int, sample: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """x_{t-1} = c_x0 * x0_hat + c_xt * x_t + std * noise (no noise is added at t = 0)."""
        c = self._coefficients[i]
        prev = c["c_x0"] * self.predicted_x0(model_output, i, sample) + c["c_xt"] * sample
        if c["std"] > 0 and noise is not None:
            prev = prev + c["std"] * noise
        return prev

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """``DDPMScheduler.add_noise(clean, noise, timesteps[i])`` with the stored float coefficients."""
        c = self._coefficients[i]
        return c["sqrt_a"] * clean + c["sqrt_b"] * noise

    def needs_noise(self, i: int) -> bool:
        return self._coefficients[i]["std"] > 0

    def draw_index(self, i: int) -> int:
        """Which variance draw of the trajectory's stream step ``i`` uses (steps without noise have none)."""
        return self._draw_index[i]


# ----------------------------------------------------------------------------------------------
# Plans and outputs


@dataclass(frozen=True)
class SamplingPlan:
    """Which steps of one trajectory carry gradients, capture attention, and where Mixed Latent starts."""

    grad_indices: tuple[int, ...]
    attention_indices: tuple[int, ...] = ()
    mix_index: int | None = None  # set whenever Mixed Latent is on (its noise is drawn), even with no sample mixed
    mixed: tuple[bool, ...] = ()

    @property
    def first_grad_index(self) -> int | None:
        return self.grad_indices[0] if self.grad_indices else None


@dataclass
class SampleOutput:
    latents: torch.Tensor  # [B, 4, h, w], in the graph from the first gradient step
    attention_maps: list[dict[str, torch.Tensor]] = field(default_factory=list)  # one dict per attention step


def gradient_step_indices(num_steps: int, grad_steps: int, start: int) -> list[int]:
    """``start + j * (T // K)`` for j = 0..K-1."""
    interval = num_steps // grad_steps
    return [start + j * interval for j in range(grad_steps)]


def max_start_index(num_steps: int, grad_steps: int) -> int:
    """The largest ``start`` that keeps all K gradient steps inside the T steps (the reference's bound)."""
    return num_steps - (num_steps // grad_steps) * (grad_steps - 1) - 1


def _randint(high_inclusive: int, generator: torch.Generator) -> int:
    return int(torch.randint(0, high_inclusive + 1, (1,), generator=generator))


# ----------------------------------------------------------------------------------------------
# The sampler


class DifferentiableSampler:
    """CFG DDPM sampling whose last part stays in the autograd graph (see the module docstring)."""

    def __init__(
        self,
        backbone: Backbone,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        grad_steps: int = 5,
        *,
        backprop_through_unet_input: bool = True,
        attribute_steps: int = 2,
        attribute_steps_with_replacement: bool = False,
        p_mixed: float = 0.0,
        gradient_checkpointing: bool = True,
    ):
        if not 1 <= grad_steps <= num_inference_steps:
            raise ConfigError(f"grad_steps ({grad_steps}) must be between 1 and num_inference_steps ({num_inference_steps})")
        if attribute_steps > grad_steps:
            raise ConfigError(f"attribute_steps ({attribute_steps}) must be <= grad_steps ({grad_steps})")
        self.backbone = backbone
        self.schedule = DdpmSchedule(backbone.scheduler, num_inference_steps)
        self.guidance_scale = guidance_scale
        self.grad_steps = grad_steps
        self.backprop_through_unet_input = backprop_through_unet_input
        self.attribute_steps = attribute_steps
        self.attribute_steps_with_replacement = attribute_steps_with_replacement
        self.p_mixed = p_mixed
        if gradient_checkpointing:
            backbone.unet.enable_gradient_checkpointing()

    @property
    def timesteps(self) -> list[int]:
        return self.schedule.timesteps

    # ------------------------------------------------------------------ plans
    def plan(self, batch_size: int, generator: torch.Generator, with_ground_truth: bool = False) -> SamplingPlan:
        """Draw the gradient steps, the attention steps and the Mixed Latent choice from ``generator`` (CPU)."""
        T, K = len(self.schedule), self.grad_steps
        start = _randint(max_start_index(T, K), generator)
        grad = gradient_step_indices(T, K, start)
        attention = self._attention_indices(grad, generator)
        mix_index, mixed = None, ()
        if with_ground_truth and self.p_mixed > 0:
            # kept when no sample is mixed: the stream then still holds the restart noise, so its layout
            # (and a whole-batch draw's values) follow the configuration, never the batch-mates' draws
            draws = torch.rand(batch_size, generator=generator) < self.p_mixed
            mixed = tuple(bool(x) for x in draws)
            mix_index = _randint(grad[-1], generator)
        return SamplingPlan(tuple(grad), attention, mix_index, mixed)

    def _attention_indices(self, grad: list[int], generator: torch.Generator) -> tuple[int, ...]:
        n = self.attribute_steps
        if n == 0:
            return ()
        if self.attribute_steps_with_replacement:
            picks = torch.randint(0, len(grad), (n,), generator=generator).tolist()
        else:
            picks = torch.randperm(len(grad), generator=generator)[:n].tolist()
        return tuple(sorted({grad[p] for p in picks}))

    def no_grad_plan(self) -> SamplingPlan:
        """Plain sampling (validation): no gradient steps, no capture."""
        return SamplingPlan(())

    # ------------------------------------------------------------------ sampling
    def sample(
        self,
        cond: Conditioning,
        plan: SamplingPlan,
        noise: "torch.Generator | Noise",
        *,
        gt_latents: torch.Tensor | None = None,
        attention=None,
        latents: torch.Tensor | None = None,
    ) -> SampleOutput:
        """Run the T steps for the prompts in ``cond`` following ``plan``.

        ``noise`` gives the trajectory's stream, drawn before the first step: the initial latents
        (drawn, and unused, when ``latents`` gives them), the DDPM variance noise of each step and
        the Mixed Latent noise: a generator on the backbone's device (one whole-batch draw), or
        per-sample streams (:class:`~comat_core.models.generation.SeededNoise`, the gan_gt draws).
        Every sample's stream is consumed by position, whatever the plan does to its batch-mates.
        ``attention`` is an ``AttentionCapture`` (or None: no maps are captured).
        """
        backbone, schedule = self.backbone, self.schedule
        noise_source = BatchNoise(noise) if isinstance(noise, torch.Generator) else noise
        batch = len(cond)
        device = backbone.device
        cfg_cond = Conditioning.cat([backbone.null_conditioning(batch), cond])
        shape = (batch, *backbone.latent_shape())
        stream = noise_source.stream(batch, shape[1:], schedule.noise_draws, plan.mix_index is not None, device)
        if latents is None:
            latents = stream.initial * schedule.init_noise_sigma
        elif tuple(latents.shape) != shape:
            raise ValueError(f"initial latents have shape {tuple(latents.shape)}, expected {shape}")
        grad_set = set(plan.grad_indices)
        first_grad = plan.first_grad_index if plan.grad_indices else len(schedule)
        if plan.mix_index is not None and gt_latents is None:
            raise ValueError("a Mixed Latent plan needs gt_latents")
        if attention is not None and not set(plan.attention_indices) <= grad_set:
            raise ValueError(f"attention steps {plan.attention_indices} must be gradient steps {plan.grad_indices}")
        begin = plan.mix_index if plan.mix_index is not None and all(plan.mixed) else 0
        maps: list[dict[str, torch.Tensor]] = []
        for i in range(begin, len(schedule)):
            if i == plan.mix_index and any(plan.mixed):
                latents = self._mix(latents, gt_latents, plan.mixed, i, stream.mix)
            with_grad = i in grad_set
            with torch.set_grad_enabled(with_grad):
                unet_in = latents if (with_grad and self.backprop_through_unet_input) else latents.detach()
                capture = attention is not None and i in plan.attention_indices
                eps = self._guided_noise(unet_in, i, cfg_cond, attention if capture else None)
                if capture:
                    maps.append(attention.pop())
            with torch.set_grad_enabled(i >= first_grad):
                variance_noise = stream.variance[schedule.draw_index(i)] if schedule.needs_noise(i) else None
                latents = schedule.step(eps, i, latents, variance_noise)
        return SampleOutput(latents, maps)

    def _guided_noise(self, latents: torch.Tensor, i: int, cfg_cond: Conditioning, attention) -> torch.Tensor:
        """Classifier-free guidance on the ``[uncond, cond]`` batch."""
        t = self.schedule.timesteps[i]
        unet_in = torch.cat([latents, latents])
        if attention is not None:
            with attention.capture():
                eps = self.backbone.unet_call(unet_in, t, cfg_cond)
        else:
            eps = self.backbone.unet_call(unet_in, t, cfg_cond)
        eps_uncond, eps_cond = eps.chunk(2)
        return eps_uncond + self.guidance_scale * (eps_cond - eps_uncond)

    def _mix(self, latents, gt_latents, mixed, i, noise: torch.Tensor) -> torch.Tensor:
        """Mixed Latent: mixed samples restart from their ground-truth latent noised to ``timesteps[i]``.

        ``sqrt(abar_t) * z_gt + sqrt(1 - abar_t) * eps``, as ``DDPMScheduler.add_noise``.
        """
        device = latents.device
        gt = gt_latents.to(device=device, dtype=latents.dtype, non_blocking=True)
        noised = self.schedule.add_noise(gt, noise, i)
        rows = [noised[b: b + 1] if m else latents[b: b + 1] for b, m in enumerate(mixed)]
        return torch.cat(rows)
