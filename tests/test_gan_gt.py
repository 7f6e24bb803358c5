"""The ``gan_gt`` stage on the tiny preset: shards, seeds, crash resume, corruption, the reader.

All tests share one local store holding one ``prompts`` artifact (6 prompts); each test gets its own
``gan_gt`` key by using its own ``gan_gt.seed``. Shards hold 2 prompts, so there are 3 shards.
"""

import io
import json

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load

from comat_core.config import load_config
from comat_core.errors import IntegrityError
from comat_core.stages.gan_gt import GanGtReader, latents_file, prompt_seed, shard_name
from comat_core.stages.registry import compute_key, run_stage
from comat_core.stages.prompts import read_prompts
from comat_core.store.storage import ArtifactStore

N_PROMPTS, SHARD = 6, 2


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("gan-gt-store")
    store = ArtifactStore(str(root))
    run_stage(config(0), store, "prompts")
    return store


def config(seed: int, *extra: str):
    return load_config("tiny", overrides=[f"prompts.max_prompts={N_PROMPTS}", f"gan_gt.shard_size={SHARD}",
                                          f"gan_gt.batch_size={SHARD}", "gan_gt.preview_images=3",
                                          f"gan_gt.seed={seed}", *extra])


def shard_bytes(store, cfg, n: int) -> bytes:
    return store.read_bytes(store.path("gan_gt", compute_key(cfg, store, "gan_gt"), latents_file(n)))


def committed_at(store, cfg, n: int) -> float:
    key = compute_key(cfg, store, "gan_gt")
    return json.loads(store.read_bytes(store.path("gan_gt", key, "_shards", f"{shard_name(n)}.json")))["committed_at"]


def test_stage_writes_seeded_shards_preview_and_a_reader(store):
    cfg = config(1)
    result = run_stage(cfg, store, "gan_gt")
    summary = result.manifest["summary"]
    assert (summary["prompts"], summary["shards"], summary["shards_generated"]) == (N_PROMPTS, 3, 3)
    assert summary["latent_shape"] == [4, 8, 8] and summary["images_per_s"] > 0

    prompts = read_prompts(store.reader("prompts", compute_key(cfg, store, "prompts")))
    reader = store.reader("gan_gt", result.key)
    index = pq.read_table(io.BytesIO(reader.read_bytes("index-00001.parquet"))).to_pylist()
    assert [r["prompt_id"] for r in index] == [p["prompt_id"] for p in prompts[2:4]]
    assert [r["row"] for r in index] == [0, 1]
    assert [r["seed"] for r in index] == [prompt_seed(1, p["prompt_id"]) for p in prompts[2:4]]
    latents = load(reader.read_bytes(latents_file(1)))["latents"]
    assert latents.shape == (2, 4, 8, 8) and latents.dtype == torch.float32 and torch.isfinite(latents).all()

    preview = reader.read_image("preview.png")
    assert preview.size == (128, 128)  # 3 images of 64 px in a 2-column grid

    gt = GanGtReader(reader)
    assert gt.prompt_ids() == [p["prompt_id"] for p in prompts]
    wanted = [prompts[3]["prompt_id"], prompts[0]["prompt_id"]]
    got = gt.latents(wanted)
    assert got.shape == (2, 4, 8, 8)
    assert torch.equal(got[0], latents[1])
    assert gt.index().num_rows == N_PROMPTS
    assert run_stage(cfg, store, "gan_gt").cached


def test_prompt_seed_depends_on_prompt_and_global_seed():
    assert prompt_seed(42, "abc") == prompt_seed(42, "abc")
    assert len({prompt_seed(42, "abc"), prompt_seed(42, "abd"), prompt_seed(43, "abc")}) == 3
    assert 0 <= prompt_seed(42, "abc") < 2**63


