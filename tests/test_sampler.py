"""The differentiable DDPM sampler and the backbone interface, on the tiny SD1.5 and SDXL models.

Covers: the timestep schedule and gradient-step indices, the DDPM update against diffusers, where
gradients flow (latents in the graph from the first gradient step, the UNet-input flag), that the
no-grad steps store nothing for backward, Mixed Latent, attention capture at the chosen steps, and
the SDXL conditioning (pooled embeddings, time ids, its layer set).
"""

import pytest
import torch
from diffusers import DDPMScheduler

from comat_core.method.attention import AttentionCapture
from comat_core.models.backbones import Backbone, Conditioning
from comat_core.models.lora import add_lora, lora_named_parameters
from comat_core.method.sampler import (
    DdpmSchedule,
    DifferentiableSampler,
    SamplingPlan,
    gradient_step_indices,
    max_start_index,
)
from comat_core.models.generation import SeededNoise
from lora_helpers import perturb_lora

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
PROMPTS = ["a red cube and a blue sphere", "a green bench"]




@pytest.fixture(scope="module")
def sd15():
    backbone = Backbone.load("tiny://sd15", "sd15", 64)
    add_lora(backbone.unet, 2, 2, TARGETS)
    perturb_lora(backbone.unet)
    return backbone


@pytest.fixture(scope="module")
def cond(sd15):
    return sd15.encode_prompts(PROMPTS)


def _zero_grads(unet):
    for p in unet.parameters():
        p.grad = None


# ----------------------------------------------------------------------------------------------
# Schedule and plans


def test_schedule_is_leading_with_steps_offset(sd15):
    assert DdpmSchedule(sd15.scheduler, 50).timesteps == list(range(981, 0, -20))
    assert DdpmSchedule(sd15.scheduler, 6).timesteps == [831, 665, 499, 333, 167, 1]


def test_gradient_step_indices_and_start_range(sd15):
    assert gradient_step_indices(50, 5, 3) == [3, 13, 23, 33, 43]
    assert max_start_index(50, 5) == 9
    sampler = DifferentiableSampler(sd15, 50, 7.5, 5, attribute_steps=2, gradient_checkpointing=False)
    starts = set()
    for seed in range(300):
        plan = sampler.plan(2, torch.Generator().manual_seed(seed))
        start = plan.grad_indices[0]
        starts.add(start)
        assert list(plan.grad_indices) == [start + 10 * j for j in range(5)]
        assert len(plan.attention_indices) == 2 and set(plan.attention_indices) <= set(plan.grad_indices)
        assert plan.mix_index is None
    assert starts == set(range(10))


def test_attention_steps_with_replacement_can_repeat(sd15):
    sampler = DifferentiableSampler(sd15, 50, 7.5, 5, attribute_steps=2, attribute_steps_with_replacement=True,
                                    gradient_checkpointing=False)
    sizes = {len(sampler.plan(1, torch.Generator().manual_seed(s)).attention_indices) for s in range(100)}
    assert sizes == {1, 2}  # a repeated draw collapses, as the reference's per-timestep dict did


