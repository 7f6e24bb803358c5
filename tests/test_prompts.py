"""The prompts stage: multiset reading, dedup, evaluation-overlap removal, stable ids, entity spans and tokens."""

import glob
import logging
import os
from pathlib import Path

import pytest

from comat_core.config import load_config
from comat_core.errors import InputError
from comat_core.models.loader import load_sd_pipeline, load_tokenizer
from comat_core.stages.entities import entity_records
from comat_core.stages.registry import run_stage
from comat_core.stages.prompts import DATA_DIR, collect_prompts, prompt_id, read_prompts
from comat_core.store.storage import ArtifactStore
from comat_core.text import align_spans_to_tokens

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _cfg(tmp_path, sources, exclude=(), **over):
    sets = [f"prompts.{k}={v}" for k, v in over.items()]
    return load_config("tiny", overrides=sets, extra={
        "storage": {"root": str(tmp_path / "store")},
        "prompts": {"sources": [str(s) for s in sources], "exclude": [str(e) for e in exclude]}})


@pytest.fixture
def fixtures(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("a red cube and a blue sphere\n\n  a  red cube and a blue   sphere \nA Green Bench and a Blue Bowl\n"
                 "the fluffy cat is on the left of the soft pillow\n", encoding="utf-8")
    b = tmp_path / "b.txt"
    b.write_text("a red cube and a blue sphere\na photo of a cat\na metallic car next to a leather sofa", encoding="utf-8")
    ev = tmp_path / "color_val.txt"
    ev.write_text("a green bench and a blue bowl\n", encoding="utf-8")
    return a, b, ev


def test_dedup_eval_overlap_and_counts(tmp_path, fixtures):
    a, b, ev = fixtures
    cfg = _cfg(tmp_path, [tmp_path / "*.txt"], [ev])
    # the glob also matches the eval file itself: its prompt is read, then dropped as overlap
    kept, counts = collect_prompts(cfg.prompts)
    texts = [p.text for p in kept]
    assert counts["lines_read"] == 8 and counts["unique"] == 6
    assert counts["dropped_eval_overlap"] == 2  # "A Green Bench…" and "a green bench…" match case-insensitively
    assert texts == ["a red cube and a blue sphere", "the fluffy cat is on the left of the soft pillow",
                     "a photo of a cat", "a metallic car next to a leather sofa"]


def test_stage_writes_parquet_with_entities_and_stable_ids(tmp_path, fixtures):
    a, b, ev = fixtures
    cfg = _cfg(tmp_path, [a, b], [ev])
    store = ArtifactStore(cfg.storage.root)
    res = run_stage(cfg, store, "prompts")
    assert not res.cached and res.manifest["summary"]["kept"] == 4
    rows = read_prompts(store.reader("prompts", res.key))
    by_text = {r["text"]: r for r in rows}
    cube = by_text["a red cube and a blue sphere"]
    assert cube["prompt_id"] == prompt_id("a red cube and a blue sphere")
    spans = {e["noun"]: (cube["text"][slice(*e["noun_span"])], [cube["text"][slice(*s)] for s in e["attribute_spans"]])
             for e in cube["entities"]}
    assert spans == {"cube": ("cube", ["red"]), "sphere": ("sphere", ["blue"])}
    assert by_text["a photo of a cat"]["entities"] == []
    # same sources in another order: same ids
    cfg2 = _cfg(tmp_path / "other", [b, a], [ev])
    res2 = run_stage(cfg2, ArtifactStore(cfg2.storage.root), "prompts")
    ids2 = {r["text"]: r["prompt_id"] for r in read_prompts(ArtifactStore(cfg2.storage.root).reader("prompts", res2.key))}
    assert ids2 == {r["text"]: r["prompt_id"] for r in rows}
    # second run: cache hit; editing a source file: new key
    assert run_stage(cfg, store, "prompts").cached
    b.write_text("a red cube and a blue sphere\n", encoding="utf-8")
    assert run_stage(cfg, store, "prompts").key != res.key


def _trainers_alignment(tokenizer, record: dict) -> list[list[int]]:
    """How the trainer aligned each entity before the prompts stage stored its tokens: the sorted union of
    the token positions of its noun and attribute spans, one tokenizer call per entity."""
    out = []
    for e in record["entities"]:
        spans = [tuple(e["noun_span"])] + [tuple(s) for s in e["attribute_spans"]]
        out.append(sorted({i for span in align_spans_to_tokens(tokenizer, record["text"], spans) for i in span}))
    return out


def test_stored_token_indices_are_the_trainers_alignment_on_the_tiny_prompts(tmp_path):
    cfg = load_config("tiny", extra={"storage": {"root": str(tmp_path / "store")}})
    store = ArtifactStore(cfg.storage.root)
    rows = read_prompts(store.reader("prompts", run_stage(cfg, store, "prompts").key))
    trainer_tokenizer = load_sd_pipeline(cfg.models.pretrained, cfg.models.family).tokenizer  # the Backbone's
    assert sum(len(r["entities"]) for r in rows) >= 20
    for r in rows:
        assert [e["token_indices"] for e in r["entities"]] == _trainers_alignment(trainer_tokenizer, r), r["text"]


def test_stored_token_indices_are_the_trainers_alignment_on_the_shapes_prompts():
    """The shapes world's prompts with its shipped base model's tokenizer: as the prompts stage loads it, and as
    the trainer's pipeline does."""
    base = str(Path(__file__).resolve().parents[1] / "comat_core" / "worlds" / "shapes" / "pretrained" / "base")
    stage_tokenizer, trainer_tokenizer = load_tokenizer(base), load_sd_pipeline(base, "sd15").tokenizer
    texts = [line.strip() for f in sorted((DATA_DIR / "shapes").glob("*.txt"))
             for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(texts) > 300
    for text in texts:
        record = {"text": text, "entities": entity_records(stage_tokenizer, text, parser="offline")}
        assert record["entities"], text  # every shapes prompt names coloured shapes
        assert [e["token_indices"] for e in record["entities"]] == _trainers_alignment(trainer_tokenizer, record), text


def test_long_prompts_are_truncated_for_every_model_or_rejected(tmp_path, caplog):
    f = tmp_path / "long.txt"
    long = " ".join(["a red cube and a blue sphere"] * 20)
    f.write_text(f"a red cube\n{long}\n", encoding="utf-8")
    cfg = _cfg(tmp_path, [f])  # default: truncate, so the text encoder and the captioner see the same text
    store = ArtifactStore(cfg.storage.root)
    with caplog.at_level(logging.WARNING, logger="comat.prompts"):
        res = run_stage(cfg, store, "prompts")
    assert "exceed 77 tokens and were truncated" in caplog.text and "line 2" in caplog.text
    row = [r for r in read_prompts(store.reader("prompts", res.key)) if r["text"] != "a red cube"][0]
    assert len(row["text"]) < len(long) and long.startswith(row["text"]) and row["n_tokens"] == 77
    assert res.manifest["summary"]["long_prompts"] == 1
    cfg_e = _cfg(tmp_path / "e", [f], long_prompts="error")
    with pytest.raises(InputError, match=r"long.txt line 2 has \d+ tokens, more than the text encoder's 77"):
        run_stage(cfg_e, ArtifactStore(cfg_e.storage.root), "prompts")


@pytest.mark.parametrize("content, needle", [
    (b"", "is empty"),
    (b"\n  \n", "is empty"),
    (b"a red cube\n\xff\xfe broken", "is not UTF-8"),
])
def test_bad_prompt_files(tmp_path, content, needle):
    f = tmp_path / "p.txt"
    f.write_bytes(content)
    cfg = _cfg(tmp_path, [f])
    with pytest.raises(InputError, match=needle):
        run_stage(cfg, ArtifactStore(cfg.storage.root), "prompts")
    assert not glob.glob(str(tmp_path / "store" / "**" / "_manifest.json"), recursive=True)


def test_missing_source(tmp_path):
    cfg = _cfg(tmp_path, [tmp_path / "nope-*.txt"])
    with pytest.raises(InputError, match="matches no file"):
        run_stage(cfg, ArtifactStore(cfg.storage.root), "prompts")


@pytest.mark.skipif(not (SHARED / "prompts" / "collected_data").is_dir(), reason="shared/ data not beside the repo")
def test_reference_multiset_from_collected_sources(tmp_path):
    cfg = _cfg(tmp_path, [SHARED / "prompts" / "collected_data" / "*.txt"],
               [SHARED / "eval" / "t2i-compbench" / "*_val*.txt"])
    kept, counts = collect_prompts(cfg.prompts)
    assert counts["lines_read"] == 19902
    merged = (SHARED / "prompts" / "merged_data" / "abc5k_hrs10k_t2icompall_20k.txt").read_text(encoding="utf-8")
    assert sorted(" ".join(line.split()) for line in merged.splitlines()) == sorted(
        " ".join(line.split()) for f in sorted(glob.glob(str(SHARED / "prompts" / "collected_data" / "*.txt")))
        for line in Path(f).read_text(encoding="utf-8").splitlines())
    assert counts["unique"] <= 18609 and counts["unique"] > 18500
    assert counts["dropped_eval_overlap"] >= 32  # 30 colour-val prompts in ABC-6K, 2 spatial-val in train_all
    assert counts["kept"] == counts["unique"] - counts["dropped_eval_overlap"]
