"""The CoMat trainer on the tiny models: gradient flow per loss term, learning signal, full-state
resume, checkpoint hygiene, the diffusers-loadable LoRA export, and the SDXL path."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load

from comat_core.store.checkpoint import (
    committed_checkpoints,
    flatten_state,
    load_latest_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    unflatten_state,
)
from comat_core.config import load_config
from comat_core.errors import ConfigError, InputError
from comat_core.models.lora import add_lora, export_lora, lora_named_parameters
from comat_core.stages.masks.reader import EntityMask
from comat_core.models.loader import load_sd_pipeline
from comat_core.stages.entities import entities_from_records
from comat_core.store.storage import ArtifactStore
from comat_core.text import entity_token_indices
from comat_core.method.data import PromptOrder, TrainingData, TrainingSources
from comat_core.method.trainer import (
    build_training,
    generator_losses,
    step_generators,
    train,
    train_step,
)
from lora_helpers import perturb_lora

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
FAST = ["train.num_inference_steps=4", "gan_gt.num_inference_steps=4", "train.grad_steps=2", "train.losses.attribute_steps=2"]


def _records():
    """Prompt records as the prompts stage writes them: character spans of nouns and attributes, and the
    token positions of each entity's words (tiny CLIP: one token per word after BOS)."""
    return [
        {"prompt_id": "p0", "text": "a red cube and a blue sphere",
         "entities": [{"noun": "cube", "noun_span": [6, 10], "attribute_spans": [[2, 5]], "phrase_span": [2, 10],
                       "token_indices": [2, 3]},
                      {"noun": "sphere", "noun_span": [22, 28], "attribute_spans": [[17, 21]],
                       "phrase_span": [17, 28], "token_indices": [6, 7]}]},
        {"prompt_id": "p1", "text": "a green bench",
         "entities": [{"noun": "bench", "noun_span": [8, 13], "attribute_spans": [[2, 7]], "phrase_span": [2, 13],
                       "token_indices": [2, 3]}]},
        {"prompt_id": "p2", "text": "a yellow cat on a black car",
         "entities": [{"noun": "cat", "noun_span": [9, 12], "attribute_spans": [[2, 8]], "phrase_span": [2, 12],
                       "token_indices": [2, 3]},
                      {"noun": "car", "noun_span": [24, 27], "attribute_spans": [[18, 23]], "phrase_span": [18, 27],
                       "token_indices": [6, 7]}]},
        {"prompt_id": "p3", "text": "two brown dogs", "entities": []},
    ]


