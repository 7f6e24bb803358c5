"""The evaluation prompt sets: ``<prompt_dir>/<category>_val.txt`` and the complex routing files.

``prompt_dir`` is ``builtin:t2i-compbench`` (the T2I-CompBench validation prompts shipped in
``comat_core/data``) or any fsspec folder URL holding files with the same names. Every file used is
recorded with its sha256, so two reports can be checked to have used the same prompts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from comat_core.config import EvaluateConfig
from comat_core.errors import InputError
from comat_core.stages.prompts import BUILTIN, expand_source, read_lines, read_prompt_bytes
from comat_core.stages.evaluate.routing import ComplexRouting

ROUTING_FILES = {
    "spatial": "complex_val_spatial.txt",
    "action": "complex_val_action.txt",
    "spatial_action": "complex_val_spatialaction.txt",
}


@dataclass
class PromptFile:
    name: str  # as configured: builtin:t2i-compbench/color_val.txt or a URL
    sha256: str
    lines: list[str]


@dataclass
class EvalPrompts:
    """Prompts per category (the first ``prompts_per_category``), the files read, the complex routing."""

    categories: dict[str, list[str]]
    files: dict[str, PromptFile] = field(default_factory=dict)
    routing: ComplexRouting | None = None

    def file_record(self) -> dict[str, dict]:
        return {key: {"file": f.name, "sha256": f.sha256, "lines": len(f.lines)} for key, f in self.files.items()}


def category_file(category: str) -> str:
    return f"{category}_val.txt"


def read_prompt_file(prompt_dir: str, filename: str, storage_options: dict | None = None) -> PromptFile:
    """One prompt file of ``prompt_dir`` (one prompt per line), with its content hash."""
    name = f"{prompt_dir.rstrip('/')}/{filename}"
    urls = expand_source(name, None if name.startswith(BUILTIN) else storage_options)
    if len(urls) != 1:
        raise InputError(f"evaluation prompt file {name} matches {len(urls)} files; name one file per category")
    options = None if name.startswith(BUILTIN) else storage_options
    digest = hashlib.sha256(read_prompt_bytes(urls[0], options)).hexdigest()
    return PromptFile(name, digest, read_lines(urls[0], options))


def load_eval_prompts(cfg: EvaluateConfig, storage_options: dict | None = None) -> EvalPrompts:
    """Read the prompt file of every configured category and, for ``complex``, the routing files."""
    out = EvalPrompts(categories={})
    for category in cfg.categories:
        pf = read_prompt_file(cfg.prompt_dir, category_file(category), storage_options)
        out.files[category] = pf
        out.categories[category] = pf.lines[: cfg.prompts_per_category] if cfg.prompts_per_category else pf.lines
    if "complex" in cfg.categories:
        lists = {}
        for route, filename in ROUTING_FILES.items():
            pf = read_prompt_file(cfg.prompt_dir, filename, storage_options)
            out.files[f"complex:{route}"] = pf
            lists[route] = pf.lines
        out.routing = ComplexRouting.from_lists(lists["spatial"], lists["action"])
    return out
