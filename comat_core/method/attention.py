"""Capture cross-attention probabilities from chosen UNet blocks, for attribute concentration.

CoMat's attribute concentration loss (docs/method.md §4) needs the softmax probabilities of the
cross-attention (``attn2``) layers in a few UNet blocks (SD1.5: mid block and up blocks at 16, 32
and 64 px latents; SDXL: mid and up blocks at 16 and 32). The fused SDPA kernel never
materialises those probabilities, so :class:`AttentionCapture` swaps in
:class:`CapturingAttnProcessor` on exactly those modules, and leaves every other attention on the
model's own fused processor (the reference swaps *every* processor to plain attention, which costs
memory and time everywhere).

The capturing processor computes attention explicitly (fp32 softmax) whenever it records or
autograd is on, and otherwise delegates to the fused ``AttnProcessor2_0``; either way the output
equals SDPA's within fp tolerance. Inside ``capture()`` it records the conditional half of the
``[uncond, cond]`` batch, averaged over heads (``[B, h*w, T]``, differentiable).

Why explicit whenever autograd is on, not only while recording: with (non-reentrant) gradient
checkpointing, diffusers re-runs each block during backward, usually after the capture context
has closed, and PyTorch matches the recomputed saved tensors to the original ones by order. The
recomputation must therefore take the same path as the original forward, whatever the capture
state is by then. Recording itself is skipped while the autograd engine runs (the
recomputation), so each forward records each layer once. The cost is small: only the hooked
``attn2`` layers leave the fused kernel, and cross-attention has only T = 77 keys.

It calls ``attn.to_q``/``to_k``/``to_v``/``to_out[0]``, so PEFT LoRA layers on those projections
take part.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from comat_core.errors import ConfigError

_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")


def _plain_name(name: str) -> str:
    """The module name as the bare UNet names it (without DDP / torch.compile / PeftModel prefixes)."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def _in_backward() -> bool:
    """True while the autograd engine runs a backward pass (e.g. a gradient-checkpoint recompute)."""
    return torch._C._current_graph_task_id() != -1


def cross_attention_modules(unet: torch.nn.Module, blocks: list[str]) -> dict[str, torch.nn.Module]:
    """The cross-attention (``attn2``) modules under each named block, by their bare module name.

    Raises ConfigError when a block holds no cross-attention (e.g. SDXL's full-resolution blocks).
    """
    from diffusers.models.attention_processor import Attention

    found: dict[str, torch.nn.Module] = {}
    for block in blocks:
        prefix = block.rstrip(".") + "."
        hits = {
            _plain_name(name): module
            for name, module in unet.named_modules()
            if isinstance(module, Attention)
            and _plain_name(name).startswith(prefix)
            and _plain_name(name).endswith("attn2")
            and module.is_cross_attention
        }
        if not hits:
            raise ConfigError(
                f"UNet block {block!r} has no cross-attention layers: "
                f"set train.losses.attention_blocks to blocks with cross-attention (e.g. mid_block, up_blocks.1)"
            )
        found.update(hits)
    return found


class CapturingAttnProcessor:
    """An attention processor equal to diffusers' ``AttnProcessor2_0`` that can record probabilities.

    ``store`` is the owning :class:`AttentionCapture`; ``name`` is the layer name recorded.
    """

    def __init__(self, store: "AttentionCapture", name: str):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.store = store
        self.name = name
        self._fused = AttnProcessor2_0()

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args,
        **kwargs,
    ) -> Tensor:
        record = self.store.recording and not _in_backward()
        if not (record or torch.is_grad_enabled()):
            return self._fused(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        return self._explicit_call(attn, hidden_states, encoder_hidden_states, attention_mask, temb, record)

    def _explicit_call(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, record) -> Tensor:
        """AttnProcessor2_0's computation with the attention probabilities made explicit."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key = attn.to_k(context)
        value = attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = self._attend(query, key, value, attention_mask, record)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, record: bool) -> Tensor:
        """softmax(q k^T / sqrt(d)) v, the softmax in fp32 (SDPA's scale, not ``attn.scale``, as AttnProcessor2_0)."""
        with torch.autocast(device_type=query.device.type, enabled=False):  # fp32 scores, even under autocast
            scores = (query.float() @ key.float().transpose(-1, -2)) * (1.0 / math.sqrt(query.shape[-1]))
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
            probs = scores.softmax(dim=-1)  # [B, heads, h*w, T]
        if record:
            start = self.store.first_recorded_row(probs.shape[0])
            self.store.record(self.name, probs[start:].mean(dim=1))
        return probs.to(value.dtype) @ value


class AttentionCapture:
    """Records head-averaged cross-attention probabilities of the named UNet blocks.

    ``AttentionCapture(unet, ["mid_block", "up_blocks.1"])`` installs the capturing processor on
    the ``attn2`` modules under those blocks (keeping every other processor). Maps are recorded
    only inside ``with capture.capture():``; ``pop()`` returns and clears them; ``remove()``
    restores the original processors.
    """

    def __init__(self, unet: torch.nn.Module, blocks: list[str]):
        self.modules = cross_attention_modules(unet, blocks)
        self._original = {name: module.processor for name, module in self.modules.items()}
        self._maps: dict[str, Tensor] = {}
        self._recording = False
        self._conditional_half = True
        for name, module in self.modules.items():
            module.set_processor(CapturingAttnProcessor(self, name))

    @property
    def recording(self) -> bool:
        return self._recording

    @property
    def layer_names(self) -> list[str]:
        return list(self.modules)

    @contextmanager
    def capture(self, conditional_half: bool = True) -> Iterator["AttentionCapture"]:
        """Record maps while active. ``conditional_half``: the batch is ``[uncond, cond]`` and only
        the second half is recorded (set False when the UNet sees conditional inputs only)."""
        previous = (self._recording, self._conditional_half)
        self._recording, self._conditional_half = True, conditional_half
        try:
            yield self
        finally:
            self._recording, self._conditional_half = previous

    def first_recorded_row(self, batch_size: int) -> int:
        if not self._conditional_half:
            return 0
        if batch_size % 2:
            raise ValueError(f"batch of {batch_size} is not [uncond, cond]: capture(conditional_half=False) for it")
        return batch_size // 2

    def record(self, name: str, attention_map: Tensor) -> None:
        """Keep ``attention_map`` under ``name``; a layer run again in the same capture gets ``name#k``."""
        key, k = name, 1
        while key in self._maps:
            key, k = f"{name}#{k}", k + 1
        self._maps[key] = attention_map

    def pop(self) -> dict[str, Tensor]:
        """The recorded maps (layer name -> ``[B, h*w, T]``), in recording order; clears them."""
        maps, self._maps = self._maps, {}
        return maps

    def remove(self) -> None:
        """Restore the processors the modules had before, and drop any recorded maps."""
        for name, module in self.modules.items():
            module.set_processor(self._original[name])
        self._maps = {}
