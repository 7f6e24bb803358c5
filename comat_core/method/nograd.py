"""The UNet used for the no-grad sampling calls: LoRA merged into the weights, optionally compiled.

45 of the 50 UNet calls of a CoMat step (docs/method.md §2) run under ``torch.no_grad``. For them the
generator is a fixed function, ``W x + scale * B (A x)`` = ``(W + scale * B A) x``, so the LoRA can
be folded into the projection weights. Measurements of a reference-style step (``benchmarks/RESULTS.md``) show why
that pays: a no-grad SD1.5 call at batch 8 launches 2,703 kernels, of which PEFT's LoRA adds 990
(+16 % GPU time), and the eager step leaves the GPU idle about 55 % of the time because the host
cannot launch kernels fast enough. ``torch.compile`` with CUDA graphs removes the launch cost itself.

Design (``merge_lora_for_nograd``): a **separate merged copy, refreshed after each optimiser step**,
not PEFT's in-place ``merge_adapter`` / ``unmerge_adapter``:

* correctness with mixed precision: the frozen base weights are bf16 (or fp16) and the LoRA fp32.
  An in-place merge ``W <- round(W + dW)`` followed by an unmerge ``W <- round(W - dW)`` does not
  give ``W`` back; with 2 x K merge/unmerge trips per sample (the gradient steps are interleaved with
  the no-grad ones) over 2000 steps the frozen weights would drift. Here the base weights are never
  written: each refresh computes ``round(W + dW)`` from the untouched ``W`` in fp32, one rounding;
* cost: only the LoRA-targeted projections get their own storage (SD1.5: 93.5 M of the UNet's
  859.5 M parameters, 0.17 GiB in bf16; SDXL: 955.2 M of 2567.5 M, 1.78 GiB; counted from the real
  configs by ``benchmarks/train_step.py --count-merged``). Every other parameter and buffer is
  *shared* with the generator UNet (the copy is built with ``copy.deepcopy`` whose memo maps each
  tensor to itself), so nothing else is duplicated. A refresh is one small matmul per projection,
  only when the LoRA changed;
* staleness: the copy notes the version counters and storage of the LoRA and base weights it
  merged, and refreshes itself before a call when any changed (optimizer step, checkpoint load,
  a test writing the weights), so it cannot serve a stale merge;
* the copy is a plain diffusers UNet (``nn.Linear`` projections, the model's own fused SDPA
  processors, no attention capture, no gradient checkpointing): the shape ``torch.compile`` and
  CUDA graphs like best, with stable parameter addresses (refreshes write in place).

Precision of the merge (measured on the tiny SD1.5 UNet with LoRA rank 4 and trained-like B, one
no-grad call, 4 input seeds; ``tests/test_perf_switches.py``): in fp32 the merged and PEFT outputs
differ by ~1e-6 of the output scale (float rounding order only), so fp32 tests compare tightly. In
bf16 the merged weights are rounded once to bf16 (relative 2^-9 per element). On that random tiny
UNet both bf16 paths are 10-12 % (mean |error| / mean |output|) from the fp32 output, the merged one
no further than the PEFT one, and the two bf16 paths differ by 1.4-1.6 %, about 7x less than the
bf16 error the plain path already has. So in bf16 the tolerance is the usual bf16 one, and the
merge is not a new error source. LoRA dropout must be 0 (the default), or the no-grad calls would
not be the same function.

``compile_nograd_unet``: ``torch.compile(dynamic=False)`` of that module, mode
``train.nograd_compile_mode`` (default ``reduce-overhead``: inductor kernels plus CUDA graphs, the
remedy for a host-bound call; ``default`` compiles without graphs, ``max-autotune`` also tunes
matmul kernels at a much longer compile). ``dynamic=False`` gives one static graph per input shape;
the timestep is a 0-d tensor input (see ``Backbone.unet_call``), so the 50 timesteps share one
graph. At most ``max_shapes`` distinct input shapes are compiled (training batch, validation batch,
...); further shapes run the same module eagerly rather than recompiling, with one warning. On
CUDA-graph modes each call marks a new graph step and clones the output, which the next replay
would otherwise overwrite. Without ``merge_lora_for_nograd`` the compiled module is a weight-sharing
copy that keeps the PEFT layers (the same function as the generator, fewer wins).
"""

