"""Raw counts found where real files keep them, values that are not counts refused, genes
paired on other namings, and atlases subsampled per type and read row-wise from .h5ad.

The fixtures are the bundled demo turned into what real files hold: log-normalised the scanpy
way (normalize_total to 1e4, then log1p, written with numpy), raw counts in layers['counts'] or
in .raw, Ensembl ids with version suffixes, a cell-by-gene h5ad on disk."""

from __future__ import annotations

import tracemalloc

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from real_layouts import log_normalised, normalize_total, with_counts_in_layer, with_counts_in_raw
from scipy import sparse

from napari_stlnmf import io
from napari_stlnmf.errors import GeneMismatchError, NotRawCountsError
from napari_stlnmf.io.counts import describe_values, find_counts, subsample_per_type
from napari_stlnmf.preprocess import build_reference, match_gene_identifiers

KEY = "cell_type"


@pytest.fixture(scope="module")
def demo_pair():
    from napari_stlnmf.datasets import load_demo

    return load_demo()


# --------------------------------------------------------------------------- what values are


def test_describe_values_tells_counts_from_what_scanpy_leaves(demo_pair):
    slide, reference = demo_pair
    assert describe_values(slide.X) == "counts"  # float32 whole numbers are counts
    assert describe_values(slide.X.toarray().astype(np.int32)) == "counts"
    assert describe_values(log_normalised(slide.X)) == "log"
    assert describe_values(normalize_total(reference.X)) == "fixed_total"
    assert describe_values(normalize_total(reference.X, 1e6)) == "fixed_total"  # CPM
    jittered = slide.X.copy()
    jittered.data = jittered.data + 0.37  # expected or ambient-corrected counts
    assert describe_values(jittered) == "non_integer"
    scaled = slide.X.toarray() - slide.X.toarray().mean(0)
    assert describe_values(scaled) == "scaled"


@pytest.mark.parametrize("side", ["slide", "reference"])
def test_log_normalised_input_is_refused_with_the_fix(demo_pair, side):
    slide, reference = demo_pair
    adata = (slide if side == "slide" else reference).copy()
    adata.X = log_normalised(adata.X)
    check = (
        (lambda: io.validate_slide(adata))
        if side == "slide"
        else (lambda: build_reference(adata, cell_type_key=KEY))
    )
    with pytest.raises(NotRawCountsError, match=r"log-transformed.*layers\['counts'\].*\.raw"):
        check()


def test_fixed_total_slide_is_refused(demo_pair):
    slide = demo_pair[0].copy()
    slide.X = normalize_total(slide.X)
    with pytest.raises(NotRawCountsError, match="same total per row"):
        io.validate_slide(slide)


def test_non_integer_values_need_the_explicit_option(demo_pair):
    slide, reference = demo_pair
    jittered = slide.copy()
    jittered.X = jittered.X.copy()
    jittered.X.data = jittered.X.data + 0.37
    with pytest.raises(NotRawCountsError, match="allow_non_integer_slide=True"):
        io.validate_slide(jittered)
    assert io.validate_slide(jittered, allow_non_integer=True).kind == "non_integer"
    with pytest.raises(NotRawCountsError, match="log-transformed"):  # never, even allowed
        io.validate_slide(
            ad.AnnData(log_normalised(slide.X), obsm={"spatial": slide.obsm["spatial"]}),
            allow_non_integer=True,
        )

    # metacells: means of 10 cells of a type, as a reference of mean expression
    codes = reference.obs[KEY].cat.codes.to_numpy().astype(np.int64)
    group = codes * 1000 + np.arange(reference.n_obs) % 25
    means, labels = [], []
    for g in np.unique(group):
        rows = np.flatnonzero(group == g)
        means.append(np.asarray(reference.X[rows].mean(0)).ravel())
        labels.append(reference.obs[KEY].iloc[rows[0]])
    metacells = ad.AnnData(
        np.vstack(means).astype(np.float32),
        obs=pd.DataFrame(
            {KEY: pd.Categorical(labels)}, index=[f"m{i}" for i in range(len(labels))]
        ),
        var=reference.var.copy(),
    )
    with pytest.raises(NotRawCountsError, match="reference_is_means=True"):
        build_reference(metacells, cell_type_key=KEY)
    built = build_reference(metacells, cell_type_key=KEY, is_means=True)
    assert built.info["counts_source"] == "X"
    assert built.profiles.shape == (reference.n_vars, 8)


