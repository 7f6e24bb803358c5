"""Config: presets follow docs/method.md, YAML + overrides merge, bad values fail with a clear message."""

import pytest

from comat_core.config import PRESETS, load_config, parse_override
from comat_core.errors import ConfigError


def test_presets_validate_and_follow_method():
    for name in PRESETS:
        cfg = load_config(name)
        assert cfg.preset == name
    sd15, sdxl = load_config("sd15"), load_config("sdxl")
    assert (sd15.train.batch_size, sd15.train.learning_rate) == (4, 5e-5)
    assert (sdxl.train.batch_size, sdxl.train.learning_rate) == (6, 2e-5)
    assert sd15.train.grad_steps == 5 and sd15.train.num_inference_steps == 50
    assert sd15.train.guidance_scale == 7.5 and sd15.train.grad_clip == 0.1
    assert sd15.train.lora.rank == 128 and sd15.train.lora.alpha == 128
    assert sd15.train.losses.token_weight == 1e-3 and sd15.train.losses.pixel_weight == 5e-5
    assert sd15.train.losses.label_smoothing == 0.1
    assert sd15.train.losses.gan_weight == 1.0 and sdxl.train.losses.gan_weight == 0.5
    assert sd15.train.discriminator.learning_rate == 2e-5 and sdxl.train.discriminator.learning_rate == 5e-5
    assert sd15.train.discriminator.betas == (0.0, 0.999)
    assert sd15.masks.box_threshold == 0.3 and sd15.masks.text_threshold == 0.25
    assert "sky" in sd15.masks.background_nouns and len(sd15.masks.background_nouns) == 58
    assert sd15.stage_order() == ["prompts", "gan_gt", "masks", "train", "evaluate"]
    assert sdxl.stage_order()[1] == "sdxl_prefinetune"
    assert load_config("tiny-sdxl").stage_order()[1] == "sdxl_prefinetune"


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: sd15\ntrain:\n  max_steps: 100\n  losses:\n    token_weight: 0.5\n")
    cfg = load_config(None, f, ["train.max_steps=7", "train.trackers=[]", "masks.backend=gsam"])
    assert cfg.preset == "sd15"
    assert cfg.train.max_steps == 7 and cfg.train.losses.token_weight == 0.5
    assert cfg.train.trackers == [] and cfg.masks.backend == "gsam"
    assert load_config("tiny", f).preset == "tiny"  # explicit preset wins over the file's


def test_override_types():
    assert parse_override("train.learning_rate=1e-4") == ("train.learning_rate", 1e-4)
    assert parse_override("train.gradient_checkpointing=false") == ("train.gradient_checkpointing", False)
    # YAML 1.1 would read these as booleans; the Literal field wants the word, the bool field accepts it
    assert load_config("tiny", overrides=["runtime.mixed_precision=no"]).runtime.mixed_precision == "no"
    assert load_config("tiny", overrides=["train.gradient_checkpointing=off"]).train.gradient_checkpointing is False


@pytest.mark.parametrize("args, needle", [
    (dict(preset="sd16"), "unknown preset 'sd16'; choose one of tiny, tiny-sdxl, sd15, sdxl, shapes"),
    (dict(overrides=["train.lr=1"]), "unknown config key 'train.lr'"),
    (dict(overrides=["train.learning_rat=1"]), "did you mean train.learning_rate?"),
    (dict(overrides=["masks.backend=sam2"]), "masks.backend: Input should be 'hf', 'gsam' or 'shapes' (got 'sam2')"),
    (dict(overrides=["train.learning_rate=-1"]), "train.learning_rate: Input should be greater than 0"),
    (dict(overrides=["train.grad_steps=60"]), "grad_steps (60) must be <= num_inference_steps (50)"),
    (dict(overrides=["train.max_steps"]), "must look like KEY=VALUE"),
])
def test_bad_config_names_the_field(args, needle):
    with pytest.raises(ConfigError) as e:
        load_config(args.get("preset", "sd15"), overrides=args.get("overrides"))
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_yaml_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  losses:\n    tokn_weight: 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.losses.tokn_weight'"):
        load_config("sd15", f)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("sd15", tmp_path / "missing.yaml")
