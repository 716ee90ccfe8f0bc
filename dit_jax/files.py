"""Small file helpers every room uses: JSON objects read with one clear error, and writes that never leave half a file.

``atomic_path`` yields a temporary path beside the target and renames it into place only when the write succeeded
(DESIGN.md rule 10); ``write_atomic`` and ``write_json`` are the one-call forms for a single file.
"""

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def read_json(path: str | os.PathLike, *, error: type[Exception] = ValueError) -> dict[str, Any]:
    """The JSON object in ``path``; invalid JSON or another JSON type is one ``error`` naming the file."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON: {e}") from e
    if not isinstance(d, dict):
        raise error(f"{path}: expected a JSON object, found {type(d).__name__}")
    return d


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, is_dir: bool, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it to ``target``, on failure remove it.

    A failed write leaves nothing behind. An existing ``target`` is an error unless ``overwrite``.
    """
    target = Path(target).absolute()
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; remove it or pass overwrite=True")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()  # not mkdtemp: its 0700 mode would stay on a renamed model folder
    out = tmp if is_dir else tmp / target.name
    try:
        yield out
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
            os.replace(target, old)
            os.replace(out, target)
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        else:
            os.replace(out, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_atomic(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` for a temporary file beside ``path`` (same suffix), then rename it to ``path``.

    Readers never see half a file; an existing file is replaced; a failed write leaves the old one untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.tmp-{uuid.uuid4().hex[:12]}{path.suffix}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | os.PathLike, obj: Any, **dump_kwargs: Any) -> Path:
    """``obj`` as JSON in ``path``, written atomically (``dump_kwargs`` go to ``json.dump``, default indent 2)."""
    dump_kwargs.setdefault("indent", 2)

    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, **dump_kwargs)
            f.flush()
            os.fsync(f.fileno())

    return write_atomic(path, write)
