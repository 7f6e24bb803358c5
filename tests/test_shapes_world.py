"""The shapes world: the renderer is deterministic and exact, the judge agrees with it, prompts parse."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from comat_core.errors import InputError
from comat_core.worlds.shapes import judge
from comat_core.worlds.shapes.render import caption, render, sample_scene
from comat_core.worlds.shapes.vocab import BACKGROUND, COLOURS, SHAPES, parse_prompt

PAIRS = list(itertools.product(COLOURS, SHAPES))


def random_scenes(seed: int, n: int):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        k = int(rng.integers(1, 4))
        pairs = [PAIRS[j] for j in rng.choice(len(PAIRS), k)]
        yield sample_scene(rng, pairs, relation=bool(rng.integers(2)), with_size=bool(rng.integers(2)))


def test_render_is_deterministic_and_masks_are_exact():
    a = list(random_scenes(3, 20))
    b = list(random_scenes(3, 20))
    assert a == b
    for scene in a:
        image, masks = render(scene)
        assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
        assert not np.logical_and.reduce(masks).any() if len(masks) > 1 else True
        for obj, mask in zip(scene.objects, masks):
            assert mask.sum() > 60  # the smallest object is still an object
            assert (image[mask] == COLOURS[obj.colour]).all()
        assert (image[~np.logical_or.reduce(masks)] == BACKGROUND).all()


def test_judge_agrees_with_renderer_on_1000_renders():
    agree, relation_ok, relations = 0, 0, 0
    for scene in random_scenes(0, 1000):
        image, masks = render(scene)
        verdict = judge.score(image, caption(scene))
        mask_ok = all(any((f.mask == m).all() for f in verdict.found) for m in masks)
        agree += verdict.binding and verdict.validity == 1.0 and mask_ok
        if verdict.relation is not None:
            relations += 1
            relation_ok += verdict.relation
    assert agree >= 990, f"judge agrees with the renderer on {agree}/1000 renders"
    assert relation_ok >= 0.99 * relations


def degrade(image: np.ndarray, rng: np.random.Generator, noise: float, tint: float) -> np.ndarray:
    """What generated images look like: a tinted background and colours, Gaussian noise, soft edges."""
    x = image.astype(np.float32) + rng.uniform(-tint, tint, 3)
    x = (x + np.roll(x, 1, 0) + np.roll(x, 1, 1) + np.roll(x, -1, 0) + np.roll(x, -1, 1)) / 5 * 0.5 + x * 0.5
    x += rng.normal(0.0, noise, x.shape)
    return np.clip(x, 0, 255).astype(np.uint8)


def test_judge_is_robust_to_tint_noise_and_soft_edges():
    rng = np.random.default_rng(7)
    scenes = list(random_scenes(1, 300))
    ok = sum(judge.score(degrade(render(s)[0], rng, noise=15, tint=30), caption(s)).binding for s in scenes)
    assert ok >= 0.97 * len(scenes)


def test_judge_names_shapes_with_rounded_corners():
    """A decoder rounds corners and tips: a rounded square is still a square, a rounded diamond a diamond."""
    scenes = list(random_scenes(6, 200))
    ok = 0
    for scene in scenes:
        _, masks = render(scene)
        image = np.empty((64, 64, 3), dtype=np.uint8)
        image[:] = BACKGROUND
        for obj, mask in zip(scene.objects, masks):
            image[judge._soften(mask, 2)] = COLOURS[obj.colour]
        ok += judge.score(image, caption(scene)).binding
    assert ok >= 0.97 * len(scenes)


def test_judge_catches_wrong_binding_extra_objects_and_artefacts():
    rng = np.random.default_rng(5)
    scene = sample_scene(rng, [("red", "circle"), ("blue", "square")])
    image, _ = render(scene)
    assert judge.score(image, "a red circle and a blue square").binding
    swapped = judge.score(image, "a blue circle and a red square")
    assert not swapped.binding and swapped.recall == 0.0
    missing = judge.score(image, "a red circle")  # an extra object is not allowed
    assert not missing.binding and missing.recall == 1.0
    soup = rng.integers(0, 256, image.shape, dtype=np.uint8)  # texture soup explains nothing
    verdict = judge.score(soup, "a red circle")
    assert not verdict.binding and verdict.validity < 0.3
    blob = image.copy()
    blob[5:30:2, 5:40] = COLOURS["green"]  # a striped green rectangle: not a shape
    assert not judge.score(blob, "a red circle and a blue square").binding


def test_parser_reads_every_template_and_rejects_the_rest():
    for scene in random_scenes(2, 200):
        assert parse_prompt(caption(scene)).pairs() == scene.colour_shape_pairs()
    parsed = parse_prompt("a small red circle on the left of a blue square")
    assert parsed.relation == "on the left of" and parsed.objects[0].size == "small"
    for bad in ["a red cat", "a circle", "a red circle and", "two red circles", ""]:
        with pytest.raises(InputError, match="shapes-world caption"):
            parse_prompt(bad)


def test_shapes_masks_backend_returns_the_judges_objects_per_noun():
    import torch

    from comat_core.config import load_config
    from comat_core.stages.masks.factory import make_backend

    cfg = load_config("tiny", overrides=["masks.backend=shapes"])
    backend = make_backend(cfg, torch.device("cpu"), torch.float32)
    scene = sample_scene(np.random.default_rng(4), [("red", "circle"), ("blue", "square"), ("green", "circle")])
    image, masks = render(scene)
    images = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    (result,) = backend.detect_and_segment(images, [["circle", "square", "triangle", "red circle"]])
    boxes, scores, mask = result["circle"]
    assert boxes.shape == (2, 4) and scores.min() > 0.9
    assert torch.equal(mask, torch.from_numpy(masks[0] | masks[2]))  # a bare noun: every circle
    assert torch.equal(result["red circle"][2], torch.from_numpy(masks[0]))  # with its colour: that one only
    assert torch.equal(result["square"][2], torch.from_numpy(masks[1]))
    assert result["triangle"][2] is None and result["triangle"][0].shape == (0, 4)


def test_prompt_split_keeps_every_evaluation_category_out_of_training():
    from comat_core.worlds.shapes.splits import N_NEW_PAIRS, prompt_split

    split = prompt_split(seed=0, n_eval=64)

    def combo(p):
        return frozenset(parse_prompt(p).pairs())

    train = {combo(p) for p in split.train}
    for held_out in (split.eval_two, split.eval_new, split.eval_three, split.eval_relation):
        assert held_out and not {combo(p) for p in held_out} & train
    counts = [len(parse_prompt(p).objects) for p in split.train]  # CoMat prompts mix 1, 2 and 3 objects
    assert {1, 2, 3} <= set(counts) and counts.count(2) > counts.count(3) > counts.count(1) > 0
    new = set(split.new_pairs)
    assert len(new) == N_NEW_PAIRS and len({s for _, s in new}) == N_NEW_PAIRS  # one per shape
    assert not any(new & set(parse_prompt(p).pairs()) for p in split.train)  # no training prompt holds them
    assert all(new & set(parse_prompt(p).pairs()) for p in split.eval_new)
    assert not any(new & set(parse_prompt(p).pairs()) for p in split.eval_two)  # the headline: trained pairs
    assert all(parse_prompt(p).relation for p in split.eval_relation)
    assert all(len(parse_prompt(p).objects) == 3 for p in split.eval_three) and len(split.eval_single) == 24
    assert prompt_split(seed=0, n_eval=64) == split and prompt_split(seed=1, n_eval=64) != split


def test_pair_designs_uniform_by_default_latin_square_as_an_option():
    from comat_core.worlds.shapes.settings import WorldConfig
    from comat_core.worlds.shapes.splits import base_pair_weights, pair_kind

    assert WorldConfig().pair_design == "uniform" and WorldConfig.version2().pair_design == "latin"
    assert len(set(base_pair_weights("uniform").values())) == 1
    assert {pair_kind(p, "uniform") for p in PAIRS} == {"seen"}
    kinds = [pair_kind(p, "latin") for p in PAIRS]
    assert kinds.count("unseen") == 6 and kinds.count("rare") == 6 and kinds.count("seen") == 12
    for colour in COLOURS:  # every colour is common on some shape, and every shape in some colour
        assert sum(pair_kind((colour, s), "latin") == "seen" for s in SHAPES) == 2
    for shape in SHAPES:
        assert any(pair_kind((c, shape), "latin") == "seen" for c in COLOURS)


def test_base_data_follows_its_object_counts_and_pair_weights():
    from comat_core.worlds.shapes.settings import WorldConfig
    from comat_core.worlds.shapes.data import base_dataset
    from comat_core.worlds.shapes.splits import pair_kind

    data = base_dataset(300, seed=5, count_weights=WorldConfig().base_object_counts)
    counts = np.bincount([len(parse_prompt(c).objects) for c in data.captions], minlength=4)[1:] / 300
    assert np.allclose(counts, WorldConfig().base_object_counts, atol=0.08)  # 1, 2, 3 objects
    two = base_dataset(50, seed=5, count_weights=(0, 1, 0))
    assert all(len(parse_prompt(c).objects) == 2 for c in two.captions)
    assert not any(pair_kind(p) == "unseen" for c in data.captions for p in parse_prompt(c).pairs())
    with pytest.raises(ValueError, match="positive sum"):
        WorldConfig(base_object_counts=(0, 0, 0))


def test_loose_captions_attach_colours_to_the_wrong_objects_and_only_there():
    """With swap_p the images are the same; multi-object captions carry the right colours and shapes
    but the colours on the wrong objects, about swap_p of the time; single objects stay exact."""
    from comat_core.worlds.shapes.data import base_dataset

    kwargs = dict(count_weights=(0.3, 0.5, 0.2), design="uniform")
    exact = base_dataset(400, seed=3, **kwargs)
    loose = base_dataset(400, seed=3, swap_p=0.5, **kwargs)
    assert np.array_equal(exact.images, loose.images) and loose.exact == exact.captions and exact.exact is None
    changed, multi = 0, 0
    for image, said, true in zip(loose.images, loose.captions, loose.exact):
        n = len(parse_prompt(true).objects)
        if n == 1:
            assert said == true
            continue
        distinct = len({c for c, _ in parse_prompt(true).pairs()}) > 1
        multi += distinct
        if said != true:
            changed += 1
            if len({s for _, s in parse_prompt(true).pairs()}) < n:
                continue  # two objects of one shape: a swap of their colours names the same objects
            verdict = judge.score(image, said)
            assert not verdict.binding and judge.colours_right(verdict) and judge.shapes_right(verdict)
            assert judge.failure(verdict) == "colours swapped"
    assert 0.4 < changed / multi < 0.6


def test_world_config_checks_sizes_and_phases():
    from pydantic import ValidationError

    from comat_core.worlds.shapes.settings import WorldConfig

    assert WorldConfig().latent_size == 16 and WorldConfig.version2().latent_size == 8
    with pytest.raises(ValidationError, match="size_ranges"):
        WorldConfig(size_ranges={"small": (16, 20)})
    with pytest.raises(ValidationError, match="freeze_text_after"):
        WorldConfig(unet_steps=100, freeze_text_after=200)


def test_world_stage_code_version_is_the_worlds_version():
    """A new world never hits an old world's stage key (nor the local model cache kept under it)."""
    from comat_core.stages.registry import STAGES
    from comat_core.worlds.shapes.settings import WORLD_VERSION

    assert STAGES["world"].code_version == str(WORLD_VERSION)


