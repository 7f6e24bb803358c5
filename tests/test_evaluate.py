"""The evaluate stage: each metric on hand-made inputs, the complex routing, the report, resume."""

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from comat_core.config import load_config
from comat_core.stages.evaluate import metrics as metrics_module
from comat_core.stages.evaluate.clip_score import clip_similarity, cosine_similarity, without_attributes
from comat_core.stages.evaluate.complex import Complex, combine
from comat_core.stages.evaluate.coverage import caption_nll, to_unit_tensor
from comat_core.stages.evaluate.metrics import EvalSample, Metric, MetricEnv, ScoringModels, headline_metric, metrics_for
from comat_core.stages.evaluate.prompt_sets import load_eval_prompts
from comat_core.stages.evaluate.report import (bootstrap_ci, chart_image, chart_rows, grid_headers, grid_image,
                                              grid_layout, paired_deltas, parse_table, summarise)
from comat_core.stages.evaluate.routing import ComplexRouting, routing_key
from comat_core.stages.evaluate.spatial import (
    NEAR_DISTANCE,
    Box,
    Detection,
    complex_objects,
    detect_nouns,
    detector_caption,
    find_relation,
    pair_score,
    relation_score,
    simple_objects,
)
from comat_core.stages.evaluate.vqa import first_answer_logits, questions_for, vqa_scores, yes_no_ids, yes_probability
from comat_core.method.losses.concept import ConceptActivationLoss
from comat_core.models.loader import load_captioner, load_clip, load_grounding_dino, load_vqa
from comat_core.stages.registry import compute_key, run_stage
from comat_core.store.storage import ArtifactStore


