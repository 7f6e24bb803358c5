"""The seed-pooling benchmark's statistics (benchmarks/shapes_seeds.py) on synthetic scores, in a second.

The benchmark itself runs by hand on completed shapes runs; here its bootstrap and pairing are checked
where the answer is known: runs that agree give the evaluate stage's one-level interval, a model equal
to the base gives Δ 0 with [0, 0], and a spread between seeds widens the interval.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from comat_core.stages.evaluate.report import bootstrap_ci


@pytest.fixture(scope="module")
def seeds():
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    sys.modules.pop("shapes_seeds", None)
    import shapes_seeds

    yield shapes_seeds
    sys.path.remove(str(Path(__file__).parents[1] / "benchmarks"))


def synthetic(n_prompts=12, images=3, offset=0.0, same=False, seed=0):
    """One run's pairs: (prompt_idx, prompt, seed) -> (base, tuned); tuned = base + noise + offset."""
    rng = np.random.default_rng(seed)
    out = {}
    for p in range(n_prompts):
        for s in range(images):
            base = float(rng.random())
            out[(p, f"prompt {p}", s)] = (base, base if same else base + 0.1 * rng.normal() + offset)
    return out


def test_runs_that_agree_give_the_one_level_interval(seeds):
    run = synthetic()
    for n_runs in (1, 3):
        entry = seeds.summarise_metric([run] * n_runs, nested=False)
        deltas = {}
        for (p, _, _), (b, t) in sorted(run.items()):
            deltas.setdefault(p, []).append(t - b)
        assert entry["ci95"] == pytest.approx(list(bootstrap_ci(deltas, seeds.SAMPLES, seeds.SEED)))
        assert entry["ci95"] == pytest.approx(entry["ci95_prompts_only"])
        assert entry["delta"] == pytest.approx(np.mean([d for v in deltas.values() for d in v]))


def test_identical_base_and_tuned_give_zero(seeds):
    entry = seeds.summarise_metric([synthetic(same=True, seed=s) for s in (0, 0)], nested=False)
    assert entry["delta"] == 0 and entry["ci95"] == [0, 0] and entry["per_run"]["delta"] == [0, 0]


def test_a_spread_between_seeds_widens_the_interval(seeds):
    runs = [synthetic(offset=o) for o in (-0.2, 0.0, 0.2)]
    entry = seeds.summarise_metric(runs, nested=False)
    width = entry["ci95"][1] - entry["ci95"][0]
    assert width > 2 * (entry["ci95_prompts_only"][1] - entry["ci95_prompts_only"][0])
    assert entry["per_run"]["delta"][0] < entry["delta"] < entry["per_run"]["delta"][2]


def test_pairs_not_in_every_run_are_left_out(seeds):
    full, part = synthetic(), synthetic()
    part.pop((0, "prompt 0", 0))
    entry = seeds.summarise_metric([full, part], nested=False)
    assert entry["n_pairs_per_run"] == len(full) - 1 and entry["pairs_dropped"] == 1


def test_a_root_without_an_evaluate_output_is_one_clear_error(seeds, tmp_path):
    with pytest.raises(SystemExit, match="has no completed evaluate output"):
        seeds.main(["--runs", str(tmp_path), "--out", str(tmp_path / "out")])


def test_a_run_names_one_evaluate_output_where_a_root_holds_several(seeds):
    """A root that also holds ablations is named as ROOT/evaluate/KEY; a bare root (local or URL) stays whole."""
    assert seeds.split_run("/runs/s42/evaluate/82b9b3a43bcef17c") == ("/runs/s42", "82b9b3a43bcef17c")
    assert seeds.split_run("s3://bucket/s42/evaluate/abc/") == ("s3://bucket/s42", "abc")
    assert seeds.split_run("/runs/s42") == ("/runs/s42", None)
    assert seeds.split_run("/runs/evaluate/x/y") == ("/runs/evaluate/x/y", None)
    with pytest.raises(SystemExit, match="not a completed evaluate output"):
        seeds.load_run("/nonexistent-root/evaluate/0000")
