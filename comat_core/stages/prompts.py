"""The ``prompts`` stage: read prompt sources, clean, deduplicate, drop evaluation prompts, parse entities.

Output: ``prompts.parquet`` with one row per unique training prompt: a stable ``prompt_id`` (a hash
of the normalised text, so ids do not depend on file order), ``text``, ``source`` (the first file it
came from), ``n_tokens`` and ``entities`` (each noun with the character spans of its attribute words,
docs/method.md §4, and ``token_indices``: the positions of its noun and attribute words in the text
encoder's input, for ``models.pretrained``'s tokenizer, which the trainer's attribute loss indexes). The manifest summary reports the counts: lines read, unique, dropped as evaluation
overlap, long prompts.

Sources are fsspec URLs or globs (one prompt per line, UTF-8) or ``builtin:NAME`` for files shipped in
``comat_core/data``. With the three CoMat source lists this reads the reference multiset of 19,902
lines before deduplication.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import fsspec

from comat_core.config import PromptsConfig
from comat_core.stages.entities import entity_records
from comat_core.errors import InputError

log = logging.getLogger("comat.prompts")

DATA_DIR = Path(__file__).resolve().parents[1] / "data"  # comat_core/data
BUILTIN = "builtin:"
# A prompt is a sentence: a longer line is a wrong file (a JSON dump, a book), and every model that
# reads prompts (entity parser, tokenizers, captioner loss) pays for its length.
MAX_LINE_CHARS = 2000
# A prompt file is read in chunks up to this size (about 600,000 prompts of 100 characters): a bigger one
# is a wrong file, and larger prompt sets are split over several files.
MAX_FILE_BYTES = 64 * 2**20
_CHUNK_BYTES = 2**20


@dataclass
class PromptLine:
    text: str
    source: str
    line: int = 0  # 1-based line number in ``source``, for messages


def normalise(text: str) -> str:
    """Collapse runs of whitespace and strip; the text is otherwise kept as written."""
    return re.sub(r"\s+", " ", text).strip()


def match_key(text: str) -> str:
    """Case- and whitespace-insensitive form used to match evaluation prompts."""
    return normalise(text).lower()


def prompt_id(text: str) -> str:
    return hashlib.sha256(normalise(text).encode()).hexdigest()[:16]


def expand_source(source: str, storage_options: dict | None = None) -> list[str]:
    """A URL, glob or ``builtin:`` name → the list of files it names (sorted). Raises if none."""
    if source.startswith(BUILTIN):
        pattern = str(DATA_DIR / source[len(BUILTIN):])
        files = sorted(str(p) for p in Path("/").glob(pattern.lstrip("/"))) if any(c in pattern for c in "*?[") \
            else ([pattern] if Path(pattern).is_file() else [])
        if not files:
            raise InputError(f"built-in prompt file {source!r} does not exist (see {DATA_DIR})")
        return files
    try:
        fs, _ = fsspec.core.url_to_fs(source, **(storage_options or {}))
        if any(c in source for c in "*?["):
            matches = sorted(fs.glob(source))
        else:
            matches = [source] if fs.exists(source) else []
    except (ValueError, ImportError) as e:
        raise InputError(f"prompt source {source!r} has an unknown protocol ({e})") from None
    if not matches:
        raise InputError(f"prompt source {source!r} matches no file; check the path or glob")
    folders = [m for m in matches if fs.isdir(m)]
    if folders and len(folders) == len(matches):
        raise InputError(f"prompt source {source!r} is a folder, not a file; give a file (one prompt per line) "
                         f"or a glob such as '{source.rstrip('/')}/*.txt'")
    matches = [m for m in matches if m not in folders]
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return [m if "://" in m or proto in ("file", "local") else f"{proto}://{m}" for m in matches]


def read_prompt_bytes(url: str, storage_options: dict | None = None) -> bytes:
    """The bytes of one prompt file, read in chunks, at most ``MAX_FILE_BYTES``.

    Only a regular file is opened: a device (``/dev/zero``) would never end and a FIFO would block until
    a writer comes. A file over the limit, or one that grows past it while it is read, is refused.
    """
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        info = fs.info(path)
    except FileNotFoundError:
        raise InputError(f"prompt file not found: {url}") from None
    if info.get("type") == "directory":
        raise InputError(f"prompt file {url} is a folder; give a file (one prompt per line) or a glob")
    if info.get("type") != "file":
        raise InputError(f"prompt file {url} is {_special_kind(path)}, not a regular file; give a file "
                         "(one prompt per line)")
    too_big = InputError(f"prompt file {url} is larger than {MAX_FILE_BYTES // 2**20} MiB; a prompt file holds one "
                         "prompt per line: split a larger prompt set into several files")
    if (info.get("size") or 0) > MAX_FILE_BYTES:
        raise too_big
    chunks, total = [], 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            total += len(chunk)
            if total > MAX_FILE_BYTES:
                raise too_big
            chunks.append(chunk)
    return b"".join(chunks)


def _special_kind(path: str) -> str:
    """What a local path that is neither a file nor a folder is, for messages."""
    import os
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "not a file"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a socket" if stat.S_ISSOCK(mode) else "not a file"


def read_lines(url: str, storage_options: dict | None = None) -> list[str]:
    """One prompt per line; see ``numbered_lines``."""
    return [text for _, text in numbered_lines(url, storage_options)]


def numbered_lines(url: str, storage_options: dict | None = None) -> list[tuple[int, str]]:
    """``(line number, prompt)`` of every non-blank line, whitespace normalised.

    Errors, each naming the file (and line): not found, a folder, not a regular file, over ``MAX_FILE_BYTES``,
    not UTF-8, empty, a line longer than ``MAX_LINE_CHARS``, a control character (NUL, escape, ...; tabs and
    line breaks are whitespace). A UTF-8 byte-order mark (Windows editors write one) is not text: it is dropped.
    """
    data = read_prompt_bytes(url, storage_options)
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"prompt file {url} is not UTF-8 (invalid byte at offset {e.start}); re-save it as UTF-8") from None
    out = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if len(raw) > MAX_LINE_CHARS:
            raise InputError(f"prompt file {url} line {number} is {len(raw):,} characters long; a prompt may have "
                             f"at most {MAX_LINE_CHARS:,} (one prompt per line)")
        line = normalise(raw)
        bad = [c for c in line if unicodedata.category(c) == "Cc"]
        if bad:
            raise InputError(f"prompt file {url} line {number} contains {len(bad)} control character(s) "
                             f"(first U+{ord(bad[0]):04X}); remove them")
        if line:
            out.append((number, line))
    if not out:
        raise InputError(f"prompt file {url} is empty")
    return out


def sources_fingerprint(cfg: PromptsConfig, storage_options: dict | None = None) -> dict:
    """Content hashes of every source and exclusion file, so new or edited prompt files give a new key."""
    out = {}
    for group, sources in (("sources", cfg.sources), ("exclude", cfg.exclude)):
        files = {}
        for source in sources:
            for url in expand_source(source, storage_options):
                files[_display(url)] = hashlib.sha256(read_prompt_bytes(url, storage_options)).hexdigest()
        out[group] = files
    if not cfg.sources:
        raise InputError("prompts.sources is empty; pass --prompts FILE_OR_GLOB (one prompt per line)")
    return out


def _display(url: str) -> str:
    """Built-in files by their builtin: name, so keys do not depend on where the package is installed."""
    p = str(url)
    data = str(DATA_DIR)
    return BUILTIN + p[len(data) + 1:] if p.startswith(data) else p


def collect_prompts(cfg: PromptsConfig, storage_options: dict | None = None) -> tuple[list[PromptLine], dict]:
    """Read all sources (keeping every line: the multiset), then dedupe and drop evaluation prompts."""
    if not cfg.sources:
        raise InputError("prompts.sources is empty; pass --prompts FILE_OR_GLOB (one prompt per line)")
    lines: list[PromptLine] = []
    per_source: dict[str, int] = {}
    for source in cfg.sources:
        for url in expand_source(source, storage_options):
            got = numbered_lines(url, storage_options)
            per_source[_display(url)] = len(got)
            lines.extend(PromptLine(t, _display(url), n) for n, t in got)
    excluded: set[str] = set()
    for source in cfg.exclude:
        for url in expand_source(source, storage_options):
            excluded.update(match_key(t) for t in read_lines(url, storage_options))
    seen: set[str] = set()
    unique: list[PromptLine] = []
    for line in lines:
        if line.text not in seen:
            seen.add(line.text)
            unique.append(line)
    kept = [p for p in unique if match_key(p.text) not in excluded]
    if not kept:  # nothing to train on: say so here, not as an index error stages later
        files = ", ".join(list(per_source)[:3]) + (", …" if len(per_source) > 3 else "")
        raise InputError(f"the prompt files ({files}) hold no training prompt: all {len(unique)} "
                         "unique prompt(s) are evaluation prompts (prompts.exclude); give training prompts with --prompts")
    counts = {
        "lines_read": len(lines),
        "per_source": per_source,
        "unique": len(unique),
        "dropped_eval_overlap": len(unique) - len(kept),
    }
    if cfg.max_prompts is not None:
        kept = kept[: cfg.max_prompts]
    counts["kept"] = len(kept)
    return kept, counts


def _load_tokenizer(cfg):
    """The (first) text encoder's tokenizer, to count tokens against the encoder's limit."""
    from comat_core.models.loader import load_tokenizer

    return load_tokenizer(cfg.models.pretrained, field="models.pretrained")


def token_lengths(tokenizer, texts: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]]


def truncate_to_tokens(tokenizer, text: str, max_tokens: int) -> str:
    """Cut ``text`` at the character where its ``max_tokens``-th token (BOS and EOS included) ends."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
    keep = enc["offset_mapping"][: max_tokens - 2]
    return text[: keep[-1][1]].strip() if keep else ""