def random_images(n, size=64, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


# ----------------------------------------------------------------------------------------------
# Spatial: geometry rules on synthetic boxes


LEFT, RIGHT = Box(0.0, 0.4, 0.2, 0.6), Box(0.6, 0.4, 0.8, 0.6)
TOP, BOTTOM = Box(0.4, 0.0, 0.6, 0.2), Box(0.4, 0.6, 0.6, 0.8)


@pytest.mark.parametrize("relation, box1, box2, expected", [
    ("on the left of", LEFT, RIGHT, 1.0),
    ("on the left of", RIGHT, LEFT, 0.0),
    ("on the right of", RIGHT, LEFT, 1.0),
    ("on the right of", LEFT, RIGHT, 0.0),
    ("on the top of", TOP, BOTTOM, 1.0),  # y grows downwards: the top box has the smaller y
    ("on the top of", BOTTOM, TOP, 0.0),
    ("on the bottom of", BOTTOM, TOP, 1.0),
    ("on the bottom of", TOP, BOTTOM, 0.0),
    ("on the left of", TOP, BOTTOM, 0.0),  # centres differ vertically: not a horizontal relation
    ("on the top of", LEFT, RIGHT, 0.0),
    ("next to", LEFT, RIGHT, 1.0),  # |dy| = 0 < near distance
    (None, LEFT, RIGHT, 0.0),
])
def test_relation_rules_on_separated_boxes(relation, box1, box2, expected):
    assert relation_score(relation, box1, box2) == expected


def test_overlapping_boxes_score_threshold_over_iou():
    a, b = Box(0.0, 0.0, 0.5, 0.5), Box(0.2, 0.0, 0.7, 0.5)  # intersection 0.15, union 0.35
    assert relation_score("on the left of", a, b) == pytest.approx(0.1 / (0.15 / 0.35))


def test_near_decays_with_distance():
    a, b = Box(0.0, 0.0, 0.1, 0.1), Box(0.5, 0.6, 0.6, 0.7)  # centres 0.5 and 0.6 apart
    assert relation_score("near", a, b) == pytest.approx(NEAR_DISTANCE / 0.6)
    assert NEAR_DISTANCE == pytest.approx(150 / 512)


def test_on_top_of_alias_is_a_flag():
    assert relation_score("on top of", TOP, BOTTOM) == 1.0
    assert relation_score("on top of", TOP, BOTTOM, alias_on_top_of=False) == 0.0  # the reference's behaviour


def test_pair_score_weights_and_pass_threshold():
    hit1, hit2 = Detection(0.8, LEFT), Detection(0.6, RIGHT)
    assert pair_score("on the left of", hit1, hit2) == pytest.approx(0.25 * 0.8 + 0.25 * 0.6 + 0.5)
    assert pair_score("on the right of", hit1, hit2) == 0.0  # 0.35 < 0.5
    assert pair_score("on the left of", hit1, None) == 0.0  # 0.2 < 0.5
    assert pair_score("on the left of", None, None) == 0.0
    near_far = pair_score("near", Detection(1.0, Box(0, 0, 0.1, 0.1)), Detection(1.0, Box(0.5, 0.6, 0.6, 0.7)))
    assert near_far == pytest.approx(0.5 + NEAR_DISTANCE / 0.6 / 2)


def test_relation_and_objects_from_prompts():
    assert find_relation("a mouse on side of a key") == "on side of"
    assert find_relation("a girl on the top of a frog") == "on the top of"
    assert find_relation("a cat near a dog on the left of a car") == "near"  # reference list order
    assert find_relation("a cat and a dog") is None
    assert simple_objects("a giraffe next to a lamp") == ("giraffe", "lamp")
    assert complex_objects("The fluffy cat is on the left of the soft pillow.") == ("cat", "pillow")
    assert complex_objects("The red hat was on top of the brown coat rack.") == ("hat", "rack")
    assert complex_objects("The brown dog was lying on the green mat.") is None  # no relation phrase


@pytest.fixture(scope="module")
def detector():
    return load_grounding_dino("tiny://grounding-dino")


def test_detect_nouns_maps_caption_tokens(detector):
    caption, spans = detector_caption(["giraffe", "lamp"])
    assert caption == "giraffe . lamp ." and [caption[s:e] for s, e in spans] == ["giraffe", "lamp"]
    model, processor = detector
    images = random_images(2)
    found = detect_nouns(model, processor, images, [("giraffe", "lamp"), ("cat", "cat")], box_threshold=0.0)
    assert set(found[0]) == {"giraffe", "lamp"} and set(found[1]) == {"cat"}
    inputs = processor(images=images[:1], text=["giraffe . lamp ."], return_tensors="pt")
    with torch.no_grad():
        probs = model(**inputs).logits.sigmoid()[0]
    ids = inputs.input_ids[0].tolist()
    giraffe_tokens = [i for i, t in enumerate(ids) if t in processor.tokenizer("giraffe", add_special_tokens=False).input_ids]
    assert found[0]["giraffe"].score == pytest.approx(float(probs[:, giraffe_tokens].max()), abs=1e-6)
    for det in found[0].values():
        assert 0 <= det.box.x_min <= det.box.x_max <= 1 and 0 <= det.box.y_min <= det.box.y_max <= 1
    assert detect_nouns(model, processor, images[:1], [("giraffe", "lamp")], box_threshold=1.0) == [{}]


# ----------------------------------------------------------------------------------------------
# BLIP-VQA


@pytest.fixture(scope="module")
def vqa():
    return load_vqa("tiny://blip-vqa")


def test_questions_are_noun_phrases():
    assert questions_for("a green bench and a blue bowl") == ["a green bench?", "a blue bowl?"]
    assert questions_for("rubber sole shoes and fluffy clouds") == ["rubber sole shoes?", "fluffy clouds?"]
    many = " and ".join(f"a red cube{i}" for i in range(10))
    assert len(questions_for(many)) <= 8


def test_yes_probability_matches_the_generate_path(vqa):
    """P(yes) from our decoder call equals the softmax of the first token scores of BLIP's generate()."""
    model, processor = vqa
    image = random_images(1, seed=3)
    yes_id, no_id = yes_no_ids(processor.tokenizer)
    logits = first_answer_logits(model, processor, image, ["a green bench?"])
    inputs = processor(images=image, text=["a green bench?"], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=1, output_logits=True, return_dict_in_generate=True)
    reference = out.logits[0][0].float().softmax(-1)
    assert torch.allclose(logits[0].softmax(-1), reference, atol=1e-5)
    expected = reference[yes_id] / (reference[yes_id] + reference[no_id])
    assert yes_probability(logits, yes_id, no_id).item() == pytest.approx(expected.item(), rel=1e-5)
    assert yes_probability(logits, yes_id, no_id, normalise_yes_no=False).item() == pytest.approx(
        reference[yes_id].item(), rel=1e-5)


def test_vqa_score_is_the_product_over_phrases(vqa):
    model, processor = vqa
    images = random_images(2, seed=4)
    yes_id, no_id = yes_no_ids(processor.tokenizer)
    single = [yes_probability(first_answer_logits(model, processor, images[:1], [q]), yes_id, no_id).item()
              for q in ("a green bench?", "a blue bowl?")]
    scores = vqa_scores(model, processor, images, [["a green bench?", "a blue bowl?"], []], batch_size=3)
    assert scores[0] == pytest.approx(single[0] * single[1], rel=1e-4)
    assert scores[1] == 1.0  # no noun phrase: the reference scores 1
    assert 0 < scores[0] < 1


# ----------------------------------------------------------------------------------------------
# CLIP


def test_cosine_similarity_properties():
    a, b = torch.randn(5, 8, generator=torch.Generator().manual_seed(0)), torch.randn(5, 8)
    assert torch.allclose(cosine_similarity(a, a), torch.ones(5), atol=1e-6)
    assert torch.allclose(cosine_similarity(a, 3 * a), torch.ones(5), atol=1e-6)
    assert torch.allclose(cosine_similarity(a, -a), -torch.ones(5), atol=1e-6)
    assert torch.allclose(cosine_similarity(a, b), cosine_similarity(b, a))
    assert cosine_similarity(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])).item() == 0.0