from __future__ import annotations

import copy
import itertools
import logging
from typing import Any

import torch
from torch import nn

from comat_core.errors import ConfigError

log = logging.getLogger("comat.nograd")

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def shared_copy(unet: nn.Module) -> nn.Module:
    """A structural copy of ``unet`` sharing every parameter and buffer, with plain fused attention.

    Attention-capture processors (``comat_core.method.attention``) are replaced by diffusers'
    ``AttnProcessor2_0`` (what they delegate to when not recording); other processors are shared.
    Gradient checkpointing is turned off in the copy (it only runs without autograd).
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    from comat_core.method.attention import CapturingAttnProcessor

    memo: dict[int, Any] = {id(t): t for t in itertools.chain(unet.parameters(), unet.buffers())}
    for processor in getattr(unet, "attn_processors", {}).values():
        if isinstance(processor, CapturingAttnProcessor):
            memo[id(processor)] = AttnProcessor2_0()
    clone = copy.deepcopy(unet, memo)
    if getattr(clone, "is_gradient_checkpointing", False):
        clone.disable_gradient_checkpointing()
    return clone.eval()


def _lora_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in module.named_modules() if isinstance(m, LoraLayer)]


def _check_mergeable(name: str, layer) -> None:
    if not isinstance(layer.base_layer, nn.Linear):
        raise ConfigError(f"train.merge_lora_for_nograd supports LoRA on linear layers only, {name} is "
                          f"{type(layer.base_layer).__name__}; set train.merge_lora_for_nograd=false")
    for adapter in layer.active_adapters:
        if adapter in layer.lora_variant:
            raise ConfigError(f"train.merge_lora_for_nograd: {name} uses a LoRA variant (e.g. DoRA); "
                              "set train.merge_lora_for_nograd=false")
        if adapter in layer.lora_dropout and not isinstance(layer.lora_dropout[adapter], nn.Identity):
            raise ConfigError(f"train.merge_lora_for_nograd needs LoRA dropout 0 ({name} has dropout): "
                              "a merged layer cannot drop the LoRA branch only")


class _MergedLinear:
    """One merged projection: a plain ``nn.Linear`` in the copy and the PEFT layer it mirrors."""

    def __init__(self, lora_layer):
        base = lora_layer.base_layer
        self.lora = lora_layer
        self.linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.linear.weight = nn.Parameter(torch.empty_like(base.weight), requires_grad=False)
        if base.bias is not None:
            self.linear.bias = base.bias  # shared, frozen

    def tensors(self) -> list[torch.Tensor]:
        """Everything the merged weight is computed from (for the staleness check)."""
        layer = self.lora
        out = [layer.base_layer.weight]
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                out += [layer.lora_A[adapter].weight, layer.lora_B[adapter].weight]
        return out

    @torch.no_grad()
    def refresh(self) -> None:
        """``W + sum_a scale_a * B_a A_a`` computed in fp32 from the untouched base, rounded once."""
        layer = self.lora
        merged = layer.base_layer.weight.float()
        if not layer.disable_adapters:
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    merged = merged + layer.get_delta_weight(adapter).float()
        self.linear.weight.copy_(merged)


def merge_lora_into_copy(clone: nn.Module) -> list[_MergedLinear]:
    """Replace every PEFT LoRA layer of ``clone`` (a ``shared_copy``) by a merged ``nn.Linear``."""
    merged = []
    for name, layer in _lora_layers(clone):
        _check_mergeable(name, layer)
        item = _MergedLinear(layer)
        parent_name, _, child = name.rpartition(".")
        setattr(clone.get_submodule(parent_name) if parent_name else clone, child, item.linear)
        merged.append(item)
    if not merged:
        raise ConfigError("train.merge_lora_for_nograd is set but the UNet has no LoRA layers")
    return merged


class NoGradUNet:
    """Callable like the UNet (``(sample, timestep, encoder_hidden_states=..., ...)``), for no-grad calls.

    See the module docstring. ``backend`` is ``torch.compile``'s backend (tests on CPU pass
    ``"eager"`` or a counting backend: inductor takes minutes to compile the tiny UNet on 2 cores).
    """

    def __init__(self, unet: nn.Module, *, merge_lora: bool, compile: bool, compile_mode: str = "reduce-overhead",
                 max_shapes: int = 4, backend: Any = "inductor"):
        if compile_mode not in COMPILE_MODES:
            raise ConfigError(f"unknown compile mode {compile_mode!r}: use one of {', '.join(COMPILE_MODES)}")
        self.source = unet
        self.module = shared_copy(unet)
        self._merged = merge_lora_into_copy(self.module) if merge_lora else []
        self._watched: list[torch.Tensor] = [t for m in self._merged for t in m.tensors()]
        self._state: tuple | None = None
        self.refresh_if_stale()
        self.max_shapes = max_shapes
        self.shapes: set[tuple] = set()
        self._warned = False
        self._compiled = None
        self._cuda_graphs = False
        if compile:
            options = {} if backend != "inductor" else {"mode": compile_mode}
            self._compiled = torch.compile(self.module, dynamic=False, backend=backend, **options)
            device = next(unet.parameters()).device
            self._cuda_graphs = backend == "inductor" and compile_mode in _CUDA_GRAPH_MODES and device.type == "cuda"

    @property
    def merged_parameters(self) -> int:
        """Elements stored for the merged projections (the memory this copy adds)."""
        return sum(m.linear.weight.numel() for m in self._merged)

    def _weights_state(self) -> tuple:
        return tuple((t._version, t.data_ptr()) for t in self._watched) + tuple(
            tuple(m.lora.scaling.items()) for m in self._merged)

    def refresh_if_stale(self) -> bool:
        """Re-merge when a LoRA or base weight changed since the last merge; True when it did."""
        if not self._merged:
            return False
        state = self._weights_state()
        if state == self._state:
            return False
        for m in self._merged:
            m.refresh()
        self._state = state
        return True

    def _signature(self, sample: torch.Tensor, kwargs: dict) -> tuple:
        parts: list = [tuple(sample.shape), sample.dtype]
        for value in kwargs.values():
            if isinstance(value, dict):
                parts += [(k, tuple(v.shape)) for k, v in value.items() if isinstance(v, torch.Tensor)]
            elif isinstance(value, torch.Tensor):
                parts.append(tuple(value.shape))
        return tuple(parts)

    def _pick(self, sample: torch.Tensor, kwargs: dict):
        """The compiled module for a known or new shape within ``max_shapes``, else the eager copy."""
        if self._compiled is None:
            return self.module
        signature = self._signature(sample, kwargs)
        if signature in self.shapes:
            return self._compiled
        if len(self.shapes) < self.max_shapes:
            self.shapes.add(signature)
            return self._compiled
        if not self._warned:
            log.warning("no-grad UNet: %d input shapes compiled already; running shape %s eagerly",
                        self.max_shapes, signature)
            self._warned = True
        return self.module

    def __call__(self, sample: torch.Tensor, timestep, **kwargs):
        if torch.is_grad_enabled():
            raise RuntimeError("NoGradUNet is for calls under torch.no_grad(); use the generator UNet with autograd")
        self.refresh_if_stale()
        fn = self._pick(sample, kwargs)
        if self._cuda_graphs and fn is self._compiled:
            torch.compiler.cudagraph_mark_step_begin()
            out = fn(sample, timestep, **kwargs)
            return tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone()
        return fn(sample, timestep, **kwargs)
