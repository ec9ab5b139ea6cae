"""The reference check before the fit (issue 20, must-have 3) on the bundled demo reference and
modified copies of it: each problem is found, the unmodified demo gives no finding, and the
deconvolve pipeline warns each finding (ReferenceWarning) and records it in the run info."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from napari_stlnmf.errors import ReferenceWarning
from napari_stlnmf.reference_check import check_reference, gene_name_case

KEY = "cell_type"


def _relabelled(reference, mapping_rows):
    """A copy of the reference with some cells' labels changed (rows -> new label)."""
    ref = reference.copy()
    labels = ref.obs[KEY].astype(str).to_numpy(dtype=object)
    for rows, label in mapping_rows:
        labels[rows] = label
    ref.obs[KEY] = pd.Categorical(labels)
    return ref


def test_unmodified_demo_gives_no_finding(demo):
    slide, reference = demo
    report = check_reference(reference, slide, cell_type_key=KEY)
    assert report.findings == []
    # the closest pair of demo types is far from collinear (0.65 measured)
    assert min(report.collinearity_residual.values()) > 0.5


def test_type_split_in_two_halves_is_collinear(demo):
    """A type over-clustered in two (its cells split at random between two names): each half
    is explained by the other, and the finding names it."""
    slide, reference = demo
    rows = np.flatnonzero(reference.obs[KEY].astype(str) == "astrocyte")
    half = np.random.default_rng(0).permutation(rows)[: rows.size // 2]
    ref = _relabelled(reference, [(half, "astrocyte_b")])
    report = check_reference(ref, slide, cell_type_key=KEY)
    found = [f for f in report.findings if f.kind == "collinear_types"]
    assert {f.types[0] for f in found} == {"astrocyte", "astrocyte_b"}
    by_type = {f.types[0]: f for f in found}
    assert by_type["astrocyte"].types[1] == "astrocyte_b"
    assert by_type["astrocyte_b"].types[1] == "astrocyte"
    assert report.collinearity_residual["astrocyte"] < 0.3
    assert "Merge these types" in found[0].message
    assert set(report.kinds()) == {"collinear_types"}


def test_a_mix_of_two_types_is_collinear(demo):
    """A "type" whose cells are the cells of two others (a doublet-like cluster): explained by
    those two, both named."""
    slide, reference = demo
    labels = reference.obs[KEY].astype(str).to_numpy()
    rng = np.random.default_rng(1)
    a = rng.choice(np.flatnonzero(labels == "neuron_L1"), 60, replace=False)
    b = rng.choice(np.flatnonzero(labels == "microglia"), 60, replace=False)
    ref = _relabelled(reference, [(np.concatenate([a, b]), "mixed")])
    report = check_reference(ref, slide, cell_type_key=KEY)
    found = {f.types[0]: f for f in report.findings if f.kind == "collinear_types"}
    assert "mixed" in found
    assert set(found["mixed"].types[1:3]) == {"neuron_L1", "microglia"}


def test_type_with_ten_cells(demo):
    slide, reference = demo
    labels = reference.obs[KEY].astype(str).to_numpy()
    keep = np.ones(reference.n_obs, dtype=bool)
    keep[np.flatnonzero(labels == "immune")[10:]] = False
    report = check_reference(reference[keep].copy(), slide, cell_type_key=KEY)
    assert report.kinds() == ["few_cells"]
    assert report.findings[0].types == ("immune",)
    assert "'immune' (10)" in report.findings[0].message


@pytest.mark.parametrize("label", ["Unknown", "NA", "unassigned", "Other", " nan "])
def test_placeholder_label(demo, label):
    slide, reference = demo
    rows = np.flatnonzero(reference.obs[KEY].astype(str) == "microglia")
    ref = _relabelled(reference, [(rows, label)])
    report = check_reference(ref, slide, cell_type_key=KEY)
    assert report.kinds() == ["placeholder_label"]
    assert report.findings[0].types == (label,)


def test_upper_case_reference_genes(demo):
    """Human-style all-caps symbols in the reference, capitalised (mouse-style) in the slide."""
    slide, reference = demo
    ref = reference.copy()
    ref.var_names = ref.var_names.str.upper()
    assert gene_name_case(slide.var_names) == "title"
    assert gene_name_case(ref.var_names) == "upper"
    report = check_reference(ref, slide, cell_type_key=KEY, case_insensitive=True)
    assert report.kinds() == ["gene_name_case"]
    assert "different species" in report.findings[0].message
    # without case_insensitive the names do not match at all: the shared-gene check fires too
    assert "few_shared_genes" in check_reference(ref, slide, cell_type_key=KEY).kinds()


def test_slide_with_most_genes_dropped(demo):
    slide, reference = demo
    part = slide[:, ::4].copy()  # 150 of the reference's 600 genes
    report = check_reference(reference, part, cell_type_key=KEY)
    assert report.kinds() == ["few_shared_genes"]
    assert "150 of the reference's 600 genes (25 %)" in report.findings[0].message
    # half the genes is still enough
    assert check_reference(reference, slide[:, ::2].copy(), cell_type_key=KEY).findings == []


def test_signature_table_and_prepared_reference(demo, demo_reference):
    """A signature table (no cells: no cell-count check) and a prepared reference (only B)."""
    from napari_stlnmf.preprocess import prepare

    slide, _ = demo
    sig = demo_reference.profiles.copy()
    sig["Unknown"] = sig["astrocyte"]
    report = check_reference(sig, slide)
    assert set(report.kinds()) == {"placeholder_label", "collinear_types"}
    prep = prepare(slide.X, slide.var_names, demo_reference)
    assert check_reference(prep).findings == []


def test_deconvolve_warns_and_records(demo, tmp_path):
    """The pipeline warns each finding before the fit and keeps it in info and uns."""
    import anndata as ad

    from napari_stlnmf import deconvolve

    slide, reference = demo
    rows = np.flatnonzero(reference.obs[KEY].astype(str) == "microglia")
    ref = _relabelled(reference, [(rows, "Unknown")])
    with pytest.warns(ReferenceWarning, match="placeholder labels"):
        res = deconvolve(slide, ref, cell_type_key=KEY, n_layers=3, seed=0)
    check = res.info["reference_check"]
    assert check["kinds"] == ["placeholder_label"]
    assert check["types"] == ["Unknown"]
    path = tmp_path / "r.h5ad"
    res.adata.write_h5ad(path)
    assert list(ad.read_h5ad(path).uns["stlnmf"]["reference_check"]["kinds"]) == [
        "placeholder_label"
    ]


def test_demo_run_has_no_reference_warning(demo):
    from napari_stlnmf import deconvolve

    slide, reference = demo
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReferenceWarning)
        res = deconvolve(slide, reference, cell_type_key=KEY, n_layers=3, seed=0)
    assert res.info["reference_check"]["n_findings"] == 0