def test_clip_similarity_is_clips_unscaled_cosine():
    model, processor = load_clip("tiny://clip")
    images, texts = random_images(2, seed=5), ["a red cube", "a blue sphere on a table"]
    sims = clip_similarity(model, processor, images, texts)
    assert sims.shape == (2,) and bool(((sims >= -1) & (sims <= 1)).all())
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    assert torch.allclose(sims, logits.diagonal() / model.logit_scale.exp(), atol=1e-5)


def test_without_attributes_drops_attribute_words():
    assert without_attributes("The red hat was on top of the brown coat rack.") == "The hat was on top of the rack."
    assert without_attributes("a giraffe next to a lamp") == "a giraffe next to a lamp"


# ----------------------------------------------------------------------------------------------
# Complex routing


def test_complex_routing_rules():
    routing = ComplexRouting.from_lists(["The cat sat on top of the mat. Really."], ["The dog ran in the park."])
    assert routing_key("The cat sat on top of the mat. Really.") == "the cat sat on top of the mat"
    assert routing.components("the cat sat on top of the mat.") == ("attribute", "spatial")
    assert routing.components("The dog ran in the park.") == ("attribute", "action")
    assert routing.components("Something else entirely.") == ("attribute", "spatial", "action")
    assert combine({"attribute": 0.2, "spatial": None, "action": 0.4}) == pytest.approx(0.3)


def test_builtin_routing_covers_the_complex_prompts():
    cfg = load_config("tiny", overrides=["evaluate.prompts_per_category=null", "evaluate.categories=[complex]"])
    prompts = load_eval_prompts(cfg.evaluate)
    routes = [prompts.routing.route(p) for p in prompts.categories["complex"]]
    assert len(routes) == 300
    assert (routes.count("spatial"), routes.count("action"), routes.count("spatial_action")) == (58, 212, 30)
    assert set(prompts.files) == {"complex", "complex:spatial", "complex:action", "complex:spatial_action"}
    assert all(len(f.sha256) == 64 for f in prompts.files.values())


