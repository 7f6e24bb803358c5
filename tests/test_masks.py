"""The ``masks`` stage and its parts on tiny models: encodings, entity filtering, detection, reader, resume.

One local store holds a ``prompts`` artifact built from the prompt file below and its ``gan_gt``
latents; each stage test gets its own ``masks`` key through its own masks settings. The tiny
Grounding DINO is random, so stage tests use low thresholds to get detections (the tiny preset's
0.05), and a box threshold of 1.0 to force misses.
"""

import json

import numpy as np
import pytest
import torch

from comat_core.config import load_config
from comat_core.errors import InputError, IntegrityError
from comat_core.stages.masks.backends import GroundingDinoDetector, caption_for
from comat_core.stages.masks.encoding import decode_mask, encode_mask
from comat_core.stages.masks.reader import MaskReader, resize_mask_area_majority
from comat_core.stages.masks.stage import kept_entities, masks_file, shard_name
from comat_core.stages.registry import compute_key, run_stage
from comat_core.stages.prompts import read_prompts
from comat_core.store.storage import ArtifactStore

PROMPTS = [
    "a red cube and a blue sphere",     # cube, sphere
    "hello there",                      # no entities
    "a red cube on the green grass",    # grass is a background noun
    "a red cube and a blue cube",       # cube twice: both dropped, nothing left
    "the blue sky above a red car",     # sky is a background noun
    "a green apple and a yellow banana",
]
MASKED = [0, 2, 4, 5]  # prompts with at least one kept entity


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("masks-store")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    store = ArtifactStore(str(root / "artifacts"))
    store.prompt_file = str(root / "prompts.txt")
    for stage in ("prompts", "gan_gt"):
        run_stage(config(store), store, stage)
    return store


def config(store, *extra: str):
    return load_config("tiny", overrides=[
        f"prompts.sources=[{store.prompt_file}]", "prompts.exclude=[]", "gan_gt.shard_size=3",
        "gan_gt.preview_images=0", "masks.shard_size=2", "masks.batch_size=2", *extra])


def prompt_ids(store, cfg) -> list[str]:
    rows = read_prompts(store.reader("prompts", compute_key(cfg, store, "prompts")))
    assert [r["text"] for r in rows] == PROMPTS
    return [r["prompt_id"] for r in rows]


# ----------------------------------------------------------------------------------------------
# Encoding and resizing


