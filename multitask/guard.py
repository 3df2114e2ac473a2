"""The output guard: where a command may write. Every command that writes (train, evaluate, predict, export, scan,
audit-split, demo-data) asks :func:`check_output` first, before any work.

A destination is resolved (links and ``..`` followed, so two names of one place compare equal) and refused when:

- it lies inside a **data folder**: a report's PNGs in a subclass folder would become training images
  (:func:`data_roots` says which folders a split's images make data folders);
- it is, or lies inside, a **file a run owns** (the run's marker lists them): ``predict --out R/config.json``
  would break run R, ``scan --out R/split.csv`` would replace the split R was trained on. Only the run's own
  command (evaluate or export of that run) writes among them;
- it is a **non-empty folder that is not ours**: a command that writes several files into a folder marks it
  (``mark``) and writes only into a new or empty folder, or one it marked before; every file it would replace
  must be one it wrote.

A run's marker (``.multitask-run.json``) lists the files the run owns, relative to the run folder;
:func:`owned_paths` refuses a marker that names anything outside the folder (``../x``, an absolute path, a path
through a linked folder), so an overwrite never deletes beyond the run. No TensorFlow, no pandas.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePath
from typing import Any

from multitask.errors import ConfigError, RunError
from multitask.files import TEMP_TAG, check_writable

MARKER_FILE = ".multitask-run.json"  # in every run folder: says it is a run of ours and which files it owns
LOCK_FILE = ".lock"
MARKER_MAX_BYTES = 1 << 20


# ----------------------------------------------------------------------------------------------- what a folder owns


def read_marker(marker: Path) -> dict[str, Any]:
    """The JSON object in a marker file (a run's, or a command's output mark); RunError when it is damaged."""
    from multitask.files import open_regular

    try:
        with open_regular(marker, max_bytes=MARKER_MAX_BYTES) as stream:
            record = json.loads(stream.read().decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise RunError(f"{marker} is damaged ({exc}); this folder cannot be recognised as ours: move what you "
                       "want to keep and delete the folder, or choose another $out") from exc
    if not isinstance(record, dict) or not isinstance(record.get("files", []), list):
        raise RunError(f"{marker} is not a marker of ours; choose another $out")
    return record


def owned_paths(folder: str | os.PathLike, *, marker: str = MARKER_FILE) -> list[Path]:
    """The files ``folder``'s marker lists, as paths in the resolved folder; RunError, before anything is touched,
    when one of them could lie outside it (``..``, an absolute path, a linked folder on the way)."""
    root = Path(folder).resolve()
    record = read_marker(root / marker)
    owned = []
    for name in record.get("files", []):
        problem = _outside(root, name)
        if problem:
            raise RunError(f"{root / marker} lists {name!r} among its files, but {problem}: the marker was edited or "
                           "damaged, so nothing was deleted or written. Remove that entry, or move what you want to "
                           "keep and choose another $out")
        owned.append(root / name)
    return owned


def _outside(root: Path, name: Any) -> str | None:
    """Why ``name`` (from a marker) may not stand for a file inside ``root``, or None."""
    if not isinstance(name, str) or not name or "\0" in name:
        return "that is not a file name"
    path = PurePath(name)
    if path.is_absolute():
        return "that is an absolute path"
    if ".." in path.parts or path.parts in ((), (".",)):
        return "that leads out of the folder"
    parent = root / path.parent
    if parent.resolve() != parent:  # a linked folder on the way: deleting through it deletes elsewhere
        return f"{parent} is (or goes through) a link"
    return None


def runs_around(path: Path) -> list[Path]:
    """The run folders (those holding a marker) that ``path`` (resolved) is, or lies in, nearest first."""
    return [folder for folder in (path, *path.parents) if (folder / MARKER_FILE).is_file()]


# ----------------------------------------------------------------------------------------------- data folders


def data_roots(images: Iterable[str], *, declared: Iterable[str | os.PathLike | None] = (),
               keep: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """The data folders of a set of image files (resolved): ``declared`` ones (``--data``), and for each image
    folder (a subclass folder) its parent (the type folder) and grandparent (the dataset root) — the latter
    unless it is ``/``, the home folder, or holds one of ``keep`` (e.g. the run folder that lists the images)."""
    roots = {Path(d).expanduser().resolve() for d in declared if d}
    home = Path.home().resolve()
    kept = [Path(k).resolve() for k in keep]
    for folder in {os.path.dirname(os.path.abspath(str(p))) for p in images}:
        resolved = Path(folder).resolve()
        for root in (resolved.parent, resolved.parent.parent):
            if root == root.parent or root == home or any(k == root or root in k.parents for k in kept):
                break
            roots.add(root)
    return sorted(roots)


# ----------------------------------------------------------------------------------------------- the guard


def check_output(path: str | os.PathLike, *, flag: str, folder: bool = False,
                 data: Iterable[str | os.PathLike] = (), run: str | os.PathLike | None = None,
                 writes: Sequence[str] = (), mark: str | None = None) -> Path:
    """The resolved ``path`` when a command may write it (a file; with ``folder=True`` a folder it writes the
    files ``writes`` into); ConfigError naming ``flag`` (a ``$parameter``) and the fix otherwise. Creates nothing.

    ``data``: data folders (:func:`data_roots`) the output may not lie in. ``run``: the run whose own command
    this is (it may write in that run's folder, and must not replace files there that the run does not own).
    ``mark``: the file that marks a folder as this command's earlier output; with it, a non-empty folder without
    it is refused. Finally :func:`multitask.files.check_writable` checks that the place can be written.
    """
    target = Path(path).expanduser().resolve()
    for root in data:
        root = Path(root).resolve()
        if target == root or root in target.parents:
            raise ConfigError(f"{flag} {path} lies inside the data folder {root}: outputs never go into the data "
                              "(figures there would be read as images of the dataset); choose a place outside it")
    own = Path(run).resolve() if run is not None else None
    files = [target / name for name in writes] if folder else [target]
    for found in runs_around(target):
        _check_run_files(found, target, files, flag=flag, path=path, mine=found == own, folder=folder)
    if folder and mark is not None and target != own:
        _check_ours_or_empty(target, files, flag=flag, mark=mark)
    check_writable(path, flag=flag, folder=folder)
    return target


def _check_run_files(run: Path, target: Path, files: list[Path], *, flag: str, path, mine: bool,
                     folder: bool) -> None:
    owned = [*owned_paths(run), run / MARKER_FILE, run / LOCK_FILE]
    if mine:  # the run's own command: it replaces only what the run owns
        for file in files:
            if os.path.lexists(file) and not any(file == o or o in file.parents for o in owned):
                raise ConfigError(f"{flag} {path}: {file} exists and is not a file of the run {run} (its "
                                  f"{MARKER_FILE} does not list it), so it is not replaced; move it, or choose "
                                  f"another {flag}")
        return
    if folder and target == run:
        raise ConfigError(f"{flag} {path} is the folder of another run ({run}); write into a new or empty folder, "
                          "or evaluate / export that run itself")
    for file in [target, *files]:
        hit = next((o for o in owned if file == o or o in file.parents), None)
        if hit is not None:
            raise ConfigError(f"{flag} {path} would write {file}, which belongs to the run {run} (its {MARKER_FILE} "
                              f"lists {hit.relative_to(run)}): that would damage the run; choose a place outside "
                              "its files")


def _check_ours_or_empty(target: Path, files: list[Path], *, flag: str, mark: str) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise ConfigError(f"{flag} {target} exists and is not a folder; choose another {flag}")
    if (target / mark).is_file():  # ours from before: what it would replace must be what it wrote
        existing = [f for f in files if os.path.lexists(f)]
        ours = [*owned_paths(target, marker=mark), target / mark] if existing else []
        foreign = [f.name for f in existing if f not in ours]
        if foreign:
            raise ConfigError(f"{flag} {target} holds {', '.join(foreign)}, which an earlier output there did not "
                              f"write (not in its {mark}); nothing was written: move them, or choose another {flag}")
        return
    visible = sorted(p.name for p in target.iterdir() if TEMP_TAG not in p.name)
    if visible:
        shown = ", ".join(visible[:5]) + (", ..." if len(visible) > 5 else "")
        raise ConfigError(f"{flag} {target} is not empty ({shown}) and is not an earlier output of this command; "
                          f"nothing was written, so none of your files is replaced: choose a new or empty {flag}")