def test_complex_metric_is_the_mean_of_its_routed_components():
    cfg = load_config("tiny", overrides=["evaluate.detector_box_threshold=0.0"])
    routing = ComplexRouting.from_lists(["The fluffy cat is on the left of the soft pillow."],
                                        ["The black phone was resting on the brown charger."])
    env = MetricEnv(ScoringModels(cfg.models), cfg.evaluate, routing)
    prompts = ["The fluffy cat is on the left of the soft pillow.", "The black phone was resting on the brown charger.",
               "The crisp green lettuce lay next to the juicy red tomato."]
    samples = [EvalSample("base", "complex", i, p, 0) for i, p in enumerate(prompts)]
    out = Complex(env).score(random_images(3, seed=6), samples)
    parts = {c: out[f"complex.{c}"] for c in ("attribute", "spatial", "action")}
    assert parts["action"][0] is None and parts["spatial"][1] is None
    assert all(parts[c][2] is not None for c in parts)
    for i in range(3):
        applied = [parts[c][i] for c in parts if parts[c][i] is not None]
        assert out["complex"][i] == pytest.approx(sum(applied) / len(applied))


# ----------------------------------------------------------------------------------------------
# Concept coverage


def test_concept_nll_per_image_equals_the_loss_on_each_image():
    model, processor = load_captioner("tiny://blip-caption")
    loss = ConceptActivationLoss(model, processor, label_smoothing=0.0, crop_max=0)
    images = to_unit_tensor(random_images(3, seed=7))
    prompts = ["a red cube", "a green bench and a blue bowl", "a cat"]
    values = caption_nll(loss, images, prompts)
    with torch.no_grad():
        single = [float(loss(images[i : i + 1], [prompts[i]])) for i in range(3)]
    assert values == pytest.approx(single, rel=1e-4)
    assert all(v > 0 for v in values)


# ----------------------------------------------------------------------------------------------
# Registry


def test_a_metric_is_added_by_registering_it():
    class Brightness(Metric):
        name = "test_brightness"
        categories = ("color",)

        def score(self, images, samples):
            return {self.name: [float(np.asarray(im).mean()) for im in images]}

    metrics_module.register(Brightness)
    try:
        assert Brightness in metrics_for("color") and Brightness not in metrics_for("spatial")
        assert headline_metric("color") == "blip_vqa"
    finally:
        del metrics_module.METRICS["test_brightness"]
    assert [m.name for m in metrics_for("non_spatial")] == ["clip", "concept_nll"]
    assert {c: headline_metric(c) for c in ("shape", "spatial", "complex")} == {
        "shape": "blip_vqa", "spatial": "spatial", "complex": "complex"}


# ----------------------------------------------------------------------------------------------
# Summary statistics


def _rows(base, tuned, category="color", metric="blip_vqa"):
    rows = []
    for model, values in (("base", base), ("tuned", tuned)):
        for (prompt_idx, seed), value in values.items():
            rows.append({"model": model, "category": category, "prompt_idx": prompt_idx, "prompt": f"p{prompt_idx}",
                         "seed": seed, "metric": metric, "value": value})
    return rows


def test_summary_means_deltas_and_bootstrap():
    base = {(0, 0): 0.1, (0, 1): 0.3, (1, 0): 0.5, (1, 1): 0.7}
    tuned = {(0, 0): 0.2, (0, 1): 0.5, (1, 0): 0.5, (1, 1): 0.9}
    rows = _rows(base, tuned)
    deltas = paired_deltas(rows)
    assert sorted(deltas) == [0, 1]
    assert deltas[0] == pytest.approx([0.1, 0.2]) and deltas[1] == pytest.approx([0.0, 0.2])
    summary = summarise(rows, ["color"], {"color": "blip_vqa"}, bootstrap_samples=500, seed=0)
    m = summary["color"]["metrics"]["blip_vqa"]
    assert m["base"] == pytest.approx(0.4) and m["tuned"] == pytest.approx(0.525)
    assert m["delta"] == pytest.approx(0.125) and m["n_pairs"] == 4 and m["n_prompts"] == 2
    assert m["higher_is_better"] is True
    low, high = m["ci95"]
    assert 0.1 - 1e-9 <= low <= 0.125 <= high <= 0.15 + 1e-9  # prompt means of the deltas: 0.15 and 0.1
    assert summarise(rows, ["color"], {"color": "blip_vqa"}, 500, 0) == summary  # seeded
    assert bootstrap_ci({0: [0.2, 0.2], 1: [0.2]}, 100, 0) == pytest.approx((0.2, 0.2))


