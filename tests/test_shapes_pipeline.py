"""The ``shapes`` preset end to end, reduced to a smoke run (seconds, not the measured world).

It checks that the stages run and connect (the world stage's models reach every stage that names
``world://``, its content enters their keys, a second run is all cache hits, the report and the
labelled grid come out), that the shipped prompt files are the world's split, and that the judge
behind the ``shapes`` metric scores rendered images right. It does not check the size of the
effect: that is the hand-run benchmark (benchmarks/shapes_world.py, results in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from comat_core.config import load_config
from comat_core.errors import ConfigError
from comat_core.stages.registry import run_stage, stage_inputs
from comat_core.store.storage import ArtifactStore

SMOKE = ["world.build=smoke", "prompts.max_prompts=8", "gan_gt.num_inference_steps=4", "gan_gt.batch_size=8",
         "train.num_inference_steps=4", "train.grad_steps=2", "train.losses.attribute_steps=1", "train.max_steps=2",
         "train.batch_size=2", "train.checkpoint_every=2", "train.validation_every=2",
         "evaluate.prompts_per_category=2", "evaluate.images_per_prompt=1", "evaluate.num_inference_steps=4",
         "evaluate.bootstrap_samples=20", "evaluate.grid_prompts=3"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes-smoke")
    cfg = load_config("shapes", overrides=SMOKE, extra={"storage": {"root": str(root)}})
    store = ArtifactStore(cfg.storage.root)
    results = {stage: run_stage(cfg, store, stage) for stage in cfg.stage_order()}
    return cfg, store, results


def test_the_shapes_pipeline_runs_from_the_world_stage_to_the_report(smoke_run):
    cfg, store, results = smoke_run
    assert list(results) == ["world", "prompts", "gan_gt", "masks", "train", "evaluate"]
    world = results["world"]
    assert {"base/model_index.json", "captioner/config.json", "world.json"} <= set(world.manifest["files"])
    for stage in ("prompts", "gan_gt", "train", "evaluate"):  # they name world:// models
        assert stage_inputs(cfg, stage)[0] == "world"
        assert results[stage].manifest["inputs"]["world"]["key"] == world.key
    summary = results["evaluate"].manifest["summary"]
    assert set(summary["headline"]) == {"shapes", "shapes_new", "shapes_single"}
    assert all(h["metric"] == "shapes" for h in summary["headline"].values())
    report = store.reader("evaluate", results["evaluate"].key)
    text = report.read_bytes("report.md").decode()
    assert "shapes world, scored by its judge" in text and "shapes.validity" in text
    items = json.loads(report.read_bytes("summary.json"))["grid"]
    assert items and all(set(item["verdict"]) == {"base", "tuned"} for item in items)
    grid = report.read_image("grid.png")
    assert grid.size[1] > 2 * 64  # enlarged, with the judge's labels under each image


def test_a_second_shapes_run_is_all_cache_hits(smoke_run):
    cfg, store, results = smoke_run
    again = {stage: run_stage(cfg, store, stage) for stage in cfg.stage_order()}
    assert all(r.cached for r in again.values())
    assert {s: r.key for s, r in again.items()} == {s: r.key for s, r in results.items()}


def test_a_world_setting_changes_every_key_downstream(smoke_run, tmp_path):
    from comat_core.stages.registry import compute_key

    cfg, store, results = smoke_run
    other = load_config("shapes", overrides=SMOKE + ["world.settings={unet_steps: 4}"],
                        extra={"storage": {"root": cfg.storage.root}})
    assert compute_key(other, store, "world") != results["world"].key


def test_the_world_key_holds_the_shipped_models_content_and_every_setting(tmp_path, monkeypatch):
    """Replacing the shipped world (same settings file, other weights) or changing a WorldConfig default
    must give a new world key: the local model cache lives under it, and an old key served old weights."""
    import shutil

    from comat_core.stages import world
    from comat_core.stages.registry import compute_key
    from comat_core.worlds.shapes.settings import WorldConfig

    cfg = load_config("shapes", extra={"storage": {"root": str(tmp_path / "store")}})
    store = ArtifactStore(cfg.storage.root)
    shipped = tmp_path / "pretrained"
    shutil.copytree(world.shipped_dir(), shipped)
    monkeypatch.setattr(world, "shipped_dir", lambda: shipped)
    before = compute_key(cfg, store, "world")
    weights = shipped / "base" / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert world.shipped_matches(WorldConfig()) and compute_key(cfg, store, "world") != before
    retrained = load_config("shapes", overrides=["world.use_shipped=false"], extra={"storage": {"root": str(tmp_path)}})
    key = compute_key(retrained, store, "world")
    monkeypatch.setattr(WorldConfig.model_fields["refine_steps"], "default", 7)
    WorldConfig.model_rebuild(force=True)
    try:
        assert WorldConfig().refine_steps == 7 and compute_key(retrained, store, "world") != key
    finally:
        monkeypatch.undo()
        WorldConfig.model_rebuild(force=True)
    assert WorldConfig().refine_steps != 7


def test_shipped_prompt_files_are_the_worlds_split():
    from comat_core.stages.prompts import DATA_DIR
    from comat_core.worlds.shapes.prompt_files import prompt_files

    for name, lines in prompt_files().items():
        assert (DATA_DIR / "shapes" / name).read_text(encoding="utf-8").splitlines() == lines, name
    from comat_core.config import SHAPES_HELD_OUT
    from comat_core.worlds.shapes.vocab import parse_prompt

    files = prompt_files()
    combos = {frozenset(parse_prompt(p).pairs()) for name in SHAPES_HELD_OUT for p in files[name]}
    assert not combos & {frozenset(parse_prompt(p).pairs()) for p in files["train.txt"]}  # never trained on, any order
    assert set(files["shapes_train_val.txt"]) <= set(files["train.txt"])


def test_world_models_need_a_world_and_valid_settings():
    with pytest.raises(ConfigError, match="world.kind"):
        load_config("tiny", overrides=["models.captioner=world://captioner"])
    from comat_core.stages.world import world_settings

    with pytest.raises(ConfigError, match="world.settings.unet_steps"):
        world_settings(load_config("shapes", overrides=["world.settings={unet_steps: 0}"]))


def test_the_shapes_metric_scores_renders_with_the_judge():
    from comat_core.stages.evaluate.shapes import verdicts
    from comat_core.worlds.shapes.render import caption, render, sample_scene
    from comat_core.worlds.shapes.splits import all_pairs

    rng = np.random.default_rng(0)
    pairs = all_pairs()
    scenes = [sample_scene(rng, [pairs[i] for i in rng.choice(len(pairs), 2, replace=False)]) for _ in range(20)]
    images = [Image.fromarray(render(s)[0]) for s in scenes]
    prompts = [caption(s) for s in scenes]
    assert all(v.binding for v in verdicts(images, prompts))
    swapped = [p.replace("red", "@").replace("blue", "red").replace("@", "blue") for p in prompts]
    changed = [i for i, (a, b) in enumerate(zip(prompts, swapped)) if a != b]
    assert changed and not any(verdicts([images[i]], [swapped[i]])[0].binding for i in changed)


def test_the_run_summary_shows_the_judges_failure_taxonomy(smoke_run):
    """The run-summary artifact (what the Prefect UI shows) has the taxonomy table beside the headline."""
    from tasks.summary import headline_rows, stage_rows, summary_markdown

    cfg, store, results = smoke_run
    urls = {stage: store.stage_url(stage, r.key) for stage, r in results.items()}
    rows = stage_rows(cfg, store, urls, started=0.0)
    text = summary_markdown(cfg, store, rows, headline_rows(store, urls), [], started=0.0)
    assert "### What went wrong (the judge's failure taxonomy)" in text
    table = text.split("failure taxonomy")[1]
    assert "| shapes |" in table and "colours swapped" in table and " → " in table