def test_smoke_world_build_is_deterministic_and_loadable(tmp_path):
    """Two smoke builds from one seed give byte-identical weights; the folders load as the pipeline loads them."""
    import json

    from comat_core.models.loader import load_captioner, load_sd_pipeline
    from comat_core.worlds.shapes.build import WorldConfig, build_world

    config = WorldConfig.smoke()
    world = build_world(config, tmp_path / "a")
    build_world(config, tmp_path / "b")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.safetensors"))
    assert len(files) == 4  # vae, unet, text encoder, captioner
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    saved = json.loads((tmp_path / "a" / "world.json").read_text())
    metrics = saved["metrics"]
    assert metrics == world["metrics"] and set(metrics["base"]) == {"single", "two", "new", "three", "relation"}
    assert set(metrics["base"]["two"]["taxonomy"]) == set(judge.FAILURES)
    assert set(metrics["gates"]) == {"single_accuracy", "single_validity", "two_object_shape_recall", "heldout_binding",
                                     "captioner_binding_on_base", "vae_two_object_binding"}
    assert all(v is None or 0.0 <= v <= 1.0 for v in metrics["gates"].values())
    assert 0.0 <= metrics["captioner_binding"] <= 1.0
    pipe = load_sd_pipeline(str(tmp_path / "a" / "base"), "sd15")
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.vae_scale_factor == 4  # 16x16 latents
    model, processor = load_captioner(str(tmp_path / "a" / "captioner"))
    assert type(model).__name__ == "BlipForConditionalGeneration"