# ----------------------------------------------------------------------------------------------
# The stage, end to end


def make_lora(unet_dir, out_dir, seed=0):
    """A real PEFT LoRA for the tiny UNet, with random non-zero B, saved the diffusers way."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(unet_dir, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=layers, safe_serialization=True)
    return out_dir


def commit_train_stage(cfg, store, lora_dir):
    """Upstream manifests (evaluate reads none of them but train) and a train stage holding ``lora/``."""
    for stage in ("prompts", "gan_gt", "masks"):
        store.writer(stage, compute_key(cfg, store, stage)).commit(
            config={}, inputs={}, summary={"note": "upstream of train; the evaluate tests read only train"})
    writer = store.writer("train", compute_key(cfg, store, "train"))
    writer.put_local_tree("lora", lora_dir)
    writer.commit(config={}, inputs={}, summary={"note": "LoRA written by the evaluate tests"})


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    from comat_core.models.loader import resolve_model

    return make_lora(resolve_model("tiny://sd15"), tmp_path_factory.mktemp("lora"))


def eval_config(root):
    return load_config("tiny", overrides=[f"storage.root={root}"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, lora_dir):
    root = tmp_path_factory.mktemp("eval-straight")
    cfg, store = eval_config(root), ArtifactStore(str(root))
    commit_train_stage(cfg, store, lora_dir)
    result = run_stage(cfg, store, "evaluate")
    return cfg, store, result


def _read(store, result, rel):
    return store.reader("evaluate", result.key).read_bytes(rel)


def test_evaluate_writes_scores_summary_report_and_grid(uninterrupted):
    cfg, store, result = uninterrupted
    reader = store.reader("evaluate", result.key)
    table = reader.read_table("scores.parquet").to_pylist()
    assert {r["model"] for r in table} == {"base", "tuned"}
    n_images = 6 * 2 * 2  # categories x prompts x images
    for model in ("base", "tuned"):
        assert sum(r["model"] == model and r["metric"] == "concept_nll" for r in table) == n_images
    expected = {"color": "blip_vqa", "shape": "blip_vqa", "texture": "blip_vqa", "spatial": "spatial",
                "non_spatial": "clip", "complex": "complex"}
    for category, metric in expected.items():
        values = [r for r in table if r["category"] == category and r["metric"] == metric]
        assert len(values) == 2 * 2 * 2 and all(math.isfinite(r["value"]) for r in values)
    assert {r["seed"] for r in table} == {0, 1}
    assert len(reader.list("images/base/", ".png")) == len(reader.list("images/tuned/", ".png")) == n_images
    base_png, tuned_png = reader.read_bytes("images/base/color/0-0.png"), reader.read_bytes("images/tuned/color/0-0.png")
    assert base_png != tuned_png  # the LoRA changes the image
    summary = reader.read_json("summary.json")
    assert summary["protocol"]["seeds"] == [0, 1] and summary["code"]["stage_version"] == "1"
    assert summary["prompt_files"]["color"]["file"] == "builtin:t2i-compbench/color_val.txt"
    assert summary["models"]["lora"]["fingerprint"].startswith("train:")
    assert summary["results"]["color"]["metrics"]["concept_nll"]["higher_is_better"] is False
    grid = reader.read_image("grid.png")  # labelled: a header per column, the rows named
    layout = grid_layout(grid_headers(summary["grid"]), (64, 64))
    assert grid.size == layout.size and grid.size[1] > 2 * layout.cell_h + layout.header_h - 1
    assert summary["grid"][0]["prompt"].split()[0] in " ".join(layout.headers[0])
    assert reader.read_image("chart.png").size[0] > 0
    report = reader.read_bytes("report.md").decode()
    assert "(chart.png)" in report and "(grid.png)" in report  # both embedded in the report


def test_report_table_equals_the_parquet_rows(uninterrupted):
    cfg, store, result = uninterrupted
    reader = store.reader("evaluate", result.key)
    table = reader.read_table("scores.parquet").to_pylist()
    report = reader.read_bytes("report.md").decode()
    rows = parse_table(report) + parse_table(report, "## Other metrics")
    assert {r["category"] for r in parse_table(report)} == set(cfg.evaluate.categories)
    for row in rows:
        values = {m: [r["value"] for r in table if r["category"] == row["category"] and r["metric"] == row["metric"]
                      and r["model"] == m] for m in ("base", "tuned")}
        assert row["base"] == f"{np.mean(values['base']):.4f}"
        assert row["tuned"] == f"{np.mean(values['tuned']):.4f}"
        assert row["delta"] == f"{np.mean(values['tuned']) - np.mean(values['base']):+.4f}"
        assert int(row["pairs"]) == len(values["base"])
    assert "| SDXL | 0.5879 | 0.4687 | 0.5299 | 0.2131 | 0.3119 | 0.3237 |" in report


def test_resumed_evaluation_equals_uninterrupted(tmp_path, lora_dir, uninterrupted):
    _, straight_store, straight = uninterrupted
    cfg, store = eval_config(tmp_path), ArtifactStore(str(tmp_path))
    commit_train_stage(cfg, store, lora_dir)
    with pytest.raises(RuntimeError, match="fail_at_shard"):
        run_stage(cfg, store, "evaluate", hooks={"fail_at_shard": 4})  # 3 base shards + 1 tuned shard done
    writer = store.writer("evaluate", compute_key(cfg, store, "evaluate"))
    done = {n: writer.shard_meta(n)["committed_at"] for n in writer.committed_shards()}
    assert sorted(done) == ["images-base-00000", "images-base-00001", "images-base-00002", "images-tuned-00000"]
    result = run_stage(cfg, store, "evaluate")
    assert result.manifest["summary"]["shards_generated"] == 2
    assert all(writer.shard_meta(n)["committed_at"] == t for n, t in done.items())  # not regenerated
    for rel in ("scores.parquet", "images/tuned/complex/1-1.png", "grid.png"):
        assert _read(store, result, rel) == _read(straight_store, straight, rel)
    resumed = json.loads(_read(store, result, "summary.json"))["results"]
    assert resumed == json.loads(_read(straight_store, straight, "summary.json"))["results"]
    assert run_stage(cfg, store, "evaluate").cached


def test_scores_parquet_schema(uninterrupted):
    _, store, result = uninterrupted
    import io

    schema = pq.read_schema(io.BytesIO(_read(store, result, "scores.parquet")))
    assert schema.names == ["model", "category", "prompt_idx", "prompt", "seed", "metric", "value"]


def test_tuned_sdxl_is_the_prefinetuned_unet_plus_the_lora(tmp_path):
    """SDXL: base = the pretrained pipeline; tuned = the sdxl_prefinetune UNet with the trained LoRA."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from comat_core.stages.evaluate.stage import load_model
    from comat_core.models.loader import resolve_model
    from comat_core.stages.registry import StageContext

    cfg = load_config("tiny-sdxl", overrides=[f"storage.root={tmp_path}"])
    store = ArtifactStore(str(tmp_path))
    run_stage(cfg, store, "prompts")
    run_stage(cfg, store, "sdxl_prefinetune")
    unet = UNet2DConditionModel.from_pretrained(resolve_model("tiny://sdxl"), subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionXLPipeline.save_lora_weights(tmp_path / "lora", safe_serialization=True,
                                                unet_lora_layers=convert_state_dict_to_diffusers(
                                                    get_peft_model_state_dict(unet)))
    for stage in ("gan_gt", "masks"):
        store.writer(stage, compute_key(cfg, store, stage)).commit(config={}, inputs={}, summary={})
    commit_train = store.writer("train", compute_key(cfg, store, "train"))
    commit_train.put_local_tree("lora", tmp_path / "lora")
    commit_train.commit(config={}, inputs={}, summary={})
    inputs = {s: store.reader(s, compute_key(cfg, store, s)) for s in ("train", "sdxl_prefinetune")}
    ctx = StageContext(cfg, store, "evaluate", "k", store.writer("evaluate", "k"), inputs, workdir=tmp_path / "work")
    base, tuned = load_model(ctx, "base", torch.device("cpu")), load_model(ctx, "tuned", torch.device("cpu"))
    prefinetuned = UNet2DConditionModel.from_pretrained(
        inputs["sdxl_prefinetune"].download_tree("unet", tmp_path / "pf-unet"))
    assert torch.equal(tuned.unet.conv_in.weight, prefinetuned.conv_in.weight)
    assert not torch.equal(base.unet.conv_in.weight, prefinetuned.conv_in.weight)
    assert any("lora" in n for n, _ in tuned.unet.named_parameters())
    assert not any("lora" in n for n, _ in base.unet.named_parameters())
    assert type(base.scheduler).__name__ == "DDPMScheduler"


def test_the_grid_layout_makes_room_for_its_labels():
    from PIL import Image

    short, long = ["color #0 seed 0: a red car"], ["color #0 seed 0: " + "a green bench beside a red car " * 3]
    small, tall = grid_layout(short, (64, 64)), grid_layout(long, (64, 64))
    assert tall.size[1] > small.size[1] and len(tall.headers[0]) > len(small.headers[0])
    assert small.size[0] > small.cell_w and small.cell_w >= 160  # a margin for "base"/"tuned"; enlarged to fit text
    with_verdicts = grid_layout(short, (64, 64), with_labels=True)
    assert with_verdicts.size[1] > small.size[1]
    image = Image.new("RGB", (64, 64), "white")
    grid = grid_image([image], [image], headers=short)
    assert grid.size == small.size
    # the header is drawn: its rows hold dark pixels, the same rows of an unlabelled grid do not
    header = grid.crop((small.margin, 0, small.size[0], small.header_h - 2)).convert("L")
    assert min(header.getdata()) < 100


def test_the_chart_draws_one_row_per_category_with_its_interval():
    results = {c: {"headline_metric": "m", "metrics": {"m": {"base": 0.4, "tuned": 0.5, "delta": 0.1,
                                                             "ci95": [0.02, 0.18], "n_pairs": 8}}}
               for c in ("color", "shape", "texture")}
    one, three = chart_image({"color": results["color"]}), chart_image(results)
    assert three.size[1] > one.size[1]
    assert [r["category"] for r in chart_rows(results)] == ["color", "shape", "texture"]


def test_numbers_from_random_models_or_few_pairs_are_said_to_carry_no_meaning():
    from comat_core.stages.evaluate.report import MIN_PAIRS, MIN_PROMPTS, caveat, render_markdown

    def summary(base, pairs, prompts):
        entry = {"headline_metric": "blip_vqa", "metrics": {"blip_vqa": {
            "base": 0.5, "tuned": 0.375, "delta": -0.125, "higher_is_better": True, "ci95": [-0.2, -0.05],
            "n_images": {"base": pairs, "tuned": pairs}, "n_pairs": pairs, "n_prompts": prompts}}}
        return {"results": {"color": entry}, "models": {"pretrained": {"name": base}, "vqa": {"name": "tiny://blip-vqa"}}}

    assert "random (tiny preset)" in caveat(summary("tiny://sd15", 4000, 300))
    assert "(4 pairs, 4 prompts)" in caveat(summary("stable-diffusion-v1-5/stable-diffusion-v1-5", 4, 4))
    assert caveat(summary("stable-diffusion-v1-5/stable-diffusion-v1-5", MIN_PAIRS, MIN_PROMPTS)) is None
    assert caveat(summary("world://base", 256, 64)) is None  # the shapes world: tiny scorers, an exact judge
    full = {"protocol": {"scheduler": "ddim", "num_inference_steps": 2, "guidance_scale": 7.5, "resolution": 64,
                         "dtype": "fp32", "images_per_prompt": 1, "seeds": [0], "prompts_per_category": {"color": 4},
                         "parser": "offline", "detector_box_threshold": 0.3, "bootstrap_samples": 10,
                         "bootstrap_seed": 0},
            "code": {"stage_version": "1", "source_sha256": "0" * 64}, "prompt_files": {}}
    report = render_markdown({**summary("tiny://sd15", 4, 4), **full})
    assert report.index("carry no meaning") < report.index("## Scores") and "significant" not in report.replace(
        "no difference here is significant", "")
