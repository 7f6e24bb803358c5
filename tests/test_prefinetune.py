"""The SDXL 512-px pre-finetune stage: generation shards, resume, the denoising fine-tune, the UNet folder."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from comat_core.config import load_config
from comat_core.errors import ConfigError
from comat_core.models.loader import resolve_model
from comat_core.stages.registry import compute_key, run_stage
from comat_core.stages.prefinetune import batch_order, denoising_target, prompt_seed, resize
from comat_core.store.storage import ArtifactStore


def sdxl_setup(root):
    cfg = load_config("tiny-sdxl", overrides=[f"storage.root={root}"])
    store = ArtifactStore(str(root))
    run_stage(cfg, store, "prompts")
    return cfg, store


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    cfg, store = sdxl_setup(tmp_path_factory.mktemp("prefinetune"))
    return cfg, store, run_stage(cfg, store, "sdxl_prefinetune")


def test_prefinetune_writes_a_loadable_unet_that_differs_from_the_base(finetuned, tmp_path):
    cfg, store, result = finetuned
    reader = store.reader("sdxl_prefinetune", result.key)
    unet_dir = reader.download_tree("unet", tmp_path / "unet")
    tuned = UNet2DConditionModel.from_pretrained(unet_dir, use_safetensors=True)
    base = UNet2DConditionModel.from_pretrained(resolve_model(cfg.models.pretrained), subfolder="unet")
    tuned_sd, base_sd = tuned.state_dict(), base.state_dict()
    assert tuned_sd.keys() == base_sd.keys()
    changed = [k for k in base_sd if not torch.equal(base_sd[k], tuned_sd[k])]
    assert len(changed) > len(base_sd) // 2  # the whole UNet is trained, not an adapter
    assert all(v.dtype == torch.float32 for v in tuned_sd.values())
    summary = result.manifest["summary"]
    assert summary["steps"] == cfg.sdxl_prefinetune.max_steps == 4
    assert np.isfinite([summary["first_loss"], summary["final_loss"]]).all()
    losses = reader.read_table("loss.parquet").column("loss").to_pylist()
    assert len(losses) == 4 and all(np.isfinite(losses)) and summary["final_loss"] == losses[-1]


def test_generated_images_are_resized_pngs_indexed_by_prompt(finetuned):
    cfg, store, result = finetuned
    reader = store.reader("sdxl_prefinetune", result.key)
    pngs = reader.list("images/", ".png")
    assert len(pngs) == cfg.sdxl_prefinetune.num_images == 8
    assert reader.read_image(pngs[0]).size == (64, 64)  # generated at 128 px, stored at 64
    index = reader.read_table("index-00000.parquet").to_pylist() + reader.read_table("index-00001.parquet").to_pylist()
    assert [r["image"] for r in index] == pngs
    assert all(r["seed"] == prompt_seed(cfg.sdxl_prefinetune.seed, r["prompt_id"]) for r in index)


def test_resume_after_a_generation_failure_regenerates_only_missing_shards(tmp_path, finetuned):
    _, straight_store, straight = finetuned
    cfg, store = sdxl_setup(tmp_path)
    with pytest.raises(RuntimeError, match="fail_at_shard"):
        run_stage(cfg, store, "sdxl_prefinetune", hooks={"fail_at_shard": 1})
    writer = store.writer("sdxl_prefinetune", compute_key(cfg, store, "sdxl_prefinetune"))
    assert writer.committed_shards() == ["images-00000"]
    first = writer.shard_meta("images-00000")["committed_at"]
    result = run_stage(cfg, store, "sdxl_prefinetune")
    assert result.manifest["summary"]["shards_generated"] == 1
    assert writer.shard_meta("images-00000")["committed_at"] == first
    reader, straight_reader = (s.reader("sdxl_prefinetune", r.key) for s, r in ((store, result),
                                                                               (straight_store, straight)))
    for rel in reader.list("images/", ".png"):
        assert reader.read_bytes(rel) == straight_reader.read_bytes(rel)  # seeded per prompt
    assert result.manifest["summary"]["final_loss"] == straight.manifest["summary"]["final_loss"]


def test_sd15_family_is_refused(tmp_path):
    cfg = load_config("tiny", overrides=[f"storage.root={tmp_path}", "sdxl_prefinetune.enabled=true"])
    store = ArtifactStore(str(tmp_path))
    store.writer("prompts", compute_key(cfg, store, "prompts")).commit(config={}, inputs={}, summary={})
    with pytest.raises(ConfigError, match="sdxl"):
        run_stage(cfg, store, "sdxl_prefinetune")


def test_batch_order_is_seeded_and_covers_every_image_each_epoch():
    order = batch_order(5, steps=5, batch_size=2, seed=3)
    assert order == batch_order(5, steps=5, batch_size=2, seed=3) != batch_order(5, 5, 2, seed=4)
    flat = [i for batch in order for i in batch]
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))


def test_denoising_target_follows_the_prediction_type():
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 500])
    eps = DDPMScheduler(prediction_type="epsilon")
    assert torch.equal(denoising_target(eps, latents, noise, t), noise)
    v = DDPMScheduler(prediction_type="v_prediction")
    alpha = v.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(denoising_target(v, latents, noise, t), alpha.sqrt() * noise - (1 - alpha).sqrt() * latents,
                          atol=1e-6)
    with pytest.raises(ConfigError, match="prediction_type"):
        denoising_target(DDPMScheduler(prediction_type="sample"), latents, noise, t)


def test_resize_is_antialiased_bicubic():
    flat = torch.full((1, 3, 128, 128), 0.25)
    assert torch.allclose(resize(flat, 64), torch.full((1, 3, 64, 64), 0.25), atol=1e-6)
    stripes = torch.zeros(1, 3, 128, 128)
    stripes[..., ::2] = 1.0  # one-pixel stripes: antialiasing averages them to grey
    inner = resize(stripes, 48)[..., 2:-2]  # away from the borders' edge effects
    assert torch.allclose(inner, torch.full_like(inner, 0.5), atol=0.02)
    aliased = torch.nn.functional.interpolate(stripes, size=(48, 48), mode="bicubic", antialias=False)
    assert (aliased[..., 2:-2] - 0.5).abs().max() > 0.2  # what a plain bicubic sample would give
    assert resize(stripes, 48).min() >= 0 and resize(stripes, 48).max() <= 1