# --------------------------------------------------------------------------- where counts are


def test_counts_are_found_in_the_layer_and_in_raw_on_both_sides(demo_pair):
    slide, reference = demo_pair
    for adata in (slide, reference):
        layered = with_counts_in_layer(adata)
        before = layered.X.copy()
        found = find_counts(layered)
        assert found.source == "layers['counts']"
        assert found.matrix is layered.layers["counts"]  # the user's matrix, not a copy
        np.testing.assert_array_equal(layered.X.toarray(), before.toarray())  # untouched

        in_raw = with_counts_in_raw(adata)
        found = find_counts(in_raw)
        assert found.source == "raw.X"
        assert list(found.genes) == list(adata.var_names)  # .raw's genes, not X's 300
    layered = with_counts_in_layer(slide)
    assert io.validate_slide(layered).source == "layers['counts']"


def test_a_counts_layer_that_holds_no_counts_is_refused(demo_pair):
    slide = demo_pair[0].copy()
    slide.layers["counts"] = log_normalised(slide.X)  # X has counts, the layer claims to
    with pytest.raises(NotRawCountsError, match=r"layers\['counts'\] holds values that are log"):
        io.validate_slide(slide)


def test_reference_profiles_are_the_same_wherever_the_counts_are(demo_pair):
    reference = demo_pair[1]
    plain = build_reference(reference, cell_type_key=KEY)
    for variant, source in (
        (with_counts_in_layer(reference), "layers['counts']"),
        (with_counts_in_raw(reference), "raw.X"),
    ):
        built = build_reference(variant, cell_type_key=KEY)
        assert built.info["counts_source"] == source
        pd.testing.assert_frame_equal(built.profiles, plain.profiles)


# --------------------------------------------------------------------------- gene namings


def _ensembl(i: int) -> str:
    return f"ENSG{i:011d}"


def test_ensembl_versions_on_one_side_and_gene_ids_on_the_other(demo_reference):
    n = len(demo_reference.genes)
    slide_var = pd.DataFrame(index=[f"{_ensembl(i)}.{i % 7 + 1}" for i in range(n)])
    reference = demo_reference
    reference_ids = pd.DataFrame(
        {"gene_ids": [_ensembl(i) for i in range(n)]}, index=reference.genes
    )
    from dataclasses import replace

    with_ids = replace(reference, gene_ids=reference_ids)
    genes, report = match_gene_identifiers(slide_var, with_ids)
    assert report["slide"] == "var_names"
    assert report["reference"] == "var['gene_ids']"
    assert report["version_suffixes_stripped"] is True
    assert report["n_shared_genes"] == n
    assert list(genes) == list(reference.genes)  # renamed to the reference's names

    # CELLxGENE layout: Ensembl var names, symbols in var['feature_name']
    cxg_var = pd.DataFrame({"feature_name": list(reference.genes)}, index=reference_ids["gene_ids"])
    genes, report = match_gene_identifiers(cxg_var, reference)
    assert (report["slide"], report["reference"]) == ("var['feature_name']", "var_names")
    assert list(genes) == list(reference.genes)

    # plain symbols on both sides: names are passed through unchanged
    genes, report = match_gene_identifiers(pd.DataFrame(index=reference.genes), with_ids)
    assert (report["slide"], report["reference"], report["n_shared_genes"]) == (
        "var_names",
        "var_names",
        n,
    )


def test_too_few_shared_genes_say_what_was_tried(demo_reference):
    slide_var = pd.DataFrame(
        {"gene_ids": [f"X{i}" for i in range(50)]}, index=[_ensembl(i) for i in range(50)]
    )
    with pytest.raises(GeneMismatchError, match=r"Ensembl.*gene_ids.*Also tried slide"):
        match_gene_identifiers(slide_var, demo_reference)


