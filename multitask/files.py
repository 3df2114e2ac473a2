"""Writing files safely: atomic writes (a reader or a crash never sees half a file), one writer each for JSON, CSV
and figures, stale temporary files, free-space checks, and a writability check made before long work. No project
imports at module level: every module may use it."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TEMP_TAG = ".tmp-"  # in every temporary name: ".model.tmp-k2j4xa9q.keras" is a half-written model.keras
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # what a write into a full disk (or a full quota) fails with


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def give_default_mode(folder: str | os.PathLike) -> None:
    """Give a folder made by ``tempfile.mkdtemp`` (owner-only, 0700) the mode ``mkdir`` would: 0777 less the umask,
    before it is published under its final name."""
    os.chmod(folder, 0o777 & ~_umask())


def _split_suffixes(name: str) -> tuple[str, str]:
    """("latest", ".weights.h5") for "latest.weights.h5": Keras checks the whole suffix of what it writes."""
    stem, dot, rest = name.partition(".")
    return (stem, dot + rest) if stem else (name, "")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; it replaces ``path`` only if the block succeeds.

    The temporary file keeps ``path``'s full suffix (``.weights.h5``, ``.keras``) and has :data:`TEMP_TAG` in its
    name, so a crash leaves something :func:`remove_stale_temps` recognises. The file gets the permissions a
    plain ``open()`` would give it (mkstemp's own are owner-only).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem, suffix = _split_suffixes(path.name)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{stem}{TEMP_TAG}", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in DISK_FULL:  # name the file the user asked for, not the temporary one
            raise OSError(exc.errno, os.strerror(exc.errno), str(path)) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON, atomically (NaN and infinity are refused: they are not JSON)."""
    text = json.dumps(obj, indent=2, default=_json_default, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:
    """The JSON document in ``path``."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _json_default(value):
    """numpy scalars and arrays, paths and other objects with a plain form."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def write_text(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` (UTF-8), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_csv(frame, path: str | os.PathLike, **options) -> Path:
    """Write a pandas DataFrame as CSV (no index), atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, **options)
    return Path(path)


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 100) -> Path:
    """Save a matplotlib Figure as PNG, atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that :func:`atomic_path` left in ``folder`` when its process was killed.

    Only call this on a folder that no other process is writing (e.g. a run folder under its lock).
    """
    removed = []
    for tmp in Path(folder).glob(f".*{TEMP_TAG}*"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted write in %s", len(removed), folder)
    return removed


def check_free_space(folder: str | os.PathLike, needed_bytes: int, *, what: str) -> None:
    """Raise OSError(ENOSPC) naming ``folder`` when it has less than ``needed_bytes`` free for ``what``."""
    folder = Path(folder)
    probe = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise OSError(errno.ENOSPC, f"only {free / 2**20:.0f} MB free under {probe}; {what} needs about "
                                    f"{needed_bytes / 2**20:.0f} MB: free some space or write somewhere else")


def check_writable(path: str | os.PathLike, *, flag: str, folder: bool = False) -> Path:
    """The folder that ``path`` (a file to write, or with ``folder=True`` a folder to write into) would go into;
    ConfigError naming ``flag`` (a ``$parameter``, see :mod:`multitask.errors`) when it cannot be written there.
    Creates nothing: the probe file is removed.

    Folders that do not exist yet are fine when their nearest existing ancestor is writable (they will be made).
    """
    from multitask.errors import ConfigError  # no project imports at module level: every module may use this one

    path = Path(path).expanduser()
    if not folder and path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; give a file name inside it, e.g. {path / 'out.csv'}")
    target = path if folder else path.parent
    existing = next((p for p in (target, *target.parents) if p.exists()), Path("/"))
    if not existing.is_dir():
        raise ConfigError(f"cannot write {path}: {existing} is a file, not a folder; choose another location "
                          f"with {flag}")
    problem = _write_problem(existing)
    if problem:
        raise ConfigError(f"cannot write {path}: {existing} is not writable ({problem}); choose a writable "
                          f"location with {flag}")
    return target


def _write_problem(folder: Path) -> str | None:
    """Why a new file cannot be created in ``folder``, or None. A real probe: permission bits do not bind root,
    while a read-only file system or a pseudo file system (/proc, /sys) refuses root too."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return "permission denied"
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=f".write-probe{TEMP_TAG}")
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    os.close(fd)
    os.unlink(name)
    return None


# ----------------------------------------------------------------------------------------------- reading safely


def open_regular(path: str | os.PathLike, *, max_bytes: int | None = None):
    """``path`` opened for binary reading when it is a regular file (links followed) of at most ``max_bytes``;
    OSError saying what it is otherwise. Opened without blocking, so a FIFO put in a file's place is refused at
    once instead of hanging the caller."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            from multitask.filesystem import file_kind

            raise OSError(errno.EINVAL, f"not a regular file (a {file_kind(info.st_mode)})", str(path))
        if max_bytes is not None and info.st_size > max_bytes:
            raise OSError(errno.EFBIG, f"{info.st_size:,} bytes, more than the {max_bytes:,} expected", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


_SHA256_SEEN: dict[tuple, str] = {}  # (device, inode, size, mtime) -> digest: a file is hashed once per process


def file_sha256(path: str | os.PathLike, *, max_bytes: int | None = None) -> str:
    """Hex SHA-256 of a regular file (read through :func:`open_regular`)."""
    with open_regular(path, max_bytes=max_bytes) as stream:
        info = os.fstat(stream.fileno())
        key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        if key not in _SHA256_SEEN:
            digest = hashlib.sha256()
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
            _SHA256_SEEN[key] = digest.hexdigest()
    return _SHA256_SEEN[key]


# ----------------------------------------------------------------------------------------------- temporary folders


def temp_dir(parent: str | os.PathLike, name: str) -> Path:
    """A new temporary folder ``parent/.<name>.tmp-<pid>-XXXX`` to build ``name`` in before it is moved into
    place; the pid in its name lets :func:`remove_stale_dirs` tell a killed writer's leftovers from a live one's."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}{TEMP_TAG}{os.getpid()}-"))


def remove_stale_dirs(parent: str | os.PathLike, name: str) -> list[Path]:
    """Delete the :func:`temp_dir` folders of ``name`` in ``parent`` whose process is gone (killed mid-write)."""
    removed = []
    for folder in Path(parent).glob(f".{name}{TEMP_TAG}*"):
        pid = folder.name[len(f".{name}{TEMP_TAG}"):].partition("-")[0]
        if folder.is_dir() and not folder.is_symlink() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    if removed:
        log.info("removed %d temporary folder(s) left by an interrupted %s in %s", len(removed), name, parent)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True
