"""The three CoMat losses against hand-computed values (docs/method.md §3-5)."""

import math

import pytest
import torch
import torch.nn.functional as F

from comat_core.method.losses import (
    ConceptActivationLoss,
    EntityTarget,
    attribute_concentration_loss,
    discriminator_gan_loss,
    generator_gan_loss,
    next_token_loss,
    pixel_loss,
    resize_mask_bilinear_any,
    smoothed_cross_entropy,
    token_loss,
)
from comat_core.method.losses.concept import CLIP_MEAN, CLIP_STD
from comat_core.models.loader import load_captioner

# ------------------------------------------------------------------------------------------------
# Concept activation


@pytest.fixture(scope="module")
def captioner():
    return load_captioner("tiny://blip-caption")


@pytest.fixture
def concept(captioner):
    model, processor = captioner
    return ConceptActivationLoss(model, processor)


def hand_smoothed_ce(logits, labels, eps):
    """(1 - eps) * NLL + eps * mean_v(-log p_v), averaged over positions whose label is not -100."""
    total, count = 0.0, 0
    for row, label in zip(logits.reshape(-1, logits.shape[-1]).tolist(), labels.reshape(-1).tolist()):
        if label == -100:
            continue
        log_z = math.log(sum(math.exp(v) for v in row))
        log_p = [v - log_z for v in row]
        total += (1 - eps) * -log_p[label] + eps * sum(-lp for lp in log_p) / len(row)
        count += 1
    return total / count


def test_smoothed_cross_entropy_equals_the_hand_formula_and_torch():
    logits = torch.tensor([[[2.0, 0.5, -1.0, 0.0, 1.0], [0.1, 0.2, 0.3, 0.4, 0.5], [3.0, -2.0, 0.0, 1.0, 0.5]]])
    labels = torch.tensor([[1, -100, 4]])
    for eps in (0.0, 0.1):
        ours = smoothed_cross_entropy(logits, labels, eps)
        assert ours.item() == pytest.approx(hand_smoothed_ce(logits, labels, eps), rel=1e-6)
        torch_value = F.cross_entropy(logits.view(-1, 5), labels.view(-1), label_smoothing=eps)
        torch.testing.assert_close(ours, torch_value)


def test_labels_mask_the_prefix_and_padding_and_keep_sep(concept):
    tokenizer = concept.tokenizer
    input_ids, attention_mask, labels = concept.tokenize(["A Red car", "a cube"])
    n_prefix = len(tokenizer("a photography of").input_ids) - 1  # [CLS] a photography of
    assert n_prefix == 4
    assert tokenizer.convert_ids_to_tokens(input_ids[0, :n_prefix].tolist()) == ["[CLS]", "a", "photography", "of"]
    assert (labels[:, :n_prefix] == -100).all()
    assert labels[0, n_prefix:].tolist() == input_ids[0, n_prefix:].tolist()  # the prompt, lowercased, + [SEP]
    assert tokenizer.convert_ids_to_tokens(labels[0, n_prefix:].tolist()) == ["a", "red", "car", "[SEP]"]
    assert attention_mask[1, -1] == 0 and labels[1, -1] == -100  # padding of the shorter prompt
    assert labels[1, n_prefix + 2] == tokenizer.sep_token_id


def test_prefix_logits_do_not_count_and_smoothing_adds_the_expected_amount(concept):
    input_ids, _, labels = concept.tokenize(["a red car", "a cube"])
    vocab = len(concept.tokenizer)
    logits = torch.randn(*input_ids.shape, vocab, generator=torch.Generator().manual_seed(0))
    base = next_token_loss(logits, labels, 0.1)
    assert base.item() == pytest.approx(hand_smoothed_ce(logits[:, :-1], labels[:, 1:], 0.1), rel=1e-5)

    changed = logits.clone()
    changed[:, 0:3] += 5 * torch.randn(2, 3, vocab)  # positions predicting "a photography of"
    changed[:, -1] += 5.0  # the last position predicts nothing
    torch.testing.assert_close(next_token_loss(changed, labels, 0.1), base)
    changed[0, 3, 7] += 5.0  # position 3 predicts the first prompt token: counted
    assert (next_token_loss(changed, labels, 0.1) - base).abs() > 1e-4

    # eps = 0.1 minus eps = 0: 0.1 * mean over scored tokens of (mean_v(-log p_v) - NLL).
    log_p = logits[:, :-1].log_softmax(-1)
    target = labels[:, 1:]
    scored = target != -100
    nll = -log_p.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected = 0.1 * ((-log_p.mean(-1) - nll)[scored]).mean()
    torch.testing.assert_close(base - next_token_loss(logits, labels, 0.0), expected)


