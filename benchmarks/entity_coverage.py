"""Coverage of the offline entity parser on prompt files (a report, not a test).

Usage: python benchmarks/entity_coverage.py TRAIN.txt... [--pairs VAL.txt...] [--examples 15] [--seed 0]

Prints how many training prompts get at least one entity, the time taken, random examples with their
entities, and for "a <attr> <noun> and a <attr> <noun>" prompts (T2I-CompBench colour/shape/texture)
how often both nouns are found with their attribute.
"""

from __future__ import annotations

import argparse
import random
import re
import time

from comat_core.stages.entities import extract_entities

# the template of T2I-CompBench's attribute prompts: "a green bench and a blue bowl" (lowercase "a",
# up to three words per noun group, an optional "of …" complement)
_GROUP = r"((?:(?!of )[a-z-]+ ){0,2}(?!of )[a-z-]+)(?: of [a-z ]+?)?"
_PAIR = re.compile(rf"^an? ([a-z-]+) {_GROUP} and an? ([a-z-]+) {_GROUP}\.?$")


def _lines(paths: list[str]) -> list[str]:
    out = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            out += [line.strip() for line in f if line.strip()]
    return out


def _show(prompt: str) -> str:
    parts = []
    for e in extract_entities(prompt, parser="offline"):
        attrs = ", ".join(prompt[s:t] for s, t in e.attribute_spans)
        parts.append(f"{e.noun} [{attrs}]")
    return f"{prompt!r}\n    -> " + ("; ".join(parts) or "(none)")


def _pair_found(prompt: str) -> bool | None:
    """Both nouns of "a A1 N1 and a A2 N2" found, each with A1/A2 among its attributes (None: not a pair)."""
    m = _PAIR.match(prompt)
    if m is None:
        return None
    want = [(m.group(1).lower(), m.group(2).lower().split()[-1]), (m.group(3).lower(), m.group(4).lower().split()[-1])]
    got = [(e.noun.split()[-1], {prompt[s:t].lower() for s, t in e.attribute_spans})
           for e in extract_entities(prompt, parser="offline")]
    return all(any(noun == n and attr in attrs for n, attrs in got) for attr, noun in want)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("train", nargs="+")
    ap.add_argument("--pairs", nargs="*", default=[])
    ap.add_argument("--examples", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    prompts = _lines(args.train)
    t0 = time.perf_counter()
    found = [bool(extract_entities(p, parser="offline")) for p in prompts]
    elapsed = time.perf_counter() - t0
    print(f"{sum(found)}/{len(prompts)} prompts ({sum(found) / len(prompts):.1%}) have >= 1 entity; "
          f"{elapsed:.1f} s ({1e3 * elapsed / len(prompts):.2f} ms/prompt)")
    for p in random.Random(args.seed).sample(prompts, args.examples):
        print(_show(p))
    for path in args.pairs:
        results = [r for r in (_pair_found(p) for p in _lines([path])) if r is not None]
        misses = [p for p in _lines([path]) if _pair_found(p) is False]
        print(f"{path}: both nouns with their attribute in {sum(results)}/{len(results)} pair prompts")
        for p in misses[:10]:
            print("  miss:", _show(p))


if __name__ == "__main__":
    main()