def test_refining_a_saved_world_equals_building_with_the_refinement(tmp_path):
    """Phase 3 run alone on a saved world (``--refine-from``) gives the weights a build from scratch with
    ``refine_steps`` gives, byte for byte; a saved world built with other settings is refused."""
    from comat_core.worlds.shapes.build import WorldConfig, build_world, refine_saved_world

    plain, refined = WorldConfig.smoke(refine_steps=0), WorldConfig.smoke(refine_steps=2, refine_text=False)
    build_world(plain, tmp_path / "plain")
    world = refine_saved_world(refined, tmp_path / "plain", tmp_path / "later")
    build_world(refined, tmp_path / "scratch")
    files = sorted(p.relative_to(tmp_path / "scratch") for p in (tmp_path / "scratch").rglob("*.safetensors"))
    assert len(files) == 4
    for rel in files:
        assert (tmp_path / "later" / rel).read_bytes() == (tmp_path / "scratch" / rel).read_bytes(), rel
    assert world["config"]["refine_steps"] == 2 and "unet_refine_loss" in world["metrics"]
    plain_bytes = (tmp_path / "plain" / "base" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert plain_bytes != (tmp_path / "later" / "base" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="swap_p"):
        refine_saved_world(refined.model_copy(update=dict(swap_p=0.3)), tmp_path / "plain", tmp_path / "bad")
    with pytest.raises(ValueError, match="refined already"):
        refine_saved_world(refined, tmp_path / "later", tmp_path / "twice")


def test_shipped_world_is_the_default_build_and_records_its_gates():
    """The pretrained world in the package is ``WorldConfig()``'s (so the preset copies it), records every
    gate and whether it is met, and its base model draws clean single objects; its captioner binds."""
    import json

    from comat_core.models.loader import load_captioner
    from comat_core.stages.world import shipped_matches
    from comat_core.worlds.shapes import PRETRAINED, captioner
    from comat_core.worlds.shapes.measure import GATES, gate_report, generate, load_base
    from comat_core.worlds.shapes.settings import WORLD_VERSION, WorldConfig

    world = json.loads((PRETRAINED / "world.json").read_text())
    assert world["version"] == WORLD_VERSION and shipped_matches(WorldConfig())
    gates = world["metrics"]["gates"]
    assert set(gates) == set(GATES) and world["metrics"]["gates_met"] == gate_report(gates)
    assert world["metrics"]["captioner_binding"] >= 0.95
    prompts = [f"a {c} {s}" for c, s in PAIRS][::3]
    images = generate(load_base(PRETRAINED / "base"), prompts, list(range(len(prompts))), steps=25, guidance=7.5)
    verdicts = [judge.score(im, p) for im, p in zip(images, prompts)]
    assert np.mean([v.validity for v in verdicts]) >= 0.95 and np.mean([v.binding for v in verdicts]) >= 0.75
    model, processor = load_captioner(str(PRETRAINED / "captioner"))
    assert captioner.binding_accuracy(model, processor, n=60) >= 0.9


def test_judge_names_what_went_wrong():
    """The failure taxonomy on a render of a red circle and a blue square, read against other prompts."""
    import numpy as np

    from comat_core.worlds.shapes import judge
    from comat_core.worlds.shapes.render import render, sample_scene

    image, _ = render(sample_scene(np.random.default_rng(0), [("red", "circle"), ("blue", "square")]))
    expected = {
        "a red circle and a blue square": ("correct", True, True, 1.0),
        "a blue circle and a red square": ("colours swapped", True, True, 1.0),
        "a red circle and a red square": ("a colour wrong", False, True, 1.0),
        "a red triangle and a blue square": ("a shape wrong", True, False, 0.5),
        "a red circle": ("extra objects", False, False, 1.0),
        "a red circle, a blue square and a green diamond": ("an object missing", False, False, 2 / 3),
    }
    for prompt, (kind, colours, shapes, shape_recall) in expected.items():
        verdict = judge.score(image, prompt)
        assert judge.failure(verdict) == kind, prompt
        assert (judge.colours_right(verdict), judge.shapes_right(verdict)) == (colours, shapes), prompt
        assert judge.shape_recall(verdict) == shape_recall, prompt
    assert set(kind for kind, *_ in expected.values()) <= set(judge.FAILURES)