def _sources(records=None) -> TrainingSources:
    records = records or _records()
    g = torch.Generator().manual_seed(7)
    latents = {r["prompt_id"]: torch.randn(4, 8, 8, generator=g) for r in records}
    by_id = {r["prompt_id"]: r for r in records}

    def entity_masks(ids, resolution, samples=None):
        out = []
        for pid in ids:
            masks = []
            for k, entity in enumerate(by_id[pid]["entities"]):
                mask = torch.zeros(resolution, resolution)
                if k % 2 == 0:
                    mask[:, : resolution // 2] = 1
                else:
                    mask[:, resolution // 2:] = 1
                detected = entity["noun"] != "car"  # one undetected noun
                masks.append(EntityMask(k, entity["noun"], detected, mask if detected else None))
            out.append(masks)
        return out

    return TrainingSources(records, lambda ids, samples=None: torch.stack([latents[i] for i in ids]), entity_masks)




@pytest.fixture(scope="module")
def training():
    tr = build_training(load_config("tiny", overrides=FAST))
    perturb_lora(tr.unet)
    return tr


# ----------------------------------------------------------------------------------------------
# Data


def test_entity_targets_read_the_stored_token_indices(training):
    for r in _records():  # the stored positions are the alignment of the spans with the trainer's tokenizer
        stored = [e["token_indices"] for e in r["entities"]]
        assert stored == entity_token_indices(training.backbone.tokenizer, r["text"], entities_from_records(r["entities"]))
    data = TrainingData(_sources(), 8)
    inputs = data.inputs([0, 1, 2, 3])
    assert inputs.prompt_ids == ["p0", "p1", "p2", "p3"] and inputs.gt_latents.shape == (4, 4, 8, 8)
    # "a red cube and a blue sphere" -> red 2, cube 3, blue 6, sphere 7
    assert [t.token_indices for t in inputs.targets[0]] == [[2, 3], [6, 7]]
    assert [t.token_indices for t in inputs.targets[1]] == [[2, 3]]
    assert [t.token_indices for t in inputs.targets[2]] == [[2, 3]]  # the undetected "black car" is dropped
    assert inputs.targets[3] == []
    keep = TrainingData(_sources(), 8, drop_undetected=False).inputs([2]).targets[0]
    assert [t.token_indices for t in keep] == [[2, 3], [6, 7]] and keep[1].mask.sum() == 0  # reference: zero mask


def test_records_without_token_indices_ask_for_the_prompts_stage():
    records = _records()
    for entity in records[0]["entities"]:
        del entity["token_indices"]
    with pytest.raises(InputError, match="re-run the prompts stage"):
        TrainingData(_sources(records), 8).inputs([0])


def test_prompt_order_is_epoch_wise_permutation():
    order = PromptOrder(5, seed=3)
    stream = order.take(0, 15)
    for epoch in range(3):
        assert sorted(stream[5 * epoch: 5 * epoch + 5]) == list(range(5))
    assert stream[:5] != stream[5:10]
    assert PromptOrder(5, seed=3).take(7, 6) == stream[7:13]  # any position, no state needed


# ----------------------------------------------------------------------------------------------
# Gradient flow, one loss term at a time


@pytest.mark.parametrize("terms", [("concept",), ("token", "pixel"), ("gan_g",)])
def test_each_loss_term_alone_reaches_every_lora_parameter(training, terms):
    tr = training
    inputs = TrainingData(_sources(), 8).inputs([0, 2])
    for p in tr.unet.parameters():
        p.grad = None
    cpu, noise = step_generators(0, 0, 0, tr.device)
    losses, _ = generator_losses(tr, inputs, cpu, noise)
    loss = sum(losses[k] for k in terms)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    lora = lora_named_parameters(tr.unet)
    dead = [n for n, p in lora.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, f"{len(dead)} of {len(lora)} LoRA parameters got no gradient from {terms}: {dead[:3]}"
    frozen = [*tr.backbone.text_encoders, tr.backbone.vae, tr.concept.model, tr.discriminator]
    assert all(p.grad is None for module in frozen for p in module.parameters())
    for p in tr.unet.parameters():
        p.grad = None


def test_all_weights_zero_is_a_config_error():
    cfg = load_config("tiny", overrides=["train.losses.concept_weight=0", "train.losses.token_weight=0",
                                         "train.losses.pixel_weight=0", "train.losses.gan_weight=0"])
    with pytest.raises(ConfigError, match="weight"):
        build_training(cfg)


# ----------------------------------------------------------------------------------------------
# Learning signal


def test_thirty_steps_lower_the_concept_loss_and_move_the_discriminator():
    cfg = load_config("tiny", overrides=FAST + ["train.learning_rate=1e-3", "train.discriminator.learning_rate=1e-3",
                                                "train.losses.token_weight=0", "train.losses.pixel_weight=0"])
    tr = build_training(cfg)
    inputs = TrainingData(_sources(), 8, with_targets=False).inputs([0, 1])
    logs = [train_step(tr, [inputs], seed=1234) for _ in range(30)]  # the same noise every step
    concept = [row["concept_loss"] for row in logs]
    d_loss = [row["d_loss"] for row in logs]
    assert sum(concept[-5:]) / 5 < sum(concept[:5]) / 5 - 0.05
    assert sum(d_loss[-5:]) / 5 < sum(d_loss[:5]) / 5 - 0.005  # D learns to tell online from ground truth
    assert all(row["grad_norm_g"] > 0 and row["grad_norm_d"] > 0 for row in logs)


# ----------------------------------------------------------------------------------------------
# Checkpoints: state round trip, pruning, resume


def test_optimizer_state_round_trips_without_pickle():
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.0, 0.999))
    for _ in range(2):
        sum(p.square().sum() for p in params).backward()
        opt.step()
    tensors, skeleton = flatten_state({"opt": opt.state_dict(), "py": (3, [1, 2], None)})
    restored = unflatten_state(json.loads(json.dumps(skeleton)), tensors)
    assert restored["py"] == (3, [1, 2], None)
    again = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params])
    again.load_state_dict(restored["opt"])
    original = opt.state_dict()
    assert again.state_dict()["param_groups"] == original["param_groups"]
    for k, state in original["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(again.state_dict()["state"][k][name], value)


def test_prune_and_incomplete_checkpoints_keep_the_manifest_truthful():
    writer = ArtifactStore("memory://trainer-prune").writer("train", "k")
    for step in (1, 2, 3):
        save_checkpoint(writer, step, {"a.safetensors": {"x": torch.full((2,), float(step))}}, {"s.json": {"step": step}})
    assert prune_checkpoints(writer, keep_last=2) == [1]
    assert [r.step for r in committed_checkpoints(writer)] == [2, 3]
    assert not any(f.startswith("checkpoints/step-000001/") for f in writer.files)
    assert not writer.store.exists(writer.path("checkpoints/step-000001"))
    # a folder written without its shard manifest (a crash while saving) is ignored and removed
    writer.put_tensors("checkpoints/step-000004/a.safetensors", {"x": torch.zeros(2)})
    fresh = writer.store.writer("train", "k")  # a restarted run
    ref, files = load_latest_checkpoint(fresh)
    assert ref.step == 3 and torch.equal(load(files["a.safetensors"])["x"], torch.full((2,), 3.0))
    assert not fresh.store.exists(fresh.path("checkpoints/step-000004"))
    assert sorted(fresh.files) == [f"checkpoints/step-00000{s}/{n}" for s in (2, 3) for n in ("a.safetensors", "s.json")]


class _Interrupt(Exception):
    pass


def _read(writer, rel):
    return writer.store.read_bytes(writer.path(rel))


def test_resume_equals_uninterrupted_run(tmp_path):
    cfg = load_config("tiny", overrides=FAST + ["train.max_steps=4", "train.checkpoint_every=2",
                                                "train.validation_every=2", "train.keep_last=3"])
    straight = ArtifactStore("memory://trainer-straight").writer("train", "k")
    train(cfg, _sources(), straight, tmp_path / "a")

    store = ArtifactStore("memory://trainer-resumed")

    def stop_at_2(step):
        if step == 2:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(cfg, _sources(), store.writer("train", "k"), tmp_path / "b", hooks={"after_step": stop_at_2})
    # a checkpoint folder whose manifest never got written must not be resumed
    half = store.writer("train", "k")
    half.put_bytes("checkpoints/step-000003/state.json", b"{not json")
    resumed = store.writer("train", "k")
    summary = train(cfg, _sources(), resumed, tmp_path / "c")
    assert summary["resumed_from"] == 2 and summary["steps"] == 4

    for name in ("generator_lora.safetensors", "discriminator.safetensors", "state.safetensors"):
        a = load(_read(straight, f"checkpoints/step-000004/{name}"))
        b = load(_read(resumed, f"checkpoints/step-000004/{name}"))
        assert a.keys() == b.keys() and a, name
        for k in a:
            if k.startswith("rng."):
                continue
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{name}:{k}")
    ma = pq.read_table(io.BytesIO(_read(straight, "metrics.parquet"))).to_pylist()
    mb = pq.read_table(io.BytesIO(_read(resumed, "metrics.parquet"))).to_pylist()
    assert [r["prompt_ids"] for r in ma] == [r["prompt_ids"] for r in mb]  # same data order
    for ra, rb in zip(ma, mb):
        for key in ("loss", "concept_loss", "token_loss", "pixel_loss", "gan_g_loss", "d_loss"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5), key
    assert len(mb) == 4 and [r["step"] for r in mb] == [1, 2, 3, 4]
    # the final manifest lists exactly what is there: no half checkpoint, the samples from before the restart
    assert not any(f.startswith("checkpoints/step-000003/") for f in resumed.files)
    assert {"samples/step-000000.png", "samples/step-000002.png", "samples/step-000004.png"} <= set(resumed.files)
    assert set(straight.files) == set(resumed.files)


# ----------------------------------------------------------------------------------------------
# Export


def test_exported_lora_loads_into_the_pipeline_and_changes_it(tmp_path):
    pipe = load_sd_pipeline("tiny://sd15", "sd15")
    add_lora(pipe.unet, rank=4, alpha=8, target_modules=TARGETS)  # scale 2: the metadata must carry alpha
    perturb_lora(pipe.unet)
    weights = export_lora(pipe.unet, type(pipe), tmp_path / "lora")
    assert weights.name == "pytorch_lora_weights.safetensors"

    fresh = load_sd_pipeline("tiny://sd15", "sd15")
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), 500
    text = fresh.encode_prompt(["a red cube"], "cpu", 1, False)[0]
    with torch.no_grad():
        base = fresh.unet(x, t, encoder_hidden_states=text).sample
        trained = pipe.unet(x, t, encoder_hidden_states=text).sample

        def image(p):
            return p(["a red cube"], num_inference_steps=2, height=64, width=64, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images

        before = image(fresh)
        fresh.load_lora_weights(str(tmp_path / "lora"))
        loaded = fresh.unet(x, t, encoder_hidden_states=text).sample
        after = image(fresh)
    assert not torch.allclose(base, loaded)
    torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-5)
    assert abs(after - before).max() > 1e-4