def run(ctx) -> dict:
    """Stage entry point (see comat_core.stages.registry)."""
    cfg = ctx.cfg
    pcfg = cfg.prompts
    prompts, counts = collect_prompts(pcfg, cfg.storage.options)
    tokenizer = _load_tokenizer(cfg)
    lengths = token_lengths(tokenizer, [p.text for p in prompts])
    long_ids = [i for i, n in enumerate(lengths) if n > pcfg.max_tokens]
    if long_ids:
        first = prompts[long_ids[0]]
        if pcfg.long_prompts == "error":
            raise InputError(f"prompt file {first.source} line {first.line} has {lengths[long_ids[0]]} tokens, more "
                             f"than the text encoder's {pcfg.max_tokens} ({len(long_ids)} such prompt(s)); shorten "
                             "them or set prompts.long_prompts=truncate")
        # cut here, once, so the text encoder, the captioner loss and the entity spans all see the same text
        for i in long_ids:
            prompts[i].text = truncate_to_tokens(tokenizer, prompts[i].text, pcfg.max_tokens)
            lengths[i] = pcfg.max_tokens
        log.warning("%d prompts exceed %d tokens and were truncated (first: %s line %d, %r…)", len(long_ids),
                    pcfg.max_tokens, first.source, first.line, first.text[:60])
    rows = []
    with_entities = 0
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        entities = entity_records(tokenizer, p.text, parser=pcfg.parser)
        with_entities += bool(entities)
        rows.append({"prompt_id": prompt_id(p.text), "text": p.text, "source": p.source, "n_tokens": n,
                     "entities": entities})
        if i % 500 == 0:
            ctx.progress(i, len(prompts), "parsing entities")
    ctx.progress(len(prompts), len(prompts), "parsing entities")
    ctx.writer.put_table("prompts.parquet", _table(rows))
    counts.update(long_prompts=len(long_ids), long_prompt_policy=pcfg.long_prompts, with_entities=with_entities)
    return counts


def _table(rows: list[dict]):
    import pyarrow as pa

    entity = pa.struct([
        ("noun", pa.string()),
        ("noun_span", pa.list_(pa.int32())),
        ("attribute_spans", pa.list_(pa.list_(pa.int32()))),
        ("phrase_span", pa.list_(pa.int32())),
        ("token_indices", pa.list_(pa.int32())),
    ])
    schema = pa.schema([
        ("prompt_id", pa.string()), ("text", pa.string()), ("source", pa.string()),
        ("n_tokens", pa.int32()), ("entities", pa.list_(entity)),
    ])
    return pa.Table.from_pylist(rows, schema=schema)


def read_prompts(reader) -> list[dict]:
    """Rows of a completed prompts stage (``StageReader``), as dicts."""
    return reader.read_table("prompts.parquet").to_pylist()
