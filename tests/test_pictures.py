"""Pictures where people look: training curves on log axes, validation images in TensorBoard."""

from __future__ import annotations

import math

import pytest

from comat_core.config import load_config
from comat_core.stages.registry import compute_key, run_stage
from comat_core.stages.train.curves import curve_panels, curves_image, linear_ticks, log_ticks
from comat_core.store.storage import ArtifactStore
from fast_run import FAST

ROWS = [{"step": s, "loss": 10 / s, "concept_loss": 9 / s, "token_loss": 1e-4 * (1 + s % 3) if s % 4 else 0.0,
         "grad_norm_g": 0.1, "d_real_logit": 0.5 - s / 10, "step_seconds": 0.3} for s in range(1, 21)]


def test_each_loss_has_its_own_log_axis():
    panels = curve_panels(ROWS)
    losses = [(title, scale) for title, series, scale in panels if set(series) & {"loss", "concept_loss", "token_loss"}]
    assert losses == [("loss (log scale)", "log"), ("concept_loss (log scale)", "log"),
                      ("token_loss (log scale)", "log")]
    assert dict((t, s) for t, _, s in panels)["discriminator"] == "linear"  # logits change sign
    image = curves_image(ROWS)
    assert image.size[1] == -(-len(panels) // 2) * 230


def test_axis_ticks_are_readable_values():
    assert log_ticks(1e-4, 3e-4) == pytest.approx([1e-4, 2e-4, 5e-4, 1e-3])  # a token loss of 1e-4 gets ticks
    assert log_ticks(0.5, 300) == pytest.approx([0.1, 1, 10, 100, 1000])
    ticks = linear_ticks(-0.47, 0.52)
    assert ticks[0] <= -0.47 and ticks[-1] >= 0.52 and 3 <= len(ticks) <= 7
    assert all(math.isclose(t * 4, round(t * 4), abs_tol=1e-9) for t in ticks)  # round steps (0.25 here)


def test_validation_images_go_to_tensorboard_at_each_checkpoint(tmp_path):
    pytest.importorskip("tensorboard", reason="the tracking extra (tensorboard) is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config("tiny", overrides=FAST + ["train.trackers=[tensorboard]", "train.validation_every=1"],
                      extra={"storage": {"root": str(tmp_path / "store")}})
    store = ArtifactStore(str(tmp_path / "store"))
    for stage in ("prompts", "gan_gt", "masks", "train"):
        run_stage(cfg, store, stage)
    logs = tmp_path / "store" / "train" / compute_key(cfg, store, "train") / "logs"
    events = sorted(logs.rglob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file under {logs}"
    steps = set()
    for path in events:
        acc = EventAccumulator(str(path), size_guidance={"images": 0})
        acc.Reload()
        if "validation" in acc.Tags()["images"]:
            steps |= {e.step for e in acc.Images("validation")}
    assert steps == {0, 1, 2}
