"""Stage keys are part of the store's contract: moving code must not change them.

Keys hash the stage name, its config, its inputs' manifests and its code version, never module
paths. With fixed stand-in manifests for the inputs, the tiny presets' keys are pinned here; a
deliberate key change (a new code version, a new key field) updates the table in the same commit.
"""

import pytest

from comat_core.preflight import build_config
from comat_core.stages.registry import compute_key
from comat_core.store.storage import ArtifactStore

GOLDEN = {
    "tiny": {
        "prompts": "ad380373c5e45a06",
        "gan_gt": "eae5b1fee707b4f0",
        "masks": "12813c9bda3e7f94",
        "train": "c1b6c8b36ad57432",
        "evaluate": "78865a67aeb69398",
    },
    "tiny-sdxl": {
        "prompts": "c08363a860831ed5",
        "sdxl_prefinetune": "289f4fd7e2b0640f",
        "gan_gt": "77b657706ae20674",
        "masks": "5d1db7e18f794b07",
        "train": "a63503f80be9a936",
        "evaluate": "3483ef7258d26012",
    },
}


def keys_with_fixed_manifests(preset: str, root) -> dict[str, str]:
    cfg = build_config({"preset": preset, "storage": str(root)})
    store = ArtifactStore(cfg.storage.root)
    keys = {}
    for stage in cfg.stage_order():
        keys[stage] = compute_key(cfg, store, stage)
        store.write_bytes(store.manifest_path(stage, keys[stage]), f'{{"stage": "{stage}"}}'.encode())
    return keys


@pytest.mark.parametrize("preset", sorted(GOLDEN))
def test_tiny_stage_keys_are_pinned(preset, tmp_path):
    assert keys_with_fixed_manifests(preset, tmp_path) == GOLDEN[preset]
