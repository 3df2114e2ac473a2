"""Sharded batch prediction: the K-th of N deterministic shares of a list of inputs, and merging the parts back.

A million files are predicted by N machines (or processes) at once: each runs ``multitask predict RUN PATHS...
--shard K/N --out part-K.csv`` on the same PATHS, and ``multitask predict --merge part-*.csv --out all.csv`` joins
the parts. The share depends only on the inputs: they are sorted (and listed once each), then cut into N
contiguous blocks of equal size (within one file), so every machine computes the same cut without talking to the
others. Each part records where it came from in three columns, so that the merge can check that every input
appears exactly once and that no shard is missing: ``shard`` ("K/N"), ``input_index`` (the file's position in
the sorted inputs, from 0) and ``inputs`` (how many there are in all). Three more say what made it, so that the
merge joins only parts of one job: ``model_sha256`` (the run's model file), ``threshold`` (the operating point:
the malignancy threshold, and the per-organ ones) and ``inputs_sha256`` (a hash of the whole sorted input list,
so parts cut from different lists of the same length are told apart). The merged table drops all six: it is the
unsharded table, in sorted path order.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from multitask.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SHARD_COLUMN = "shard"
INDEX_COLUMN = "input_index"
TOTAL_COLUMN = "inputs"
IDENTITY_COLUMNS = ("model_sha256", "threshold", "inputs_sha256")  # must be the same in every part of one job
PART_COLUMNS = (SHARD_COLUMN, INDEX_COLUMN, TOTAL_COLUMN, *IDENTITY_COLUMNS)


@dataclass(frozen=True)
class Shard:
    """The ``index``-th (from 1) of ``count`` shares."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"K/N"`` with 1 <= K <= N; ConfigError otherwise."""
        k, sep, n = str(text).partition("/")
        try:
            shard = cls(int(k), int(n)) if sep else None
        except ValueError:
            shard = None
        if shard is None or not 1 <= shard.index <= shard.count:
            raise ConfigError(f"$shard {text!r} must be K/N with 1 <= K <= N, e.g. 2/3 for the second of three shares")
        return shard

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def bounds(self, total: int) -> tuple[int, int]:
        """Positions [start, stop) of this share among ``total`` sorted inputs."""
        return (self.index - 1) * total // self.count, self.index * total // self.count

    def select(self, files: Sequence[str]) -> tuple[list[str], int, int]:
        """This share of ``files`` (sorted, each once), its first position, and the number of inputs in all."""
        ordered = sorted_inputs(files)
        if len(ordered) < len(files):
            log.info("%d input(s) were listed more than once; each is predicted once", len(files) - len(ordered))
        if self.count > len(ordered):
            raise ConfigError(f"$shard {self} asks for {self.count} shares of {len(ordered)} input file(s): use at "
                              f"most {len(ordered)} shards, so that none is empty")
        start, stop = self.bounds(len(ordered))
        return ordered[start:stop], start, len(ordered)


def sorted_inputs(files: Sequence[str]) -> list[str]:
    """The inputs as every shard orders them: sorted, each once."""
    return sorted(set(map(str, files)))


def inputs_digest(files: Sequence[str]) -> str:
    """SHA-256 of the whole sorted input list: the same on every machine given the same PATHS."""
    return hashlib.sha256("\0".join(sorted_inputs(files)).encode("utf-8", "surrogateescape")).hexdigest()


def operating_point(predictor) -> str:
    """The predictor's decision rule as text: the malignancy threshold and any per-organ ones ("none" without a
    cancer head), and " + flip TTA" when it averages each image with its mirror."""
    tta = " + flip TTA" if getattr(predictor, "tta", False) else ""  # other probabilities: never merged with plain
    if "cancer" not in predictor.tasks:
        return "none" + tta
    organs = getattr(predictor, "organ_thresholds", None) or {}
    return "; ".join([f"{predictor.threshold:.6g}", *(f"{organ} {t:.6g}" for organ, t in sorted(organs.items()))]) + tta


def predict_shard(predictor, files: Sequence[str], shard: Shard, **options) -> pd.DataFrame:
    """``predictor.predict_files`` (a :class:`multitask.predict.Predictor`) of this shard's share of ``files``,
    labelled with the part columns; ``options`` go to predict_files."""
    share, start, total = shard.select(files)
    log.info("shard %s: inputs %d..%d of %d (sorted)", shard, start + 1, start + len(share), total)
    identity = {"model_sha256": predictor.model_sha256 or "unknown", "threshold": operating_point(predictor),
                "inputs_sha256": inputs_digest(files)}
    return label_part(predictor.predict_files(share, **options), shard, start, total, identity=identity)