# ----------------------------------------------------------------------------------------------
# SDXL


def test_sdxl_train_step_with_gradient_accumulation():
    cfg = load_config("tiny-sdxl", overrides=FAST + ["train.gradient_accumulation_steps=2"])
    tr = build_training(cfg)
    assert tr.backbone.family == "sdxl" and len(tr.attention.layer_names) == 6
    assert tr.cfg.train.losses.gan_weight == 0.5
    data = TrainingData(_sources(), 8)
    micro = [data.inputs([0, 2]), data.inputs([1, 3])]
    before = {n: p.detach().clone() for n, p in lora_named_parameters(tr.unet).items()}
    logs = train_step(tr, micro, seed=0)
    for key in ("concept_loss", "token_loss", "pixel_loss", "gan_g_loss", "d_loss", "grad_norm_g", "grad_norm_d"):
        assert torch.isfinite(torch.tensor(logs[key])) and logs[key] > 0, key
    after = lora_named_parameters(tr.unet)
    assert any(not torch.equal(before[n], after[n]) for n in before)


# ----------------------------------------------------------------------------------------------
# Data parallel (two CPU processes, gloo)

_DDP_SCRIPT = """
import json, os, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_trainer import FAST, _sources
import comat_core.method.trainer as T
from comat_core.config import load_config
from comat_core.store.storage import ArtifactStore

built = {{}}
def build(*args, **kwargs):
    built["tr"] = T._build(*args, **kwargs)
    return built["tr"]
T._build, T.build_training = T.build_training, build
cfg = load_config("tiny", overrides=FAST + ["train.max_steps=2", "train.checkpoint_every=5"])
writer = ArtifactStore({store!r}).writer("train", "k")
summary = T.train(cfg, _sources(), writer, Path({scratch!r}) / os.environ["RANK"])
tr = built["tr"]
Path({scratch!r}, "result-" + os.environ["RANK"] + ".json").write_text(json.dumps({{
      "rank": int(os.environ["RANK"]), "global_batch": summary["global_batch"],
      "g": [p.detach().double().sum().item() for p in tr.g_params],
      "d": [p.detach().double().sum().item() for p in tr.d_params]}}))
"""


@pytest.mark.slow
def test_data_parallel_processes_stay_in_sync(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT.format(tests=str(Path(__file__).parent), store=str(tmp_path / "store"),
                                         scratch=str(tmp_path / "scratch")))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one file per rank: the two processes' stdout lines can interleave
    results = [json.loads(f.read_text()) for f in sorted((tmp_path / "scratch").glob("result-*.json"))]
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["global_batch"] == 4 for r in results)
    assert results[0]["g"] == pytest.approx(results[1]["g"], rel=1e-6, abs=1e-9)  # averaged gradients: same weights
    assert results[0]["d"] == pytest.approx(results[1]["d"], rel=1e-6, abs=1e-9)
