"""The shapes world's prompt files, shipped in ``comat_core/data/shapes/`` for the ``shapes`` preset.

* ``train.txt``: the CoMat training prompts (one, two and three objects; text only, as in the paper);
* ``shapes_val.txt``: the held-out two-object evaluation prompts, never a training prompt in either
  word order (evaluate category ``shapes``, the headline);
* ``shapes_new_val.txt``: two-object prompts with a colour-shape pair no training prompt holds
  (``shapes_new``); ``shapes_three_val.txt``: three objects (``shapes_three``);
  ``shapes_relation_val.txt``: two objects and a relation (``shapes_relation``);
* ``shapes_train_val.txt``: the first ``n_train_eval`` two-object training prompts, evaluated
  separately (category ``shapes_train``: what training on a prompt does to that prompt);
* ``shapes_single_val.txt``: every single-object prompt (category ``shapes_single``).

They are :func:`~comat_core.worlds.shapes.splits.prompt_split` of the world's default seed, written
once; ``python -m comat_core.worlds.shapes.prompt_files DIR`` writes them again (a test checks that
the shipped files are exactly the split).
"""

from __future__ import annotations

import sys
from pathlib import Path

from comat_core.worlds.shapes.splits import prompt_split

DEFAULT_SEED, DEFAULT_EVAL, DEFAULT_TRAIN_EVAL = 0, 64, 64


def prompt_files(seed: int = DEFAULT_SEED, n_eval: int = DEFAULT_EVAL,
                 n_train_eval: int = DEFAULT_TRAIN_EVAL) -> dict[str, list[str]]:
    split = prompt_split(seed, n_eval)
    return {
        "train.txt": list(split.train),
        "shapes_val.txt": list(split.eval_two),
        "shapes_new_val.txt": list(split.eval_new),
        "shapes_three_val.txt": list(split.eval_three),
        "shapes_relation_val.txt": list(split.eval_relation),
        "shapes_train_val.txt": list(split.train_two()[:n_train_eval]),
        "shapes_single_val.txt": list(split.eval_single),
    }


def write_prompt_files(folder: Path, **kwargs) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in prompt_files(**kwargs).items():
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    write_prompt_files(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "data" / "shapes"))