def test_unmatched_genes_cannot_collide_with_matched_ones(demo_reference):
    genes = list(demo_reference.genes)
    ids = [_ensembl(i) for i in range(len(genes))]
    # slide: Ensembl var names; its gene symbols column is partly shuffled, so symbols pair
    # fewer genes than ids do, and unmatched slide genes keep symbol-like names
    slide_var = pd.DataFrame(index=[*ids[:-5], *genes[-5:]])
    from dataclasses import replace

    reference = replace(
        demo_reference, gene_ids=pd.DataFrame({"gene_id": ids}, index=demo_reference.genes)
    )
    renamed, report = match_gene_identifiers(slide_var, reference)
    assert report["reference"] == "var['gene_id']"
    assert renamed.is_unique
    assert list(renamed[:-5]) == genes[:-5]


# --------------------------------------------------------------------------- atlases


def test_subsampling_is_seeded_capped_and_keeps_every_type():
    labels = pd.Series(np.repeat(["a", "b", "c"], [5000, 30, 700]))
    labels.iloc[[3, 4000]] = None
    first = subsample_per_type(labels, 100, seed=1)
    np.testing.assert_array_equal(first, subsample_per_type(labels, 100, seed=1))
    assert not np.array_equal(first, subsample_per_type(labels, 100, seed=2))
    kept = labels.iloc[first]
    assert kept.value_counts().to_dict() == {"a": 100, "c": 100, "b": 30}
    assert kept.isna().sum() == 2  # unlabelled cells are left to the builder, which warns
    assert np.all(np.diff(first) > 0)
    np.testing.assert_array_equal(subsample_per_type(labels, 10**6), np.arange(len(labels)))
    np.testing.assert_array_equal(subsample_per_type(labels, None), np.arange(len(labels)))


def test_build_reference_with_a_cap(demo_pair):
    reference = demo_pair[1]
    capped = build_reference(reference, cell_type_key=KEY, max_cells_per_type=40, seed=3)
    again = build_reference(reference, cell_type_key=KEY, max_cells_per_type=40, seed=3)
    assert capped.info["n_cells_kept"] == 8 * 40 and capped.info["n_cells"] == reference.n_obs
    assert capped.cell_types == build_reference(reference, cell_type_key=KEY).cell_types
    pd.testing.assert_frame_equal(capped.profiles, again.profiles)
    assert np.bincount(capped.cell_labels).tolist() == [40] * 8


@pytest.mark.parametrize("layout", ["X", "layer", "raw"])
def test_h5ad_read_for_the_kept_cells_matches_in_memory(demo_pair, tmp_path, layout):
    reference = demo_pair[1]
    stored = {
        "X": reference,
        "layer": with_counts_in_layer(reference),
        "raw": with_counts_in_raw(reference),
    }[layout]
    path = tmp_path / "reference.h5ad"
    stored.write_h5ad(path)

    whole = io.read_reference(path, cell_type_key=KEY, max_cells_per_type=10**6)
    assert whole.n_obs == reference.n_obs
    pd.testing.assert_frame_equal(
        build_reference(whole, cell_type_key=KEY).profiles,
        build_reference(reference, cell_type_key=KEY).profiles,
    )
    part = io.read_reference(path, cell_type_key=KEY, max_cells_per_type=30, seed=5)
    assert part.n_obs == 8 * 30
    pd.testing.assert_frame_equal(
        build_reference(part, cell_type_key=KEY, max_cells_per_type=30, seed=5).profiles,
        build_reference(stored, cell_type_key=KEY, max_cells_per_type=30, seed=5).profiles,
    )


def test_h5ad_reading_memory_grows_with_the_cells_kept(tmp_path):
    rng = np.random.default_rng(0)
    n_cells, n_genes = 40_000, 500
    X = sparse.random(n_cells, n_genes, density=0.2, random_state=0, format="csr")
    X.data = rng.integers(1, 20, X.data.size).astype(np.float32)
    atlas = ad.AnnData(
        X.astype(np.float32),
        obs=pd.DataFrame(
            {KEY: pd.Categorical(rng.choice(list("abcd"), n_cells))},
            index=[f"c{i}" for i in range(n_cells)],
        ),
        var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]),
    )
    path = tmp_path / "atlas.h5ad"
    atlas.write_h5ad(path)
    stored_bytes = atlas.X.data.nbytes + atlas.X.indices.nbytes
    del atlas, X
    tracemalloc.start()
    part = io.read_reference(path, cell_type_key=KEY, max_cells_per_type=200)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert part.n_obs == 800
    assert peak < stored_bytes / 4, (peak, stored_bytes)