def test_crash_at_shard_then_rerun_generates_only_later_shards(store):
    cfg = config(2)
    with pytest.raises(RuntimeError, match="fail_at_shard=1"):
        run_stage(cfg, store, "gan_gt", hooks={"fail_at_shard": 1})
    key = compute_key(cfg, store, "gan_gt")
    assert store.read_manifest("gan_gt", key) is None  # incomplete: no stage manifest
    first_commit, first_bytes = committed_at(store, cfg, 0), shard_bytes(store, cfg, 0)

    summary = run_stage(cfg, store, "gan_gt").manifest["summary"]
    assert (summary["shards_generated"], summary["shards_reused"], summary["images_generated"]) == (2, 1, 4)
    assert committed_at(store, cfg, 0) == first_commit
    assert shard_bytes(store, cfg, 0) == first_bytes
    assert committed_at(store, cfg, 1) > first_commit


def test_flipped_byte_is_detected_and_the_shard_regenerates_bit_identically(store):
    cfg = config(3)
    with pytest.raises(RuntimeError):
        run_stage(cfg, store, "gan_gt", hooks={"fail_at_shard": 2})
    original = shard_bytes(store, cfg, 1)
    before = committed_at(store, cfg, 1)
    corrupted = bytearray(original)
    corrupted[-5] ^= 0xFF
    key = compute_key(cfg, store, "gan_gt")
    store.write_bytes(store.path("gan_gt", key, latents_file(1)), bytes(corrupted))

    summary = run_stage(cfg, store, "gan_gt").manifest["summary"]
    assert (summary["shards_generated"], summary["shards_reused"]) == (2, 1)  # shard 1 (corrupt) and shard 2
    assert committed_at(store, cfg, 1) > before
    assert shard_bytes(store, cfg, 1) == original  # seeded regeneration is bit-identical on CPU

    # a corrupted file of a *complete* stage is refused by the reader, never silently used
    store.write_bytes(store.path("gan_gt", key, latents_file(1)), bytes(corrupted))
    with pytest.raises(IntegrityError, match="sha256"):
        GanGtReader(store.reader("gan_gt", key)).latents([GanGtReader(store.reader("gan_gt", key)).prompt_ids()[2]])


def test_seeds_change_the_latents(store):
    run_stage(config(1), store, "gan_gt")
    run_stage(config(2), store, "gan_gt")
    assert shard_bytes(store, config(1), 0) != shard_bytes(store, config(2), 0)


def test_sdxl_uses_the_prefinetuned_unet(tmp_path):
    store = ArtifactStore(str(tmp_path))
    base = ["prompts.max_prompts=2", "gan_gt.preview_images=0", "sdxl_prefinetune.max_steps=2"]
    tuned_cfg = load_config("tiny-sdxl", overrides=base)
    plain_cfg = load_config("tiny-sdxl", overrides=[*base, "sdxl_prefinetune.enabled=false"])
    for stage in ("prompts", "sdxl_prefinetune", "gan_gt"):
        tuned = run_stage(tuned_cfg, store, stage)
    plain = run_stage(plain_cfg, store, "gan_gt")
    assert "sdxl_prefinetune" in tuned.manifest["inputs"] and "sdxl_prefinetune" not in plain.manifest["inputs"]
    tuned_latents = GanGtReader(store.reader("gan_gt", tuned.key)).latents(
        GanGtReader(store.reader("gan_gt", plain.key)).prompt_ids())
    plain_latents = GanGtReader(store.reader("gan_gt", plain.key)).latents(
        GanGtReader(store.reader("gan_gt", plain.key)).prompt_ids())
    assert tuned_latents.shape == plain_latents.shape == (2, 4, 8, 8)
    assert not torch.equal(tuned_latents, plain_latents)


def test_benchmark_runs_the_stage_code_on_the_tiny_preset(tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    sys.modules.pop("generate", None)
    import generate

    result = generate.main(["--preset", "tiny", "--batch-size", "2", "--warmup", "0", "--reps", "1",
                            "--out", str(tmp_path / "gen.json")])
    assert result["images_per_s"] > 0 and result["batch_size"] == 2 and result["resolution"] == 64
    assert json.loads((tmp_path / "gen.json").read_text())["benchmark"] == "gan_gt"
