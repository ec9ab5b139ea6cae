"""Marker genes of a single-cell reference: what a type of few cells is allowed to rank by."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from napari_stlnmf import preprocess
from napari_stlnmf.preprocess import build_reference, select_marker_genes


def _reference(seed: int = 0) -> ad.AnnData:
    """Types `big_a`, `big_b` (200 cells each) and `rare` (8 cells), 40 genes of background.

    gene 0: three of the rare cells express it strongly (mean 9.4, detected in 3 of 8);
    gene 1: every rare cell expresses it moderately (mean 6); gene 2 / 3: `big_a` / `big_b`'s
    own genes, in all their cells; genes 4, 5: a few cells of every type hold thousands."""
    rng = np.random.default_rng(seed)
    sizes = {"big_a": 200, "big_b": 200, "rare": 8}
    labels = np.repeat(list(sizes), list(sizes.values()))
    n_genes = 40
    counts = rng.poisson(5.0, size=(labels.size, n_genes)).astype(np.float32)
    counts[:, :4] = rng.poisson(0.2, size=(labels.size, 4))
    rare = np.flatnonzero(labels == "rare")
    counts[rare, 0] = 0
    counts[rare[:3], 0] = 25
    counts[rare, 1] = rng.poisson(6.0, size=rare.size)
    counts[labels == "big_a", 2] = rng.poisson(6.0, size=sizes["big_a"])
    counts[labels == "big_b", 3] = rng.poisson(6.0, size=sizes["big_b"])
    # noise genes: the reference's most overdispersed, which the variance filter skips
    counts[:: labels.size // 4, 4:6] = 20000
    return ad.AnnData(
        X=sp.csr_matrix(counts),
        obs=pd.DataFrame({"cell_type": labels}, index=[f"c{i}" for i in range(labels.size)]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]),
    )


def test_a_rare_type_ranks_the_gene_all_its_cells_share(monkeypatch):
    """By its mean alone the rare type's top gene is the one three of its eight cells drive; by
    the mean less two standard errors it is the gene all of them express. The types of 200
    cells keep their marker either way."""
    monkeypatch.setattr(preprocess, "MIN_SHARED_GENES", 1)  # three markers are enough here
    ref = build_reference(_reference(), cell_type_key="cell_type")
    by_mean = set(select_marker_genes(ref, n_markers=1, marker_confidence=0.0))
    by_bound = set(select_marker_genes(ref, n_markers=1))
    assert by_mean == {0, 2, 3}
    assert by_bound == {1, 2, 3}


def test_a_signature_table_ranks_by_its_means(monkeypatch):
    """A table of means has no cells to measure the means' errors: the bound changes nothing."""
    monkeypatch.setattr(preprocess, "MIN_SHARED_GENES", 1)
    table = build_reference(_reference(), cell_type_key="cell_type").profiles
    ref = build_reference(table, is_means=True)
    assert set(select_marker_genes(ref, n_markers=1)) == set(
        select_marker_genes(ref, n_markers=1, marker_confidence=0.0)
    )