@pytest.mark.parametrize("encoding", ["bitpack", "rle"])
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (64, 64), (33, 9)])
def test_mask_encodings_round_trip_exactly(encoding, shape):
    rng = np.random.default_rng(sum(shape))
    masks = [np.zeros(shape, bool), np.ones(shape, bool), rng.random(shape) > 0.5]
    blob = np.zeros(shape, bool)
    blob[shape[0] // 3 :, : shape[1] // 2 + 1] = True
    masks.append(blob)
    for mask in masks:
        data = encode_mask(mask, encoding)
        out = decode_mask(data, shape, encoding)
        assert out.dtype == bool and out.shape == shape and np.array_equal(out, mask)


def test_encodings_have_the_documented_layout_and_reject_wrong_lengths():
    mask = np.array([[0, 0, 1, 1, 1], [1, 0, 0, 0, 0]], bool)
    assert encode_mask(mask, "bitpack") == bytes([0b00111100, 0b00000000])
    assert np.frombuffer(encode_mask(mask, "rle"), "<u4").tolist() == [2, 4, 4]
    assert np.frombuffer(encode_mask(~mask, "rle"), "<u4").tolist() == [0, 2, 4, 4]
    with pytest.raises(IntegrityError):
        decode_mask(encode_mask(mask, "bitpack"), (4, 5), "bitpack")
    with pytest.raises(IntegrityError):
        decode_mask(encode_mask(mask, "rle"), (3, 5), "rle")


def test_resize_mask_is_binary_keeps_small_objects_and_majority_votes():
    big = torch.zeros(512, 512, dtype=torch.bool)
    big[:256, :] = True  # top half
    for res in (8, 16, 32, 64):
        out = resize_mask_area_majority(big, res)
        assert out.shape == (res, res) and out.dtype == torch.float32
        assert set(out.unique().tolist()) <= {0.0, 1.0}
        assert out[: res // 2].all() and not out[res // 2 :].any()
    tiny_object = torch.zeros(512, 512, dtype=torch.bool)
    tiny_object[100:110, 300:305] = True  # far less than half of a 64-px cell
    out = resize_mask_area_majority(tiny_object, 8)
    assert out.sum() == 1 and out[1, 4] == 1
    quarter = torch.zeros(64, 64, dtype=torch.bool)
    quarter[:8, :8] = True
    quarter[8:12, 8:16] = True  # half of cell (1, 1) at 8 px: kept by the majority vote
    quarter[16:19, 16:24] = True  # 3/8 of cell (2, 2): dropped
    assert resize_mask_area_majority(quarter, 8).nonzero().tolist() == [[0, 0], [1, 1]]
    small = torch.tensor([[1, 0], [0, 1]], dtype=torch.bool)
    assert torch.equal(resize_mask_area_majority(small, 4), torch.kron(small.float(), torch.ones(2, 2)))


# ----------------------------------------------------------------------------------------------
# Entity filtering and detection logic


def entities(*nouns):
    return [{"noun": n} for n in nouns]


def test_background_and_repeated_nouns_are_dropped():
    mcfg = load_config("tiny").masks
    kept, dropped = kept_entities(entities("cube", "Grass", "dog", "cube", "sky"), mcfg)
    assert kept == [(2, "dog")]
    assert dropped == {"background": 2, "repeated": 2}
    mcfg.drop_repeated_nouns = False
    mcfg.background_nouns = ["dog"]
    kept, _ = kept_entities(entities("cube", "Grass", "dog", "cube"), mcfg)
    assert kept == [(0, "cube"), (1, "Grass"), (3, "cube")]
    assert kept_entities(None, mcfg) == ([], {})


@pytest.fixture(scope="module")
def detector():
    from comat_core.models.loader import load_grounding_dino

    model, processor = load_grounding_dino("tiny://grounding-dino")
    return GroundingDinoDetector(model, processor, box_threshold=0.3, text_threshold=0.25, max_boxes_per_noun=2)


def test_caption_tokens_are_split_into_nouns(detector):
    nouns = ["teddy bear", "cube", "zebra"]
    assert caption_for(nouns) == "teddy bear . cube . zebra ."
    ids = detector.tokenizer(caption_for(nouns))["input_ids"]
    positions = detector.noun_positions(ids, 3)
    assert [detector.tokenizer.decode([ids[p] for p in pos]) for pos in positions] == nouns
    assert detector.noun_positions(ids[:4] + [detector.tokenizer.sep_token_id], 3)[1:] == [[], []]


def test_boxes_go_to_the_noun_of_their_best_token(detector):
    # caption "[CLS] cube . dog [SEP]": cube at position 1, dog at position 3
    probs = torch.tensor([
        [0.0, 0.9, 0.0, 0.2, 0.0],   # cube, score 0.9
        [0.0, 0.1, 0.0, 0.8, 0.0],   # dog, score 0.8
        [0.0, 0.5, 0.0, 0.6, 0.0],   # dog (its best token), score 0.6
        [0.0, 0.2, 0.0, 0.7, 0.0],   # dog, score 0.7
        [0.0, 0.1, 0.35, 0.2, 0.0],  # over box_threshold via ".", but no noun token over text_threshold
        [0.0, 0.28, 0.0, 0.0, 0.0],  # under box_threshold
    ])
    boxes = torch.arange(24, dtype=torch.float32).view(6, 4)
    found = detector._assign(probs, boxes, ["cube", "dog"], [[1], [3]])
    assert set(found) == {"cube", "dog"}
    assert torch.equal(found["cube"][0], boxes[[0]]) and found["cube"][1].tolist() == pytest.approx([0.9])
    assert torch.equal(found["dog"][0], boxes[[1, 3]])  # the two best of three, by score
    assert found["dog"][1].tolist() == pytest.approx([0.8, 0.7])


def test_hf_backend_contract_on_tiny_models(detector):
    from comat_core.stages.masks.backends import GroundedSam
    from comat_core.stages.masks.hf import load_hf_segmenter

    detector.box_threshold = detector.text_threshold = 0.05
    backend = GroundedSam(detector, load_hf_segmenter("tiny://sam", torch.device("cpu"), torch.float32))
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    results = backend.detect_and_segment(images, [["cube", "sphere"], [], ["apple"]])
    assert [sorted(r) for r in results] == [["cube", "sphere"], [], ["apple"]]
    assert any(mask is not None for r in results for _, _, mask in r.values())
    for r in results:
        for boxes, scores, mask in r.values():
            assert boxes.shape == (len(scores), 4) and len(scores) <= 2
            assert (boxes >= 0).all() and (boxes <= 64).all() and (boxes[:, 2:] >= boxes[:, :2]).all()
            assert mask is None or (mask.shape == (64, 64) and mask.dtype == torch.bool and mask.any())


# ----------------------------------------------------------------------------------------------
# The stage


def test_stage_stores_one_row_per_kept_entity_and_the_reader_resizes(store):
    cfg = config(store)
    result = run_stage(cfg, store, "masks")
    summary = result.manifest["summary"]
    assert summary["prompts_without_entities"] == 1 and summary["prompts_masked"] == len(MASKED)
    assert (summary["entities_dropped_background"], summary["entities_dropped_repeated"]) == (2, 2)
    assert summary["entities_kept"] == 6 and summary["shards"] == 2 and summary["mask_resolution"] == 64
    assert summary["entities_detected"] > 0

    ids = prompt_ids(store, cfg)
    reader = MaskReader(store.reader("masks", result.key))
    assert reader.prompt_ids() == [ids[i] for i in MASKED]
    rows = reader.rows(ids)
    assert [[(r["entity_index"], r["noun"]) for r in rs] for rs in rows] == [
        [(0, "cube"), (1, "sphere")], [], [(0, "cube")], [], [(1, "car")], [(0, "apple"), (1, "banana")]]
    for row in sum(rows, []):
        assert row["mask_resolution"] == 64 and row["encoding"] == "bitpack"
        assert (row["mask"] is not None) == row["detected"]
        assert len(row["boxes"]) == len(row["scores"]) <= cfg.masks.max_boxes_per_noun
        if row["detected"]:
            assert decode_mask(row["mask"], (64, 64), "bitpack").any()  # never an all-zero mask
    for res in (8, 16, 32, 64):
        masks = reader.entity_masks(ids, res)
        assert [len(m) for m in masks] == [2, 0, 1, 0, 1, 2]
        for m in sum(masks, []):
            assert (m.mask is None) == (not m.detected)
            assert m.mask is None or (m.mask.shape == (res, res) and m.mask.dtype == torch.float32)


def test_undetected_entities_are_stored_without_a_mask(store):
    cfg = config(store, "masks.box_threshold=1.0", "masks.encoding=rle")
    result = run_stage(cfg, store, "masks")
    assert result.manifest["summary"]["entities_detected"] == 0
    reader = MaskReader(store.reader("masks", result.key))
    rows = sum(reader.rows(prompt_ids(store, cfg)), [])
    assert len(rows) == 6
    assert all(not r["detected"] and r["mask"] is None and r["boxes"] == [] for r in rows)
    masks = sum(reader.entity_masks(prompt_ids(store, cfg), 16), [])
    assert all(not m.detected and m.mask is None for m in masks)


def test_crash_and_corruption_regenerate_only_the_affected_shards(store):
    cfg = config(store, "masks.max_boxes_per_noun=1")
    with pytest.raises(RuntimeError, match="fail_at_shard=1"):
        run_stage(cfg, store, "masks", hooks={"fail_at_shard": 1})
    key = compute_key(cfg, store, "masks")
    shard0 = store.path("masks", key, "_shards", f"{shard_name(0)}.json")
    first_commit = json.loads(store.read_bytes(shard0))["committed_at"]
    summary = run_stage(cfg, store, "masks").manifest["summary"]
    assert (summary["shards_generated"], summary["shards_reused"]) == (1, 1)
    assert json.loads(store.read_bytes(shard0))["committed_at"] == first_commit

    # flip a byte of shard 0 and drop the stage manifest (an interrupted rerun): shard 0 is redone
    path = store.path("masks", key, masks_file(0))
    original = store.read_bytes(path)
    store.write_bytes(path, original[:-9] + bytes([original[-9] ^ 0xFF]) + original[-8:])
    store.fs.rm(store.manifest_path("masks", key))
    summary = run_stage(cfg, store, "masks").manifest["summary"]
    assert (summary["shards_generated"], summary["shards_reused"]) == (1, 1)
    assert json.loads(store.read_bytes(shard0))["committed_at"] > first_commit
    assert store.read_bytes(path) == original  # recomputed identically


def test_missing_gan_gt_latent_is_an_input_error(store):
    from comat_core.stages.gan_gt import GanGtReader

    cfg = config(store)
    gt = GanGtReader(store.reader("gan_gt", compute_key(cfg, store, "gan_gt")))
    with pytest.raises(InputError, match="no latent"):
        gt.latents(["not-a-prompt-id"])


def gsam_unavailable() -> str | None:
    """Why the gsam backend cannot run here, or None. segment_anything imports torchvision, and a
    torchvision built for another torch fails at import with a RuntimeError, not an ImportError."""
    try:
        import segment_anything  # noqa: F401
        import torchvision  # noqa: F401
    except Exception as e:
        return (f"the gsam extra does not import beside this torch ({type(e).__name__}: {str(e)[:80]}); "
                "`COMAT_CI_GSAM=1 bash .ci/run` installs it (`=separate`: in an environment of its own)")
    return None


def test_gsam_backend_end_to_end(store, tmp_path):
    if reason := gsam_unavailable():
        pytest.skip(reason)
    from comat_core.stages.masks.gsam import build_sam, build_tiny_sam

    cfg = config(store, "masks.backend=gsam")
    assert cfg.models.sam_model_type == "tiny" and cfg.models.sam_checkpoint is None
    result = run_stage(cfg, store, "masks")
    summary = result.manifest["summary"]
    assert summary["backend"] == "gsam" and summary["entities_kept"] == 6 and summary["entities_detected"] > 0
    for row in sum(MaskReader(store.reader("masks", result.key)).rows(prompt_ids(store, cfg)), []):
        assert (row["mask"] is not None) == row["detected"]

    # checkpoints load weights only: a state dict round-trips, a pickled object is refused
    sam = build_tiny_sam()
    with torch.no_grad():
        sam.mask_decoder.iou_prediction_head.layers[0].bias.fill_(0.5)
    torch.save(sam.state_dict(), tmp_path / "sam.pth")
    loaded = build_sam("tiny", str(tmp_path / "sam.pth"))
    assert torch.equal(loaded.mask_decoder.iou_prediction_head.layers[0].bias, torch.full((32,), 0.5))
    torch.save({"weights": sam.state_dict(), "extra": Unpicklable()}, tmp_path / "evil.pth")
    with pytest.raises(InputError, match="weights-only"):
        build_sam("tiny", str(tmp_path / "evil.pth"))


class Unpicklable:
    """Any object that is not a tensor/container: refused by ``torch.load(weights_only=True)``."""


def test_benchmark_runs_the_stage_code_on_the_tiny_preset(tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    for name in ("generate", "masks"):
        sys.modules.pop(name, None)
    import masks

    result = masks.main(["--preset", "tiny", "--batch-size", "2", "--warmup", "0", "--reps", "1",
                         "--out", str(tmp_path / "masks.json")])
    assert result["image_size"] == [64, 64] and result["batch_size"] == 2
    assert result["masks_per_batch"] == 4  # thresholds 0: both nouns of both images get boxes and masks
    assert result["images_per_s"] > 0 and json.loads((tmp_path / "masks.json").read_text())["benchmark"] == "masks"


def test_masks_preview_tints_each_detected_entity_and_lists_the_missing_ones():
    from comat_core.stages.masks.encoding import encode_mask
    from comat_core.stages.masks.preview import MIN_SIDE, overlay, pick_images

    mask = np.zeros((8, 8), bool)
    mask[2:6, 2:6] = True
    rows = [{"prompt_id": "a", "noun": "cat", "detected": False, "mask": None, "mask_resolution": 8, "encoding": "rle"},
            {"prompt_id": "b", "noun": "dog", "detected": True, "mask": encode_mask(mask, "rle"),
             "mask_resolution": 8, "encoding": "rle"},
            {"prompt_id": "b", "noun": "hat", "detected": False, "mask": None, "mask_resolution": 8, "encoding": "rle"}]
    assert pick_images(rows) == [("b", 0), ("a", 0)]  # images with a detected entity first
    image = np.full((16, 16, 3), 100, np.uint8)
    out = np.asarray(overlay(image, [r for r in rows if r["prompt_id"] == "b"]))
    scale = MIN_SIDE // 16
    assert out.shape == (16 * scale + 14, 16 * scale, 3)  # enlarged, plus a caption line
    assert (out[15 * scale // 2 + 8, 15 * scale // 2 + 8] != 100).any()  # inside the mask: tinted
    assert (out[scale, 15 * scale] == 100).all()  # outside: untouched
