"""The one way autobits writes a file: to a temporary name beside the target, then a rename.

An interrupted or failed write leaves nothing behind (no half-written file under the final
name, no temporary file), and every file ends with the same mode: a normal file's
``0o666`` less the process umask (``mkstemp`` alone would leave ``0o600``).

* :func:`atomic_path` -- a temporary path for writers that want a file name (numpy, gguf,
  safetensors, llama.cpp's quantizer);
* :func:`write_atomic` -- bytes, text, or a callback writing to an open file;
* :func:`write_json_atomic` -- a JSON document;
* :func:`atomic_dir` -- a whole folder (packed checkpoints, converted models), replaced whole.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterator, Mapping

from autobits.errors import AutobitsError

__all__ = ["OutputError", "atomic_path", "write_atomic", "write_json_atomic", "atomic_dir",
           "check_output_folder", "file_mode"]


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def file_mode() -> int:
    """The mode a newly created file gets here: ``0o666`` less the umask."""
    return 0o666 & ~_umask()


class OutputError(AutobitsError):
    """A file or folder that cannot be written (missing or read-only folder, full disk)."""


def _output_error(path: Path, e: OSError) -> OutputError:
    return OutputError(f"cannot write {str(path)!r}: {e.strerror or e}")


def check_output_folder(folder: str | os.PathLike) -> Path:
    """Refuse, before any slow work, a folder that a file cannot be written into: missing,
    not a folder, or refusing a new file (probed by creating and removing one, which also
    catches what permission bits do not show: a read-only mount, root on /proc).
    Raises :class:`OutputError`; returns the folder."""
    folder = Path(folder)
    if not folder.exists():
        raise OutputError(f"output folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise OutputError(f"output folder {str(folder)!r} is a file, expected a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=".autobits-probe.", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise OutputError(f"output folder {str(folder)!r} is not writable: "
                          f"{e.strerror or e}") from e
    return folder


@contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit it is renamed to ``path``.

    The folder is created if missing.  On an exception the temporary file is removed and
    ``path`` is left as it was; an operating-system error while writing (a full disk, a
    read-only folder) is an :class:`OutputError` naming ``path``.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except OSError as e:
        if tmp is None or e.filename is None or Path(e.filename) in (path, tmp, path.parent):
            raise _output_error(path, e) from e  # (tmp None: the temporary file was not made)
        raise
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: bytes | str | Callable[[IO], None], *,
                 binary: bool | None = None) -> Path:
    """Write ``data`` (bytes, str, or ``callback(open_file)``) to ``path`` atomically.

    ``binary`` selects the mode for a callback (default binary); bytes and str choose it.
    """
    if binary is None:
        binary = not isinstance(data, str)
    with atomic_path(path) as tmp:
        with open(tmp, "wb" if binary else "w", encoding=None if binary else "utf-8") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def write_json_atomic(path: str | os.PathLike, payload: Mapping) -> Path:
    """Write ``payload`` as indented JSON (and a final newline) to ``path`` atomically."""
    return write_atomic(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on a clean exit it replaces ``path`` whole.

    An existing ``path`` is moved aside first and removed only once the new folder is in
    place (restored if the rename fails); on an exception the temporary folder is removed.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise _output_error(path, e) from e
    old = None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 -> a normal folder's mode
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None and not path.exists():
                os.replace(old, path)
                old = None
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
