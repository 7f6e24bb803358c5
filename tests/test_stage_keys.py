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
        "gan_gt": "59785cf015e3ccec",
        "masks": "e0076ca9c95c5380",
        "train": "8c07a87eb23607c9",
        "evaluate": "9ab03ac363f6d6a3",
    },
    "tiny-sdxl": {
        "prompts": "c08363a860831ed5",
        "sdxl_prefinetune": "289f4fd7e2b0640f",
        "gan_gt": "9a79dc55f9ee7675",
        "masks": "24e52772a26875a2",
        "train": "ce3bd868830cf8a0",
        "evaluate": "1c75a3583901bac0",
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