def test_ddpm_step_equals_diffusers(sd15):
    config = sd15.scheduler.config
    schedule = DdpmSchedule(sd15.scheduler, 10)
    reference = DDPMScheduler.from_config(config)
    reference.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    for i, t in enumerate(schedule.timesteps):
        eps, x = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        expected = reference.step(eps, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(i))
        torch.testing.assert_close(schedule.step(eps, i, x, noise), expected, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Gradients


def test_latents_stay_in_graph_from_first_gradient_step(sd15, cond):
    """Only step 0 runs the UNet with autograd; its output still reaches the final latents."""
    sampler = DifferentiableSampler(sd15, 4, 7.5, 1, attribute_steps=0)
    _zero_grads(sd15.unet)
    out = sampler.sample(cond, SamplingPlan((0,)), torch.Generator().manual_seed(0))
    assert out.latents.requires_grad
    out.latents.square().mean().backward()
    grads = [p.grad for p in lora_named_parameters(sd15.unet).values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    _zero_grads(sd15.unet)


def test_no_grad_plan_builds_no_graph(sd15, cond):
    sampler = DifferentiableSampler(sd15, 4, 7.5, 1, attribute_steps=0)
    out = sampler.sample(cond, sampler.no_grad_plan(), torch.Generator().manual_seed(0))
    assert not out.latents.requires_grad


@pytest.mark.parametrize("flag", [True, False])
def test_backprop_through_unet_input_flag(sd15, cond, monkeypatch, flag):
    sampler = DifferentiableSampler(sd15, 4, 7.5, 2, backprop_through_unet_input=flag, attribute_steps=0)
    seen = []
    real_call = sd15.unet_call

    def recording_call(latents, t, c):
        seen.append((t, latents.requires_grad))
        return real_call(latents, t, c)

    monkeypatch.setattr(sd15, "unet_call", recording_call)
    sampler.sample(cond, SamplingPlan((0, 2)), torch.Generator().manual_seed(0))
    ts = sampler.timesteps
    # step 0: fresh noise; step 1: no-grad; step 2: gradient step whose input came through the graph
    assert seen == [(ts[0], False), (ts[1], False), (ts[2], flag), (ts[3], False)]


def _saved_tensor_count(backbone, cond, steps, grad_steps) -> int:
    """Tensors autograd saves for backward while sampling (outside the checkpointed blocks)."""
    sampler = DifferentiableSampler(backbone, steps, 7.5, grad_steps, attribute_steps=0)
    plan = SamplingPlan(tuple(gradient_step_indices(steps, grad_steps, 0)))
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = sampler.sample(cond, plan, torch.Generator().manual_seed(0))
    assert out.latents.requires_grad
    return count


def test_no_grad_steps_store_no_activations(sd15, cond):
    k1_t4 = _saved_tensor_count(sd15, cond, 4, 1)
    k2_t4 = _saved_tensor_count(sd15, cond, 4, 2)
    k2_t8 = _saved_tensor_count(sd15, cond, 8, 2)
    assert k1_t4 > 0
    assert k2_t8 == k2_t4  # doubling T adds only no-grad steps: nothing more is stored
    # each gradient step stores about the same (the second one's input is in the graph: a few more)
    assert 2 * k1_t4 <= k2_t4 <= 2.1 * k1_t4


# ----------------------------------------------------------------------------------------------
# Mixed Latent


def test_mixed_latent_plan(sd15):
    always = DifferentiableSampler(sd15, 6, 7.5, 2, attribute_steps=0, p_mixed=1.0, gradient_checkpointing=False)
    never = DifferentiableSampler(sd15, 6, 7.5, 2, attribute_steps=0, p_mixed=0.0, gradient_checkpointing=False)
    for seed in range(50):
        plan = always.plan(3, torch.Generator().manual_seed(seed), with_ground_truth=True)
        assert plan.mixed == (True, True, True)
        assert 0 <= plan.mix_index <= plan.grad_indices[-1]
        assert never.plan(3, torch.Generator().manual_seed(seed), with_ground_truth=True).mix_index is None
    assert always.plan(3, torch.Generator().manual_seed(0), with_ground_truth=False).mix_index is None


def test_mixed_samples_restart_from_noised_ground_truth(sd15, cond):
    sampler = DifferentiableSampler(sd15, 6, 7.5, 2, attribute_steps=0)
    plan = SamplingPlan((0, 3), mix_index=2, mixed=(True, False))
    gt = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    start_a = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    start_b = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = sampler.sample(cond, plan, torch.Generator().manual_seed(0), gt_latents=gt, latents=start_a).latents
        b = sampler.sample(cond, plan, torch.Generator().manual_seed(0), gt_latents=gt, latents=start_b).latents
        c = sampler.sample(cond, plan, torch.Generator().manual_seed(0), gt_latents=gt + 1, latents=start_a).latents
    torch.testing.assert_close(a[0], b[0])  # the mixed sample forgets its initial noise ...
    assert not torch.allclose(a[0], c[0])  # ... and follows its ground-truth latent
    assert not torch.allclose(a[1], b[1])  # the other sample is ordinary sampling
    torch.testing.assert_close(a[1], c[1])


@torch.no_grad()
def test_a_samples_stream_does_not_depend_on_whether_its_batch_mates_are_mixed(sd15, cond):
    """Sample 0's latents are the same whether its batch-mate is mixed or not (and whether all are mixed,
    when the steps before the start index are skipped), with per-sample and with whole-batch noise."""
    sampler = DifferentiableSampler(sd15, 6, 7.5, 2, attribute_steps=0, p_mixed=0.01)
    gt = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def sample_0(mixed, noise):
        plan = SamplingPlan((), mix_index=2, mixed=mixed)
        source = SeededNoise([11, 12]) if noise == "seeded" else torch.Generator().manual_seed(5)
        return sampler.sample(cond, plan, source, gt_latents=gt).latents[0]

    for noise in ("seeded", "batch"):
        assert torch.equal(sample_0((True, True), noise), sample_0((True, False), noise))  # mixed sample
        assert torch.equal(sample_0((False, True), noise), sample_0((False, False), noise))  # unmixed sample
    # the plan keeps the Mixed Latent draw when no sample is mixed, so the stream's size never follows the draws
    plans = [sampler.plan(2, torch.Generator().manual_seed(s), with_ground_truth=True) for s in range(20)]
    assert any(not any(p.mixed) for p in plans) and all(p.mix_index is not None for p in plans)


def test_mixed_sample_gets_no_gradient_from_steps_before_its_start(sd15, cond):
    """Gradient steps before the Mixed Latent start index are skipped for the mixed sample."""
    sampler = DifferentiableSampler(sd15, 6, 7.5, 2, attribute_steps=0)
    gt = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    out = sampler.sample(cond, SamplingPlan((0,), mix_index=2, mixed=(True, False)),
                         torch.Generator().manual_seed(0), gt_latents=gt)
    _zero_grads(sd15.unet)
    out.latents[0].sum().backward(retain_graph=True)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in lora_named_parameters(sd15.unet).values())
    out.latents[1].sum().backward()
    assert any(p.grad.abs().sum() > 0 for p in lora_named_parameters(sd15.unet).values())
    _zero_grads(sd15.unet)


# ----------------------------------------------------------------------------------------------
# Attention capture at the chosen steps


def test_attention_maps_only_at_attention_steps(sd15, cond):
    capture = AttentionCapture(sd15.unet, ["mid_block", "up_blocks.1"])
    try:
        sampler = DifferentiableSampler(sd15, 4, 7.5, 2, attribute_steps=1)
        out = sampler.sample(cond, SamplingPlan((0, 2), attention_indices=(2,)), torch.Generator().manual_seed(0),
                             attention=capture)
        assert len(out.attention_maps) == 1
        maps = out.attention_maps[0]
        assert list(maps) == capture.layer_names
        assert {k.split(".")[0] for k in maps} == {"mid_block", "up_blocks"}
        for m in maps.values():
            assert m.shape[0] == 2 and m.shape[2] == 77 and m.requires_grad
            torch.testing.assert_close(m.sum(-1), torch.ones_like(m.sum(-1)))
        assert capture.pop() == {}  # nothing recorded outside the attention step
    finally:
        capture.remove()


# ----------------------------------------------------------------------------------------------
# Backbones


def test_conditioning_and_decode_sd15(sd15):
    c = sd15.encode_prompts(PROMPTS)
    assert c.prompt_embeds.shape == (2, 77, 32) and c.pooled is None and c.time_ids is None
    null = sd15.null_conditioning(3)
    assert len(null) == 3 and torch.equal(null.prompt_embeds[0], sd15.encode_prompts([""]).prompt_embeds[0])
    assert sd15.latent_shape() == (4, 8, 8) and sd15.vae_scale == 8
    z = torch.randn(1, 4, 8, 8, requires_grad=True)
    image = sd15.decode(z)
    assert image.shape == (1, 3, 64, 64)
    torch.testing.assert_close(sd15.decode(z, unit_range=False), image * 2 - 1)
    image.mean().backward()
    assert z.grad.abs().sum() > 0
    assert all(p.grad is None for p in sd15.vae.parameters())


def test_vae_override():
    sdxl = Backbone.load("tiny://sdxl", "sdxl", 64, vae="tiny://sd15")  # a pipeline folder: its vae/
    assert sdxl.vae.config.scaling_factor == pytest.approx(0.18215)


def test_sdxl_conditioning_time_ids_and_layers():
    sdxl = Backbone.load("tiny://sdxl", "sdxl", 64)
    c = sdxl.encode_prompts(PROMPTS)
    assert c.prompt_embeds.shape == (2, 77, 64)  # both encoders, concatenated
    assert c.pooled.shape == (2, 32)
    assert c.time_ids.tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    cfg_batch = Conditioning.cat([sdxl.null_conditioning(2), c])
    assert cfg_batch.pooled.shape == (4, 32) and cfg_batch.time_ids.shape == (4, 6)

    add_lora(sdxl.unet, 2, 2, TARGETS)
    perturb_lora(sdxl.unet)
    capture = AttentionCapture(sdxl.unet, ["mid_block", "up_blocks.0"])
    # mid block: 2 transformer layers; up_blocks.0: 2 attentions x 2 layers
    assert len(capture.layer_names) == 6
    sampler = DifferentiableSampler(sdxl, 4, 7.5, 2, backprop_through_unet_input=False, attribute_steps=2)
    out = sampler.sample(c, SamplingPlan((1, 3), attention_indices=(1, 3)), torch.Generator().manual_seed(0),
                         attention=capture)
    assert [sorted(m) for m in out.attention_maps] == [sorted(capture.layer_names)] * 2
    loss = out.latents.square().mean() + sum(m.sum() for maps in out.attention_maps for m in maps.values())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_named_parameters(sdxl.unet).values())
    assert all(p.grad is None for enc in sdxl.text_encoders for p in enc.parameters())
