"""The label table: exact default mapping and validation of user tables."""

from __future__ import annotations

import pytest

from multitask.errors import TaxonomyError
from multitask.taxonomy import CANCER_LABELS, ORGAN_LABELS, TYPE_FOLDERS, load_taxonomy

MALIGNANT = {
    "all_early", "all_pre", "all_pro", "brain_glioma", "brain_menin", "brain_tumor", "breast_malignant",
    "cervix_dyk", "cervix_koc", "kidney_tumor", "colon_aca", "lung_aca", "lung_scc", "lymph_cll", "lymph_fl",
    "lymph_mcl", "oral_scc",
}
ORGAN_OF = {
    "all_benign": "Blood", "all_early": "Blood", "all_pre": "Blood", "all_pro": "Blood",
    "brain_glioma": "Brain", "brain_menin": "Brain", "brain_tumor": "Brain",
    "breast_benign": "Breast", "breast_malignant": "Breast",
    "cervix_dyk": "Cervix", "cervix_koc": "Cervix", "cervix_mep": "Cervix", "cervix_pab": "Cervix",
    "cervix_sfi": "Cervix", "kidney_normal": "Kidney", "kidney_tumor": "Kidney",
    "colon_aca": "Colon", "colon_bnt": "Colon", "lung_aca": "Lung", "lung_bnt": "Lung", "lung_scc": "Lung",
    "lymph_cll": "Lymph", "lymph_fl": "Lymph", "lymph_mcl": "Lymph", "oral_normal": "Mouth", "oral_scc": "Mouth",
}


def test_label_orders_are_the_seeds():
    assert ORGAN_LABELS == ("Blood", "Brain", "Breast", "Cervix", "Colon", "Kidney", "Lung", "Lymph", "Mouth")
    assert CANCER_LABELS == ("Benign", "Malignant")


def test_default_table_maps_every_subclass_exactly():
    table = load_taxonomy().table
    assert len(table) == 26 and table["subclass"].is_unique
    assert dict(zip(table["subclass"], table["organ"], strict=True)) == ORGAN_OF
    malignant = set(table.loc[table["cancer"] == "Malignant", "subclass"])
    assert malignant == MALIGNANT
    assert set(table["type_folder"]) == set(TYPE_FOLDERS)
    assert set(table["organ"]) == set(ORGAN_LABELS)


def test_benign_tumours_carry_a_note():
    taxonomy = load_taxonomy()
    for subclass in ("brain_menin", "brain_tumor"):
        assert "benign" in taxonomy.lookup(subclass)["note"]


def test_user_table_overrides_malignancy(tmp_path):
    table = load_taxonomy().table.copy()
    table.loc[table["subclass"] == "brain_menin", "cancer"] = "Benign"
    path = tmp_path / "tax.csv"
    table.to_csv(path, index=False)
    assert load_taxonomy(path).lookup("brain_menin")["cancer"] == "Benign"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.assign(organ=t["organ"].where(t.index != 3, "Liver")), r"row 5 .*unknown organ 'Liver'"),
        (lambda t: t.assign(cancer=t["cancer"].where(t.index != 0, "Maybe")), r"row 2 .*unknown cancer label"),
        (lambda t: t.drop(columns=["organ"]), r"missing column\(s\) organ"),
        (lambda t: t.assign(subclass=t["subclass"].where(t.index != 5, "all_benign")),
         r"row 7: duplicate subclass 'all_benign'"),
    ],
)
def test_invalid_user_table_names_the_row(tmp_path, edit, message):
    path = tmp_path / "bad.csv"
    edit(load_taxonomy().table).to_csv(path, index=False)
    with pytest.raises(TaxonomyError, match=message):
        load_taxonomy(path)


def test_missing_taxonomy_file_is_a_clear_error(tmp_path):
    with pytest.raises(TaxonomyError, match="does not exist"):
        load_taxonomy(tmp_path / "nope.csv")
