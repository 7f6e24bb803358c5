"""The verdict classifier as a training reward (``train.losses.concept_reward: shapes_verdict``): the
config asks for its folder and the shapes world, its weights' content enters the train key (a retrained
classifier never reuses a cached training), a folder without one gets a one-line error, and the loaded
classifier is the saved one, frozen, with a gradient on the image."""

import json

import pytest
import torch
from safetensors.torch import save_file

from comat_core.config import load_config
from comat_core.errors import ConfigError, InputError
from comat_core.stages.registry import stage_config
from comat_core.worlds.shapes.verdict import RECORD, WEIGHTS, VerdictLoss, VerdictNet, load_verdict


def _save(folder, seed: int):
    torch.manual_seed(seed)
    net = VerdictNet(width=8)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(net.state_dict(), folder / WEIGHTS)
    (folder / RECORD).write_text(json.dumps({"width": 8}))
    return net


def _cfg(folder):
    return load_config("shapes", overrides=["train.losses.concept_reward=shapes_verdict", f"models.verdict={folder}"])


def test_the_verdict_reward_needs_its_folder_and_the_shapes_world(tmp_path):
    with pytest.raises(ConfigError, match="needs models.verdict"):
        load_config("shapes", overrides=["train.losses.concept_reward=shapes_verdict"])
    with pytest.raises(ConfigError, match="world.kind=shapes"):
        load_config("tiny", overrides=["train.losses.concept_reward=shapes_verdict", f"models.verdict={tmp_path}"])
    assert "verdict" not in stage_config(load_config("shapes"), "train")["models"]  # CoMat's key is unchanged


def test_the_classifiers_content_enters_the_train_key(tmp_path):
    _save(tmp_path / "v", seed=0)
    first = stage_config(_cfg(tmp_path / "v"), "train")
    assert first["models"]["verdict"].startswith(str((tmp_path / "v").resolve()))
    assert first == stage_config(_cfg(tmp_path / "v"), "train")
    _save(tmp_path / "v", seed=1)  # retrained in place: same file names and sizes
    assert stage_config(_cfg(tmp_path / "v"), "train")["models"]["verdict"] != first["models"]["verdict"]


def test_a_saved_classifier_loads_frozen_and_its_reward_reaches_the_image(tmp_path):
    net = _save(tmp_path / "v", seed=0).eval()
    loaded = load_verdict(tmp_path / "v")
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    assert torch.equal(loaded(x.detach()), net(x.detach()))
    assert not any(p.requires_grad for p in loaded.parameters())
    VerdictLoss(loaded)(x, ["a red circle", "a blue square and a green triangle"]).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(InputError, match=r"lacks verdict\.safetensors, verdict\.json"):
        load_verdict(tmp_path / "empty")


def test_the_train_stage_hands_the_trainer_the_verdict_as_its_concept_term(tmp_path):
    from types import SimpleNamespace

    from comat_core.stages.train.inputs import training_sources

    _save(tmp_path / "v", seed=0)
    gt = SimpleNamespace(latents=None, seeds=None, samples=None)
    masks = SimpleNamespace(entity_masks=None)
    sources = training_sources(_cfg(tmp_path / "v"), [], gt, masks)
    assert isinstance(sources.concept, VerdictLoss)
    assert training_sources(load_config("shapes"), [], gt, masks).concept is None  # CoMat: the captioner