def test_loss_equals_blip_own_loss_with_label_smoothing_0_1(captioner, concept):
    model, _ = captioner
    images = torch.rand(2, 3, 66, 66, generator=torch.Generator().manual_seed(1))
    prompts = ["a red car", "a blue cube on a table"]
    ours = concept(images, prompts, generator=torch.Generator().manual_seed(5))
    pixel_values = concept.preprocess(images, torch.Generator().manual_seed(5))
    input_ids, attention_mask, labels = concept.tokenize(prompts)
    saved = model.text_decoder.label_smoothing
    model.text_decoder.label_smoothing = 0.1
    try:
        theirs = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                       labels=labels).loss
    finally:
        model.text_decoder.label_smoothing = saved
    torch.testing.assert_close(ours, theirs)


def test_gradient_reaches_the_image(concept):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    loss = concept(images, ["a red car", "a green sphere"], generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_crop_offsets_stay_in_range_and_preprocess_crops_resizes_normalises(concept):
    offsets = {concept.crop_offsets(torch.Generator().manual_seed(s)) for s in range(60)}
    assert {top for top, _ in offsets} == {0, 1, 2} and {left for _, left in offsets} == {0, 1, 2}

    images = torch.rand(2, 3, 66, 66, generator=torch.Generator().manual_seed(3))
    top, left = concept.crop_offsets(torch.Generator().manual_seed(7))
    out = concept.preprocess(images, torch.Generator().manual_seed(7))
    assert out.shape == (2, 3, 64, 64)  # the captioner's size
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    # 66 px minus the 2-px crop is already 64 px: the resize is the identity, so this checks the window.
    torch.testing.assert_close(out * std + mean, images[:, :, top : top + 64, left : left + 64])

    big = concept.preprocess(torch.rand(1, 3, 130, 130), torch.Generator().manual_seed(0))
    assert big.shape == (1, 3, 64, 64)


# ------------------------------------------------------------------------------------------------
# Attribute concentration

MASK_4x4 = torch.zeros(4, 4)
MASK_4x4[:2, :2] = 1  # pixels 0, 1, 4, 5 (row-major): 4 of 16


def designed_map():
    """[16, 3] probabilities: token 1 is 0.6 in the mask and 0.2 outside, token 2 is 0.3 everywhere."""
    inside = MASK_4x4.reshape(-1).bool()
    a = torch.empty(16, 3)
    a[:, 1] = torch.where(inside, 0.6, 0.2)
    a[:, 2] = 0.3
    a[:, 0] = 1 - a[:, 1] - a[:, 2]
    return a


def test_token_loss_uniform_map_is_one_minus_mask_fraction_squared():
    uniform = torch.full((16, 5), 0.2)
    loss = token_loss(uniform, [EntityTarget([2, 3], MASK_4x4)])
    assert loss.item() == pytest.approx((1 - 4 / 16) ** 2)


def test_token_and_pixel_loss_hand_values():
    entity = EntityTarget([1, 2], MASK_4x4)
    # token 1: 4*0.6 / (4*0.6 + 12*0.2) = 0.5 -> 0.25; token 2: 4*0.3 / (16*0.3) = 0.25 -> 0.5625.
    assert token_loss(designed_map(), [entity]).item() == pytest.approx((0.25 + 0.5625) / 2)
    # summed map: 0.9 inside, 0.5 outside; BCE mean over 16 pixels.
    expected = (4 * -math.log(0.9) + 12 * -math.log(1 - 0.5)) / 16
    assert pixel_loss(designed_map(), [entity]).item() == pytest.approx(expected, rel=1e-6)


def test_losses_average_over_entities():
    whole = EntityTarget([2], torch.ones(4, 4))  # token 2 fully inside: token loss 0
    first = EntityTarget([1, 2], MASK_4x4)
    a = designed_map()
    assert token_loss(a, [first, whole]).item() == pytest.approx((0.40625 + 0.0) / 2)
    whole_bce = -math.log(0.3)  # mask all ones, map 0.3 everywhere
    assert pixel_loss(a, [first, whole]).item() == pytest.approx(
        (pixel_loss(a, [first]).item() + whole_bce) / 2, rel=1e-6)


def test_resize_mask_follows_the_reference_antialiased_bilinear_any_overlap():
    mask = torch.zeros(8, 8)
    mask[0, 0] = 1  # a corner pixel only touches its own 2x2 cell
    assert resize_mask_bilinear_any(mask, 4).nonzero().tolist() == [[0, 0]]
    mask = torch.zeros(8, 8)
    mask[1, 1] = 1  # within half a cell of the next cells: they turn on too (the reference's dilation)
    assert resize_mask_bilinear_any(mask, 4).nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    torch.testing.assert_close(resize_mask_bilinear_any(MASK_4x4, 4), MASK_4x4)  # same size: unchanged
    assert resize_mask_bilinear_any(MASK_4x4, 2).sum() == 4  # a quarter at 4x4 reaches every cell at 2x2
    assert resize_mask_bilinear_any(torch.ones(2, 2), 4).sum() == 16


def test_attribute_loss_layers_resolutions_and_batch():
    a16 = designed_map()
    b16 = torch.full((16, 3), 1 / 3)
    c4 = torch.tensor([[0.5, 0.4, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.3, 0.3, 0.4]])  # 2x2
    empty = torch.full((16, 3), 1 / 3)  # second image has no entity
    maps = {
        "up.a": torch.stack([a16, empty]),
        "up.b": torch.stack([b16, empty]),
        "mid": torch.stack([c4, torch.full((4, 3), 1 / 3)]),
    }
    corner = torch.zeros(4, 4)
    corner[0, 0] = 1  # at 2x2: the top-left cell only
    entity = EntityTarget([1, 2], corner)
    targets = [[entity], []]
    token_sum = token_loss(a16, [entity]) + token_loss(b16, [entity]) + token_loss(c4, [entity])
    pixel_sum = pixel_loss((a16 + b16) / 2, [entity]) + pixel_loss(c4, [entity])
    # token 1 over the 2x2 map: 0.4 of 1.7 in the cell; token 2: 0.1 of 1.2.
    assert token_loss(c4, [entity]).item() == pytest.approx(((1 - 0.4 / 1.7) ** 2 + (1 - 0.1 / 1.2) ** 2) / 2)

    tokens, pixels = attribute_concentration_loss(maps, targets, layer_scale="sum")
    torch.testing.assert_close(tokens, token_sum / 2)  # divided by the batch size, empty image included
    torch.testing.assert_close(pixels, pixel_sum / 2)
    tokens_scaled, pixels_again = attribute_concentration_loss(maps, targets, layer_scale="sd15")
    torch.testing.assert_close(tokens_scaled, token_sum / 2 * 10 / 3)  # 3 layers brought to SD1.5's 10
    torch.testing.assert_close(pixels_again, pixels)
    with pytest.raises(ValueError, match="layer_scale"):
        attribute_concentration_loss(maps, targets, layer_scale="mean")


def _reference_token_term(maps: dict, mask: torch.Tensor, tokens: list[int], weight: float) -> float:
    """The reference's formula by hand: per layer (1 - in-mask share)^2 over tokens, summed over layers, times the weight."""
    total = 0.0
    for m in maps.values():
        a = m[0].double()
        side = int(a.shape[0] ** 0.5)
        cell = resize_mask_bilinear_any(mask, side).reshape(-1).double()
        per_token = [(1 - (a[:, t] * cell).sum() / a[:, t].sum()) ** 2 for t in tokens]
        total += float(sum(per_token) / len(per_token))
    return weight * total


@pytest.mark.parametrize("preset, layers, scale", [("sd15", 10, 1.0), ("sdxl", 46, 10 / 46)])
def test_token_term_of_the_presets_matches_the_reference_formula(preset, layers, scale):
    """SD1.5's default is the reference exactly (sum over its 10 layers at 1e-3); SDXL's 46-layer sum is brought to that scale."""
    from comat_core.config import load_config

    lc = load_config(preset).train.losses
    g = torch.Generator().manual_seed(layers)
    maps = {f"layer{i}": torch.rand(1, (8 if i % 2 else 16) ** 2, 6, generator=g).softmax(-1) for i in range(layers)}
    mask = torch.zeros(32, 32)
    mask[4:20, 8:24] = 1
    tokens = [2, 3]
    token, _ = attribute_concentration_loss(maps, [[EntityTarget(tokens, mask)]], layer_scale=lc.token_loss_layer_scale)
    expected = _reference_token_term(maps, mask, tokens, lc.token_weight) * scale
    assert lc.token_weight == 1e-3
    assert lc.token_weight * token.item() == pytest.approx(expected, rel=1e-5)


def test_attribute_loss_gradient_and_no_entities():
    logits = torch.randn(2, 16, 5, requires_grad=True)
    maps = {"mid": logits.softmax(-1)}
    tokens, pixels = attribute_concentration_loss(maps, [[], []])
    assert tokens.item() == 0 and pixels.item() == 0
    (tokens + pixels).backward()  # connected to the graph: a loss of its own is valid
    maps = {"mid": logits.softmax(-1)}
    tokens, pixels = attribute_concentration_loss(maps, [[EntityTarget([1, 3], MASK_4x4)], []])
    (tokens + pixels).backward()
    assert logits.grad[0].abs().sum() > 0 and logits.grad[1].abs().sum() == 0


def test_pixel_loss_runs_under_autocast_and_tolerates_rounding_above_one():
    a = designed_map()
    a[:, 1] += 1e-7  # token maps summing a hair above 1 must not crash BCE
    a[:, 2] = 1 - a[:, 1] + 1e-7
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pixel_loss(a.bfloat16(), [EntityTarget([1, 2], MASK_4x4)])
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_entity_token_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="outside"):
        token_loss(designed_map(), [EntityTarget([3], MASK_4x4)])


