"""Stage keys are part of the store's contract: moving code must not change them.

Keys hash the stage name, its config, its inputs' content (their files' sha256 list) and its code
version, never module paths. With fixed stand-in manifests for the inputs (one file each, plus the
timings and software versions a real manifest records, which must not matter), the tiny presets'
keys are pinned here; a deliberate key change (a new code version, a new key field) updates the
table in the same commit.
"""

import json

import pytest

from comat_core.config import build_config
from comat_core.stages.registry import compute_key
from comat_core.store.storage import ArtifactStore, sha256_bytes

GOLDEN = {  # prompts 2 (entities store their token positions) and train 3 (one decoder): keys chain to inputs
    "tiny": {
        "prompts": "374cf42d21831e8b",
        "gan_gt": "6cf862bb18c22344",
        "masks": "1aa00be75e69f2d5",
        "train": "e6f5cd3101f2aa42",
        "evaluate": "b9c0fe2cf62e1f85",
    },
    "tiny-sdxl": {
        "prompts": "d3e43451708bc36a",
        "sdxl_prefinetune": "26465835021fcd82",
        "gan_gt": "c85cf4b83f67aa5e",
        "masks": "aabbee4c93467c0f",
        "train": "16557b9f7f72f28c",
        "evaluate": "edb04a6306ed7318",
    },
}


def stand_in_manifest(stage: str, content: str = "", **record) -> bytes:
    files = {"out.bin": {"size": 1, "sha256": sha256_bytes(f"{stage}{content}".encode())}}
    if stage == "train":  # train's step timings live in files, which are records, not results
        for rel in ("metrics.parquet", "checkpoints/step-000001/state.json"):
            files[rel] = {"size": 1, "sha256": sha256_bytes(f"{rel}{record}".encode())}
    return json.dumps({"stage": stage, "files": files, **record}).encode()


def keys_with_fixed_manifests(preset: str, root, content: str = "", **record) -> dict[str, str]:
    cfg = build_config({"preset": preset, "storage": str(root)})
    store = ArtifactStore(cfg.storage.root)
    keys = {}
    for stage in cfg.stage_order():
        keys[stage] = compute_key(cfg, store, stage)
        store.write_bytes(store.manifest_path(stage, keys[stage]), stand_in_manifest(stage, content, **record))
    return keys


@pytest.mark.parametrize("preset", sorted(GOLDEN))
def test_tiny_stage_keys_are_pinned(preset, tmp_path):
    assert keys_with_fixed_manifests(preset, tmp_path) == GOLDEN[preset]


def test_keys_follow_content_not_timings_or_software(tmp_path):
    """Another clock, another torch in the manifests: same keys. Other bytes: new keys downstream."""
    keys = keys_with_fixed_manifests("tiny", tmp_path / "a")
    later = keys_with_fixed_manifests("tiny", tmp_path / "b", seconds=99.0, software={"torch": "9.9"})
    assert later == keys
    other = keys_with_fixed_manifests("tiny", tmp_path / "c", content="changed")
    assert other["prompts"] == keys["prompts"]
    assert all(other[s] != keys[s] for s in ("gan_gt", "masks", "train", "evaluate"))