def label_part(frame: pd.DataFrame, shard: Shard, start: int, total: int, *,
               identity: dict[str, str]) -> pd.DataFrame:
    """``frame`` (the predictions of one share, in order) with the columns that say where its rows belong and
    what made them (``identity``: one value per :data:`IDENTITY_COLUMNS`)."""
    return frame.assign(**{SHARD_COLUMN: str(shard), INDEX_COLUMN: range(start, start + len(frame)),
                           TOTAL_COLUMN: total, **{name: str(identity[name]) for name in IDENTITY_COLUMNS}})


def read_part(path: str | os.PathLike) -> pd.DataFrame:
    """One part written by ``predict --shard`` (.csv or .json); DataError naming the file when it is not one."""
    path = Path(path)
    try:
        frame = pd.read_json(path, orient="records") if path.suffix.lower() == ".json" else pd.read_csv(path)
    except FileNotFoundError:
        raise DataError(f"part {path} does not exist") from None
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise DataError(f"part {path} cannot be read as a predictions table ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:120]})") from None
    missing = [c for c in ("path", *PART_COLUMNS) if c not in frame.columns]
    if missing or frame.empty:
        raise DataError(f"part {path} has {'no rows' if not missing else 'no ' + ', '.join(missing) + ' column'}: "
                        "it was not written by `multitask predict ... --shard K/N --out FILE`")
    shards = frame[SHARD_COLUMN].astype(str).unique()
    totals = frame[TOTAL_COLUMN].unique()
    if len(shards) != 1 or len(totals) != 1 or any(frame[c].astype(str).nunique() != 1 for c in IDENTITY_COLUMNS):
        raise DataError(f"part {path} mixes rows of shards {', '.join(map(str, shards))} (or of different input "
                        "lists); merge the parts that predict --shard wrote, unedited")
    try:
        Shard.parse(shards[0])
    except ConfigError:
        raise DataError(f"part {path} has shard {shards[0]!r}; expected K/N") from None
    return frame


def merge_parts(paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """The predictions of all parts in sorted input order, without the part columns; DataError naming the bad
    part when a shard is missing or given twice, the parts come from different cuts, or an input is not there
    exactly once."""
    if not paths:
        raise DataError("no parts to merge; pass the files that `predict --shard K/N --out FILE` wrote")
    parts = {str(p): read_part(p) for p in paths}
    shard_of = {name: Shard.parse(str(frame[SHARD_COLUMN].iloc[0])) for name, frame in parts.items()}
    total_of = {name: int(frame[TOTAL_COLUMN].iloc[0]) for name, frame in parts.items()}
    first = next(iter(parts))
    for column in IDENTITY_COLUMNS:  # one job: the same model, operating point and input list in every part
        value = str(parts[first][column].iloc[0])
        for name, frame in parts.items():
            if str(frame[column].iloc[0]) != value:
                raise DataError(f"part {name} has {column} {str(frame[column].iloc[0])[:24]!r} but {first} has "
                                f"{value[:24]!r}: the parts come from different runs, thresholds or input lists; "
                                "merge only the parts of one `predict --shard` job")
    count, total = shard_of[first].count, total_of[first]
    by_index: dict[int, str] = {}
    for name in parts:
        shard = shard_of[name]
        if shard.count != count or total_of[name] != total:
            raise DataError(f"part {name} is shard {shard} of {total_of[name]} inputs but {first} is shard "
                            f"{shard_of[first]} of {total}: the parts come from different runs of predict --shard")
        if shard.index in by_index:
            raise DataError(f"shard {shard} is given twice: {by_index[shard.index]} and {name}")
        by_index[shard.index] = name
    missing = [f"{k}/{count}" for k in range(1, count + 1) if k not in by_index]
    if missing:
        raise DataError(f"shard {', '.join(missing)} of {total} inputs is missing (got {', '.join(parts)}); run "
                        f"`multitask predict RUN PATHS... --shard {missing[0]} --out FILE` and merge again")
    seen: dict[str, str] = {}
    for name, frame in parts.items():
        for path in frame["path"].astype(str):
            if path in seen:
                raise DataError(f"input {path} appears twice: in {seen[path]} and in {name}; every input must be "
                                "predicted exactly once")
            seen[path] = name
    for name, frame in parts.items():
        start, stop = shard_of[name].bounds(total)
        if sorted(frame[INDEX_COLUMN].tolist()) != list(range(start, stop)):
            raise DataError(f"part {name} holds {len(frame)} rows at input positions other than {start}..{stop - 1}, "
                            f"which shard {shard_of[name]} of {total} inputs covers; it is incomplete or was edited")
    merged = pd.concat(list(parts.values()), ignore_index=True).sort_values(INDEX_COLUMN, kind="stable")
    return merged.drop(columns=list(PART_COLUMNS)).reset_index(drop=True)