# ------------------------------------------------------------------------------------------------
# Fidelity (GAN)


def softplus(x):
    return math.log1p(math.exp(x))


def test_gan_losses_equal_hand_values():
    fake = torch.tensor([[0.0, 2.0]])
    real = torch.tensor([[-1.0, 3.0]])
    # BCE_with_logits(x, 1) = log(1 + e^-x); BCE_with_logits(x, 0) = log(1 + e^x)
    assert generator_gan_loss(fake).item() == pytest.approx((softplus(-0.0) + softplus(-2.0)) / 2)
    expected_d = (softplus(0.0) + softplus(2.0) + softplus(1.0) + softplus(-3.0)) / 4
    assert discriminator_gan_loss(fake, real).item() == pytest.approx(expected_d)
    torch.testing.assert_close(
        discriminator_gan_loss(fake, real),
        F.binary_cross_entropy_with_logits(torch.cat([fake, real]), torch.tensor([[0.0, 0.0], [1.0, 1.0]])),
    )


def test_gan_losses_in_fp32_with_gradients():
    fake = torch.randn(2, 8, 8, 1, dtype=torch.bfloat16, requires_grad=True)
    loss = generator_gan_loss(fake)
    loss.backward()
    assert loss.dtype == torch.float32 and fake.grad.abs().sum() > 0
