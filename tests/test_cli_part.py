"""``comat run --stages STAGE --part K/N``: one GPU's slice of a sharded stage, no server needed.

On one box with N GPUs, N such processes side by side, then the stage once without ``--part``,
compute the stage exactly once: the commit run verifies the parts' shards and generates none.
"""

import pytest

from comat_core.config import load_config
from comat_core.stages.registry import compute_key, run_stage
from comat_core.store.storage import ArtifactStore
from flows.cli import main

FAST = ["prompts.max_prompts=4", "gan_gt.shard_size=1", "gan_gt.num_inference_steps=2", "gan_gt.preview_images=1",
        "train.num_inference_steps=2", "train.grad_steps=1"]  # train replays gan_gt's sampler (gt_noise)


def cli(capsys, root, *args):
    rc = main(["run", "--storage", str(root), *[a for o in FAST for a in ("--set", o)], *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_parts_then_commit_computes_each_shard_once(capsys, tmp_path):
    cfg = load_config("tiny", overrides=FAST, extra={"storage": {"root": str(tmp_path)}})
    store = ArtifactStore(str(tmp_path))
    run_stage(cfg, store, "prompts")
    for k in (0, 1):
        rc, out, err = cli(capsys, tmp_path, "--stages", "gan_gt", "--part", f"{k}/2")
        assert rc == 0, err
        assert f"part {k}/2 done, stage not committed" in out
    key = compute_key(cfg, store, "gan_gt")
    assert not store.is_complete("gan_gt", key)
    assert len(store.writer("gan_gt", key).committed_shards()) == 4  # 4 prompts, 1 per shard, 2 per part
    summary = run_stage(cfg, store, "gan_gt").manifest["summary"]
    assert (summary["shards_generated"], summary["shards_reused"]) == (0, 4)
    rc, out, _ = cli(capsys, tmp_path, "--stages", "gan_gt", "--part", "1/2")
    assert rc == 0 and "already complete" in out


@pytest.mark.parametrize("args, needle", [
    (["--part", "0/2"], "--part needs exactly one sharded stage"),
    (["--stages", "prompts", "--part", "0/2"], "--part needs exactly one sharded stage"),
    (["--stages", "gan_gt,masks", "--part", "0/2"], "--part needs exactly one sharded stage"),
    (["--stages", "gan_gt", "--force", "gan_gt", "--part", "0/2"], "and no --force"),
    (["--stages", "gan_gt", "--part", "2/2"], "shard part 2 of 2 is not valid"),
    (["--stages", "gan_gt", "--part", "x"], "is not [index, count]"),
])
def test_bad_part_is_one_line_exit_2(capsys, tmp_path, args, needle):
    rc, _, err = cli(capsys, tmp_path, *args)
    assert rc == 2 and needle in err and err.count("\n") == 1
