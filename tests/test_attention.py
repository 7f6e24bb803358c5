"""Cross-attention capture on the tiny SD1.5 and SDXL UNets (with LoRA and gradient checkpointing)."""

import copy

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from comat_core.method.attention import AttentionCapture, CapturingAttnProcessor
from comat_core.errors import ConfigError
from comat_core.models.loader import load_sd_pipeline

T = 77
SD15_BLOCKS = ["mid_block", "up_blocks.1"]
SDXL_BLOCKS = ["mid_block", "up_blocks.0"]


@pytest.fixture(scope="module")
def sd15_unet():
    return load_sd_pipeline("tiny://sd15", "sd15", torch.float32, "cpu").unet


@pytest.fixture(scope="module")
def sdxl_unet():
    return load_sd_pipeline("tiny://sdxl", "sdxl", torch.float32, "cpu").unet


def sd15_inputs(n=2, seed=0):
    """A CFG batch [uncond, cond] of n prompts each: latents, timestep, text states."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 4, 8, 8, generator=g).repeat(2, 1, 1, 1)
    states = torch.randn(2 * n, T, 32, generator=g)
    return latents, torch.tensor(501), states


def sdxl_kwargs(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(n, 4, 8, 8, generator=g).repeat(2, 1, 1, 1),
        "timestep": torch.tensor(501),
        "encoder_hidden_states": torch.randn(2 * n, T, 64, generator=g),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(2 * n, 32, generator=g),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(2 * n, 1),
        },
    }


def add_lora(unet):
    from peft import LoraConfig

    # init_lora_weights=False: both LoRA matrices random, so every one of them can get a gradient.
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                        init_lora_weights=False)
    unet.add_adapter(config)


def processor_kinds(unet):
    return {name: type(m.processor) for name, m in unet.named_modules() if isinstance(m, Attention)}


def test_only_configured_cross_attention_is_hooked_and_remove_restores(sd15_unet):
    unet = copy.deepcopy(sd15_unet)
    capture = AttentionCapture(unet, SD15_BLOCKS)
    kinds = processor_kinds(unet)
    hooked = {n for n, k in kinds.items() if k is CapturingAttnProcessor}
    assert hooked == {
        "mid_block.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
    }
    assert all(k is AttnProcessor2_0 for n, k in kinds.items() if n not in hooked)
    capture.remove()
    assert all(k is AttnProcessor2_0 for k in processor_kinds(unet).values())


def test_block_without_cross_attention_is_a_config_error(sdxl_unet):
    with pytest.raises(ConfigError, match="up_blocks.1"):
        AttentionCapture(copy.deepcopy(sdxl_unet), ["up_blocks.1"])  # SDXL's full-res block: no attention


def test_output_unchanged_and_maps_are_conditional_head_averaged_probabilities(sd15_unet):
    unet = copy.deepcopy(sd15_unet)
    latents, t, states = sd15_inputs()
    with torch.no_grad():
        reference = unet(latents, t, encoder_hidden_states=states).sample
        capture = AttentionCapture(unet, SD15_BLOCKS)
        outside = unet(latents, t, encoder_hidden_states=states).sample
        assert capture.pop() == {}  # nothing recorded outside the context
        with capture.capture():
            inside = unet(latents, t, encoder_hidden_states=states).sample
        maps = capture.pop()
        # The conditional half alone, recorded without the [uncond, cond] split, gives the same maps.
        with capture.capture(conditional_half=False):
            unet(latents[2:], t, encoder_hidden_states=states[2:])
        cond_only = capture.pop()
    torch.testing.assert_close(outside, reference, rtol=0, atol=0)
    torch.testing.assert_close(inside, reference, rtol=1e-5, atol=1e-5)
    assert list(maps) == capture.layer_names
    sizes = {name: m.shape for name, m in maps.items()}
    assert sizes["mid_block.attentions.0.transformer_blocks.0.attn2"] == (2, 4 * 4, T)
    assert sizes["up_blocks.1.attentions.1.transformer_blocks.0.attn2"] == (2, 8 * 8, T)
    for name, m in maps.items():
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:2]), rtol=0, atol=1e-5)
        torch.testing.assert_close(m, cond_only[name], rtol=1e-5, atol=1e-6)


def test_maps_equal_diffusers_attention_scores_averaged_over_heads(sd15_unet):
    unet = copy.deepcopy(sd15_unet)
    latents, t, states = sd15_inputs()
    module = unet.mid_block.attentions[0].transformer_blocks[0].attn2
    seen = {}
    module.register_forward_pre_hook(lambda m, args, kwargs: seen.update(x=args[0]), with_kwargs=True)
    capture = AttentionCapture(unet, ["mid_block"])
    with torch.no_grad(), capture.capture():
        unet(latents, t, encoder_hidden_states=states)
        query = module.head_to_batch_dim(module.to_q(seen["x"]))
        key = module.head_to_batch_dim(module.to_k(states))
        probs = module.get_attention_scores(query, key)  # [B * heads, h*w, T]
    expected = probs.view(4, module.heads, 16, T).mean(1)[2:]
    (recorded,) = capture.pop().values()
    torch.testing.assert_close(recorded, expected, rtol=1e-5, atol=1e-6)


def test_a_layer_run_twice_in_one_capture_is_kept_twice(sd15_unet):
    unet = copy.deepcopy(sd15_unet)
    latents, t, states = sd15_inputs()
    capture = AttentionCapture(unet, ["mid_block"])
    with torch.no_grad(), capture.capture():
        unet(latents, t, encoder_hidden_states=states)
        unet(latents, t, encoder_hidden_states=states)
    name = "mid_block.attentions.0.transformer_blocks.0.attn2"
    assert list(capture.pop()) == [name, name + "#1"]


def _map_loss(maps):
    return sum((m[..., 1:6] ** 2).sum() for m in maps.values())


def _lora_grads(unet):
    return {n: p.grad.clone() for n, p in unet.named_parameters() if "lora" in n and p.grad is not None}


def test_lora_and_gradient_checkpointing_record_once_and_give_the_same_gradients(sd15_unet):
    unet = copy.deepcopy(sd15_unet)
    add_lora(unet)
    capture = AttentionCapture(unet, SD15_BLOCKS)
    latents, t, states = sd15_inputs()
    hooked = unet.up_blocks[1].attentions[0].transformer_blocks[0].attn2
    calls = []
    hooked.register_forward_pre_hook(lambda *_: calls.append(1))

    grads = {}
    for checkpointing in (False, True):
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        unet.zero_grad(set_to_none=True)
        calls.clear()
        with capture.capture():
            unet(latents, t, encoder_hidden_states=states)
            maps = capture.pop()
            _map_loss(maps).backward()  # recomputation happens here, inside the capture context
            assert capture.pop() == {}, "recomputation during backward must not record maps"
        assert len(maps) == 3
        assert len(calls) == (2 if checkpointing else 1)  # the recompute really ran through the layer
        grads[checkpointing] = _lora_grads(unet)

    assert grads[True].keys() == grads[False].keys()
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=1e-4, atol=1e-7)
    for layer in capture.layer_names:  # the map of each hooked layer depends on its to_q and to_k LoRA
        for proj in ("to_q", "to_k"):
            for part in ("lora_A", "lora_B"):
                key = f"{layer}.{proj}.{part}.default.weight"
                assert grads[True][key].abs().sum() > 0, key


def test_sdxl_transformer_layers_are_captured_separately_with_lora_and_checkpointing(sdxl_unet):
    unet = copy.deepcopy(sdxl_unet)
    with torch.no_grad():
        reference = unet(**sdxl_kwargs()).sample
    add_lora(unet)
    for module in unet.modules():  # LoRA B = 0 again: the adapted UNet equals the base one
        if hasattr(module, "lora_B"):
            torch.nn.init.zeros_(module.lora_B["default"].weight)
    capture = AttentionCapture(unet, SDXL_BLOCKS)
    unet.enable_gradient_checkpointing()
    unet.train()
    with capture.capture():
        out = unet(**sdxl_kwargs()).sample
    maps = capture.pop()
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    # mid: 1 attention x 2 transformer layers; up_blocks.0: 2 attentions x 2 layers; each its own map.
    assert len(maps) == 6
    assert "mid_block.attentions.0.transformer_blocks.1.attn2" in maps
    assert all(m.shape == (2, 16, T) for m in maps.values())
    _map_loss(maps).backward()
    assert capture.pop() == {}
    lora_b = [p for n, p in unet.named_parameters() if "mid_block" in n and "attn2.to_k.lora_B" in n]
    assert lora_b and all(p.grad.abs().sum() > 0 for p in lora_b)
