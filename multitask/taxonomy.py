"""Labels, and the table that maps each Kaggle subclass folder to (organ, malignancy).

Pure data: no TensorFlow here. The default table ships as ``taxonomy.csv`` inside the package; a user can pass
their own CSV with the same columns (e.g. to call meningioma and pituitary adenoma Benign). pandas is imported
only where a table is read, so the label constants cost nothing to import (the CLI's parser uses them).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from multitask.errors import TaxonomyError

if TYPE_CHECKING:
    import pandas as pd

ORGAN_LABELS: tuple[str, ...] = (
    "Blood", "Brain", "Breast", "Cervix", "Colon", "Kidney", "Lung", "Lymph", "Mouth",
)
CANCER_LABELS: tuple[str, ...] = ("Benign", "Malignant")
MALIGNANT = "Malignant"  # the positive class: sensitivity is Malignant recall
TASKS: tuple[str, ...] = ("organ", "cancer")
COLUMNS: tuple[str, ...] = ("subclass", "type_folder", "organ", "cancer", "note")
TYPE_FOLDERS: tuple[str, ...] = (
    "ALL", "Brain Cancer", "Breast Cancer", "Cervical Cancer", "Kidney Cancer",
    "Lung and Colon Cancer", "Lymphoma", "Oral Cancer",
)


@dataclass(frozen=True)
class Taxonomy:
    """The subclass table plus the label order of each task (fixed, so class ids never move)."""

    table: pd.DataFrame
    source: str = "default"

    def labels(self, task: str) -> tuple[str, ...]:
        """Class names of ``task`` ("organ" or "cancer") in id order."""
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        return ORGAN_LABELS if task == "organ" else CANCER_LABELS

    @property
    def subclasses(self) -> tuple[str, ...]:
        return tuple(self.table["subclass"])

    def lookup(self, subclass: str) -> dict[str, str]:
        """Row of ``subclass`` as a dict (type_folder, organ, cancer, note)."""
        row = self.table.loc[self.table["subclass"] == subclass]
        if row.empty:
            raise KeyError(subclass)
        return row.iloc[0].to_dict()

    def to_records(self) -> list[dict[str, str]]:
        """The table as JSON-ready rows (stored in a run's config.json)."""
        return self.table.to_dict(orient="records")

    @classmethod
    def from_records(cls, records: list[dict[str, str]], *, source: str = "run") -> Taxonomy:
        """Inverse of :meth:`to_records`, validated."""
        import pandas as pd

        return cls(validate(pd.DataFrame.from_records(records), origin=source), source=source)


def validate(table: pd.DataFrame, *, origin: str) -> pd.DataFrame:
    """Return a cleaned copy of ``table`` or raise TaxonomyError naming the offending row."""
    missing = [c for c in COLUMNS if c not in table.columns and c != "note"]
    if missing:
        raise TaxonomyError(
            f"{origin}: missing column(s) {', '.join(missing)}; expected columns {', '.join(COLUMNS)}"
        )
    table = table.copy()
    if "note" not in table.columns:
        table["note"] = ""
    table = table[list(COLUMNS)].fillna("")
    for col in COLUMNS:
        table[col] = table[col].astype(str).str.strip()
    for i, row in table.iterrows():
        where = f"{origin}, row {i + 2} (subclass {row['subclass']!r})"  # +2: header line, 1-based
        if not row["subclass"]:
            raise TaxonomyError(f"{where}: empty subclass name")
        if row["organ"] not in ORGAN_LABELS:
            raise TaxonomyError(
                f"{where}: unknown organ {row['organ']!r}; expected one of {', '.join(ORGAN_LABELS)}"
            )
        if row["cancer"] not in CANCER_LABELS:
            raise TaxonomyError(
                f"{where}: unknown cancer label {row['cancer']!r}; expected one of {', '.join(CANCER_LABELS)}"
            )
    dup = table["subclass"].duplicated(keep="first")
    if dup.any():
        i = int(dup.to_numpy().nonzero()[0][0])
        raise TaxonomyError(
            f"{origin}, row {i + 2}: duplicate subclass {table['subclass'].iloc[i]!r}; each folder name "
            "may appear once"
        )
    return table.reset_index(drop=True)


def load_taxonomy(path: str | Path | None = None) -> Taxonomy:
    """Load the packaged default table, or a user CSV with the same columns."""
    import pandas as pd

    if path is None:
        with resources.files("multitask").joinpath("taxonomy.csv").open("r", encoding="utf-8") as fh:
            return Taxonomy(validate(pd.read_csv(fh, dtype=str), origin="default taxonomy"))
    path = Path(path)
    if not path.is_file():
        raise TaxonomyError(f"taxonomy file {path} does not exist; pass a CSV with columns {', '.join(COLUMNS)}")
    try:
        table = pd.read_csv(path, dtype=str)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise TaxonomyError(f"{path}: not a readable CSV ({exc})") from exc
    return Taxonomy(validate(table, origin=str(path)), source=str(path))
