"""One check for every path the pipeline did not choose itself: it must stay inside its folder.

File names reach the store's readers and writers from places anyone with write access to the store
controls: a manifest's ``files`` table, a shard manifest, a folder listing (on an object store a key
may hold ``../`` literally), a checkpoint's file list. Joined to a folder unchecked, ``lora/../../x``
would read or write outside it: on the machine that exports or evaluates, anywhere its user may
write. So every such name goes through ``safe_relpath`` before it is joined to anything, and on
local disk (where links are followed) ``check_inside`` resolves the joined path and refuses one that
a symbolic link leads out of its folder. A refused name is an ``UnsafePathError``: one line naming
where the name came from and the name, never retried (a retry reads the same name).
"""

from __future__ import annotations

import os
import re

from comat_core.errors import IntegrityError

_DRIVE = re.compile(r"^[A-Za-z]:")
_SHOWN = 120  # characters of a refused name quoted in the error


class UnsafePathError(IntegrityError):
    """A path from the store (manifest entry, listing, key) that would lead outside its folder."""


def path_problem(rel: object) -> str | None:
    """Why ``rel`` is not a safe ``/``-separated relative path inside a folder (None when it is)."""
    if not isinstance(rel, str):
        return f"not a string but {type(rel).__name__}"
    if not rel:
        return "empty"
    if "\x00" in rel or any(ord(c) < 32 for c in rel):
        return "holds a control character"
    if "\\" in rel:
        return "holds a backslash"
    if rel.startswith("/"):
        return "absolute"
    if _DRIVE.match(rel):
        return "starts with a drive letter"
    parts = rel.split("/")
    if ".." in parts:
        return "has a '..' component"
    if "." in parts or "" in parts:
        return "has an empty or '.' component"
    return None


def safe_relpath(rel: object, where: str) -> str:
    """``rel`` unchanged when it is a plain relative path; else ``UnsafePathError`` naming ``where`` it came from."""
    problem = path_problem(rel)
    if problem is not None:
        raise UnsafePathError(f"{where}: refused the path {shown(rel)} ({problem}): it would lead outside its "
                              "folder; the store was changed outside comat, remove that entry or recompute the stage "
                              "with comat run --force <stage>")
    return rel  # type: ignore[return-value]


def check_inside(base: str, path: str, where: str) -> str:
    """Local disk: ``path`` resolved (links followed) must lie in ``base`` resolved; returns ``path``."""
    real_base = os.path.realpath(base)
    real = os.path.realpath(path)
    if real != real_base and not real.startswith(real_base.rstrip(os.sep) + os.sep):
        raise UnsafePathError(f"{where}: refused {shown(path)}: a symbolic link leads it outside {base} "
                              f"(to {shown(real)}); remove the link or recompute the stage with comat run --force "
                              "<stage>")
    return path


def local_destination(folder: str | os.PathLike, rel: str, where: str) -> str:
    """The local file ``folder/rel`` for writing a file named by the store: checked name, no link out."""
    folder = os.fspath(folder)
    dst = os.path.join(folder, *safe_relpath(rel, where).split("/"))
    return check_inside(folder, dst, where)


def shown(value: object) -> str:
    """A name as quoted in an error: repr (so no line break gets through), shortened."""
    text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "…'"
