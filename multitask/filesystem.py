"""Reading the file system safely: walk a folder tree once (no link loops, regular files only, each file once),
tell what kind of file a path is without opening it, and compare files by resolved path. No project imports."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class WalkReport:
    """What :func:`walk_files` left out on its way through a folder tree, and why."""

    ignored_files: int = 0  # files whose name did not pass ``keep``
    skipped_links: list[str] = field(default_factory=list)  # folder links not followed: into the tree, or a loop
    not_regular: list[str] = field(default_factory=list)  # kept names that are not regular files (FIFO, socket...)
    duplicates: int = 0  # files reached a second time through a link (same resolved path), dropped


def walk_files(root: str | os.PathLike, *, keep: Callable[[str], bool],
               report: WalkReport | None = None) -> Iterator[tuple[str, list[str]]]:
    """``(folder, its files whose name passes keep)`` for every folder under ``root``, depth first in name order,
    absolute paths.

    Folder links are followed (a subclass folder may link to another disk) unless they lead back into the tree
    or above it, or to a folder already walked (tracked by ``(st_dev, st_ino)``): a loop such as
    ``ln -s .. brain_glioma/loop`` is walked once, not until the path gets too long. A file reached twice
    (compared by resolved path) is listed once, and only regular files are listed (a FIFO named ``f.jpg`` would
    block whoever opens it). Both are judged from the directory entry and ``stat``; no file is opened.
    ``report`` (optional) collects what was left out.
    """
    report = report if report is not None else WalkReport()
    root = os.path.abspath(os.path.expanduser(root))
    tree = os.path.realpath(root)
    walked = {_folder_key(root)}
    seen_files: set[str] = set()
    stack = [(root, tree)]  # (path as reached, resolved path)
    while stack:
        folder, resolved = stack.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as exc:
            log.warning("cannot list %s (%s); skipping it", folder, exc.strerror)
            continue
        kept, subfolders = [], []
        for entry in entries:
            if _broken(entry):  # a link loop (ln -s s.jpg s.jpg: ELOOP) or an entry gone since the listing
                if keep(entry.name):
                    report.not_regular.append(entry.path)
                continue
            if entry.is_dir():
                target = _follow_folder(entry, resolved, tree=tree, walked=walked)
                if target is None:
                    report.skipped_links.append(entry.path)
                else:
                    subfolders.append((entry.path, target))
            elif not keep(entry.name):
                report.ignored_files += 1
            elif not entry.is_file():  # S_ISREG from the entry's type (stat for links): FIFOs, sockets, devices
                report.not_regular.append(entry.path)
            else:
                real = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(resolved, entry.name)
                if real in seen_files:
                    report.duplicates += 1
                    continue
                seen_files.add(real)
                kept.append(entry.path)
        stack.extend(reversed(subfolders))
        yield folder, kept


def _broken(entry: os.DirEntry) -> bool:
    """Whether ``entry`` cannot be followed: its kind cannot be told without an error."""
    try:
        entry.is_dir()
        entry.is_file()
    except OSError:
        return True
    return False


def _folder_key(path: str) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino


def _follow_folder(entry: os.DirEntry, parent_resolved: str, *, tree: str, walked: set) -> str | None:
    """Resolved path of the sub-folder ``entry`` to walk, or None when it must not be walked (again)."""
    if entry.is_symlink():
        target = os.path.realpath(entry.path)
        if _contains(tree, target) or _contains(target, tree):
            return None  # back into the tree (walked anyway) or above it (a loop)
    else:
        target = os.path.join(parent_resolved, entry.name)
    try:
        key = _folder_key(entry.path)
    except OSError:
        return None
    if key in walked:
        return None
    walked.add(key)
    return target


def _contains(folder: str, path: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def log_walk_report(report: WalkReport, root: str | os.PathLike) -> None:
    """Log what :func:`walk_files` left out under ``root``: links not followed, non-regular files, duplicates."""
    if report.skipped_links:
        log.warning("did not follow %d folder link(s) under %s that lead back into the tree, above it, or to a "
                    "folder already scanned (a loop would list every image many times): %s", len(report.skipped_links),
                    root, first_few(report.skipped_links))
    if report.not_regular:
        log.warning("skipping %d file name(s) under %s that are not regular files (a FIFO, socket or device, or a "
                    "broken link): %s", len(report.not_regular), root, first_few(report.not_regular))
    if report.duplicates:
        log.warning("dropped %d duplicate file(s) under %s: reached again through a link (same resolved "
                    "path); each file is listed once", report.duplicates, root)


def first_few(items: Sequence[str], n: int = 3) -> str:
    """The first ``n`` items, and how many more."""
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


FILE_KINDS = ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"),
              (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"))


def file_kind(mode: int) -> str:
    """What an ``st_mode`` describes: "regular file", "folder", "FIFO", "socket", ... ."""
    return next((name for test, name in FILE_KINDS if test(mode)), "special file")


def is_regular_file(path: str | os.PathLike) -> bool:
    """True for an existing regular file (links followed); never opens it, so a FIFO cannot block the caller."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):  # missing, unreadable folder, or a NUL in the name
        return False


def resolved_paths(paths: Iterable[str]) -> list[str]:
    """Each path with every link and ``..`` resolved (``os.path.realpath``), so two names of one file compare equal.

    Each folder is resolved once; a file costs one ``lstat`` unless it is itself a link.
    """
    folders: dict[str, str] = {}
    out = []
    for path in map(str, paths):
        path = os.path.abspath(path)
        folder, name = os.path.split(path)
        if folder not in folders:
            folders[folder] = os.path.realpath(folder)
        out.append(os.path.realpath(path) if os.path.islink(path) else os.path.join(folders[folder], name))
    return out
