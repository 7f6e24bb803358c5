"""What kind of wrong shape? The judge's ``a shape wrong`` images of a shapes run, split by what was drawn.

The judge's failure taxonomy says an image has the right number of recognised objects but not the
prompt's shapes. For two-object prompts that covers two different errors:

* ``one named shape twice``: both objects take one of the prompt's shapes ("a yellow diamond and a
  purple triangle" drawn as two triangles): the shape word leaks onto the other object, a binding
  error of shape, as a colour swap is one of colour;
* ``an unnamed shape``: an object takes a shape the prompt does not name (a drawing error).

The split reads the judge's verdicts only (no new threshold); it counts the stored images of an
evaluate stage, base and tuned, per category.

Usage::

    python benchmarks/shapes_shape_errors.py STORAGE_ROOT [STORAGE_ROOT ...] [--out F.json]

Each root holds a completed ``shapes`` run (``ROOT/evaluate/KEY`` names one evaluate output where a root
holds several, as after ``benchmarks/shapes_world.py`` ablations); with several roots the counts are summed (the base images
are the same in every run of the same world and seeds, so base counts are then multiples).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def shape_error(verdict) -> str:
    """``one named shape twice`` or ``an unnamed shape`` for a judged ``a shape wrong`` image."""
    named = {s for _, s in verdict.wanted}
    drawn = [f.shape for f in verdict.found]
    if all(s in named for s in drawn) and len(set(drawn)) < len(named):
        return "one named shape twice"
    return "an unnamed shape"


def count_run(root: str) -> dict[tuple[str, str], Counter]:
    """(model, category) -> counts of the judge's failure kinds, ``a shape wrong`` split by ``shape_error``."""
    import io

    from PIL import Image

    from comat_core.store.storage import ArtifactStore
    from comat_core.worlds.shapes import judge
    from shapes_seeds import newest_evaluate, split_run

    root, key = split_run(root)
    store = ArtifactStore(root)
    if key is None:
        key, _, _ = newest_evaluate(store, root)
    reader = store.reader("evaluate", key)
    counts: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for index in reader.list("index/", ".parquet"):
        for row in reader.read_table(index).to_pylist():
            image = np.asarray(Image.open(io.BytesIO(reader.read_bytes(row["image"]))).convert("RGB"))
            verdict = judge.score(image, row["prompt"])
            kind = judge.failure(verdict)
            if kind == "a shape wrong":
                kind = f"a shape wrong: {shape_error(verdict)}"
            counts[(row["model"], row["category"])][kind] += 1
    return counts


def table(counts: dict[tuple[str, str], Counter]) -> str:
    """A markdown table: per category, each kind's share base -> tuned."""
    lines = ["| category | kind | base | tuned |", "|---|---|---|---|"]
    for category in sorted({c for _, c in counts}):
        base, tuned = counts.get(("base", category), Counter()), counts.get(("tuned", category), Counter())
        nb, nt = max(sum(base.values()), 1), max(sum(tuned.values()), 1)
        for kind in sorted(base.keys() | tuned.keys(), key=lambda k: -base[k]):
            lines.append(f"| {category} | {kind} | {base[kind] / nb:.3f} | {tuned[kind] / nt:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("roots", nargs="+", metavar="STORAGE_ROOT", help="storage roots of completed shapes runs")
    parser.add_argument("--out", type=Path, default=None, help="also write the counts here (JSON)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    total: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for root in args.roots:
        for k, c in count_run(root).items():
            total[k].update(c)
    print(table(total))
    if args.out:
        args.out.write_text(json.dumps({f"{m}/{c}": dict(v) for (m, c), v in sorted(total.items())}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
