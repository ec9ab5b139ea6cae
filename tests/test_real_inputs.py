"""deconvolve on the demo as real files hold it: log-normalised X with the raw counts in
layers['counts'] or .raw, Ensembl ids with version suffixes against a gene_ids column, a
reference read from .h5ad for a sample of its cells. Every variant that carries the raw counts
must give the plain run's proportions; those that do not must be refused."""

from __future__ import annotations

import numpy as np
import pytest
from real_layouts import log_normalised, with_counts_in_layer, with_counts_in_raw

from napari_stlnmf import deconvolve
from napari_stlnmf.errors import NotRawCountsError

KEY = "cell_type"
FAST = {"method": "classic", "seed": 0}  # the input handling is the same for both methods


@pytest.fixture(scope="module")
def plain(demo):
    slide, reference = demo
    return deconvolve(slide, reference, cell_type_key=KEY, **FAST)


def _same(result, plain):
    np.testing.assert_allclose(
        result.cell_fractions.to_numpy(), plain.cell_fractions.to_numpy(), atol=1e-6
    )


@pytest.mark.parametrize("side", ["slide", "reference"])
def test_log_normalised_input_is_refused(demo, side):
    slide, reference = demo
    if side == "slide":
        slide = slide.copy()
        slide.X = log_normalised(slide.X)
    else:
        reference = reference.copy()
        reference.X = log_normalised(reference.X)
    with pytest.raises(NotRawCountsError, match=rf"The {side}'s X holds values that are log"):
        deconvolve(slide, reference, cell_type_key=KEY, **FAST)


@pytest.mark.parametrize("layout", ["layer", "raw"])
def test_raw_counts_where_scanpy_keeps_them_give_the_plain_result(demo, plain, layout):
    slide, reference = demo
    to_layout = with_counts_in_layer if layout == "layer" else with_counts_in_raw
    real_slide, real_reference = to_layout(slide), to_layout(reference)
    x_before = real_slide.X.copy()
    result = deconvolve(real_slide, real_reference, cell_type_key=KEY, **FAST)
    _same(result, plain)
    source = "layers['counts']" if layout == "layer" else "raw.X"
    assert result.info["slide_counts_source"] == source
    assert result.info["reference_counts_source"] == source
    np.testing.assert_array_equal(real_slide.X.toarray(), x_before.toarray())  # untouched
    assert "counts" not in real_slide.layers or layout == "layer"


def test_ensembl_versions_against_a_gene_ids_column(demo, plain):
    slide, reference = demo
    ids = [f"ENSG{i:011d}" for i in range(slide.n_vars)]
    versioned = slide.copy()
    versioned.var_names = [f"{g}.{i % 5 + 1}" for i, g in enumerate(ids)]
    symbols = reference.copy()
    id_of = dict(zip(slide.var_names, ids))
    symbols.var["gene_ids"] = [id_of[g] for g in symbols.var_names]
    result = deconvolve(versioned, symbols, cell_type_key=KEY, **FAST)
    matching = result.info["gene_matching"]
    assert matching["slide"] == "var_names" and matching["reference"] == "var['gene_ids']"
    assert matching["version_suffixes_stripped"] is True
    assert matching["n_shared_genes"] == slide.n_vars
    _same(result, plain)


def test_reference_read_from_h5ad_for_a_sample_of_cells(demo, plain, tmp_path):
    slide, reference = demo
    path = tmp_path / "reference.h5ad"
    with_counts_in_layer(reference).write_h5ad(path)
    whole = deconvolve(slide, path, cell_type_key=KEY, **FAST)
    _same(whole, plain)
    part = deconvolve(slide, path, cell_type_key=KEY, max_cells_per_type=60, **FAST)
    again = deconvolve(slide, reference, cell_type_key=KEY, max_cells_per_type=60, **FAST)
    _same(part, again)  # the file is read for the same cells as kept in memory
    assert part.info["reference_cells"] == {
        "n_cells": reference.n_obs,
        "n_cells_kept": 8 * 60,
        "max_cells_per_type": 60,
    }
    assert part.info["reference_counts_source"] == "layers['counts']"
    assert not np.allclose(part.cell_fractions.to_numpy(), plain.cell_fractions.to_numpy())
