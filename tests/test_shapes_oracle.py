"""The shapes world's judge oracle (``train.losses.concept_reward: shapes_judge``): its target is right
by the judge, a right image gets no pull, a wrong one gets a gradient toward the target; the config
refuses it outside the shapes world and keeps CoMat's train keys; the trainer uses it in place of
the captioner."""

import numpy as np
import pytest
import torch

from comat_core.config import TrainConfig, load_config
from comat_core.errors import ConfigError
from comat_core.worlds.shapes.judge import score
from comat_core.worlds.shapes.oracle import JudgeTargetLoss, target_scene
from comat_core.worlds.shapes.render import caption, render, sample_scene


def _image(pairs, seed=0) -> tuple[torch.Tensor, str]:
    scene = sample_scene(np.random.default_rng(seed), pairs, sizes=["large"] * len(pairs))
    pixels = render(scene)[0]
    return torch.from_numpy(pixels).permute(2, 0, 1).float()[None] / 255.0, caption(scene)


def test_a_right_render_is_its_own_target_and_a_soft_right_image_is_pulled_to_it():
    image, prompt = _image([("red", "circle"), ("blue", "square")])
    image.requires_grad_(True)
    loss = JudgeTargetLoss()(image, [prompt], torch.Generator().manual_seed(0))
    assert loss.item() < 2e-3  # the judge's boxes give back the render within a pixel's edge
    soft = torch.nn.functional.avg_pool2d(image.detach(), 3, stride=1, padding=1, count_include_pad=False)
    assert score(soft[0], prompt).binding, "a blurred right image is still right"
    soft.requires_grad_(True)
    pulled = JudgeTargetLoss()(soft, [prompt], torch.Generator().manual_seed(0))
    pulled.backward()
    assert pulled.item() > loss.item() and soft.grad.abs().sum() > 0  # right, but held to its clean render


@pytest.mark.parametrize("prompt", ["a blue circle and a red square",  # the image's colours swapped
                                    "a green triangle",                 # neither colour nor shape there
                                    "a red diamond, a blue square and a yellow circle"])  # one object more
def test_a_wrong_image_is_pulled_toward_a_target_the_judge_reads_as_right(prompt):
    image, _ = _image([("red", "circle"), ("blue", "square")])
    assert not score(image[0], prompt).binding
    verdict = score(image[0], prompt)
    target = render(target_scene(verdict.found, prompt, np.random.default_rng(0)))[0]
    assert score(target, prompt).binding, "the oracle's target must be right by the judge"
    image.requires_grad_(True)
    loss = JudgeTargetLoss()(image, [prompt], torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.item() > 0 and image.grad.abs().sum() > 0
    with torch.no_grad():  # a small step down the gradient moves the image toward the target
        moved = image - 0.5 * image.grad / image.grad.abs().max()
    target_t = torch.from_numpy(target).permute(2, 0, 1).float()[None] / 255.0
    assert (moved - target_t).square().mean() < (image - target_t).square().mean()


def test_objects_keep_their_places_when_the_colour_is_there():
    image, _ = _image([("red", "circle"), ("blue", "square")])
    found = score(image[0], "a red triangle and a blue diamond").found
    scene = target_scene(found, "a red triangle and a blue diamond", np.random.default_rng(0))
    by_colour = {f.colour: f.centre for f in found}
    for obj in scene.objects:
        assert (obj.x, obj.y) == by_colour[obj.colour]


def test_a_blank_image_gets_the_prompts_objects_at_the_same_free_spots_every_step():
    blank = torch.full((2, 3, 64, 64), 200 / 255.0, requires_grad=True)
    prompts = ["a red circle", "a green triangle and a black square"]
    loss_fn = JudgeTargetLoss()
    first = loss_fn(blank, prompts, torch.Generator().manual_seed(3))
    again = loss_fn(blank, prompts, torch.Generator().manual_seed(4))  # another step's generator
    assert first.item() > 0 and first.item() == again.item()


def test_the_oracle_needs_the_shapes_world():
    with pytest.raises(ConfigError, match="world.kind=shapes"):
        load_config("tiny", overrides=["train.losses.concept_reward=shapes_judge"])
    cfg = load_config("shapes", overrides=["train.losses.concept_reward=shapes_judge"])
    assert cfg.train.losses.concept_reward == "shapes_judge"


def test_the_default_reward_keeps_the_train_key_and_the_oracle_changes_it():
    default = TrainConfig().key_dump()
    assert "concept_reward" not in default["losses"]  # train outputs made before the field keep their keys
    oracle = TrainConfig(losses={"concept_reward": "shapes_judge"}).key_dump()
    assert oracle["losses"]["concept_reward"] == "shapes_judge"


def test_the_trainer_uses_a_concept_term_in_place_of_the_captioner():
    from comat_core.method.data import TrainingData
    from comat_core.method.trainer import build_training, generator_losses, step_generators
    from comat_core.models.lora import lora_named_parameters
    from test_trainer import FAST, _sources

    calls = []

    def brightness(images, prompts, generator):  # a stand-in reward with the oracle's signature
        calls.append(len(prompts))
        return images.float().mean()

    cfg = load_config("tiny", overrides=FAST + ["train.losses.token_weight=0", "train.losses.pixel_weight=0",
                                                "train.losses.gan_weight=0"])
    tr = build_training(cfg, concept_override=brightness)
    assert tr.concept is brightness
    inputs = TrainingData(_sources(), 8, with_targets=False).inputs([0, 1])
    cpu, noise = step_generators(0, 0, 0, tr.device)
    terms, _ = generator_losses(tr, inputs, cpu, noise)
    terms["concept"].backward()
    assert calls == [2]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_named_parameters(tr.unet).values())
