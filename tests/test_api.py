"""End to end: accuracy on the demo slide, outputs, reproducibility, bad input, CLI."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from napari_stlnmf import Cancelled, deconvolve
from napari_stlnmf._constants import PROPORTIONS_KEY, UNS_KEY
from napari_stlnmf.baselines import nnls_proportions
from napari_stlnmf.errors import (
    CellTypeKeyError,
    CoordinateError,
    DuplicateNamesError,
    EmptyCellTypeError,
    GeneMismatchError,
    InvalidCountsError,
    NotRawCountsError,
    StlnmfError,
)
from napari_stlnmf.metrics import mean_jensen_shannon, rmse

KEY = "cell_type"


def _truth(slide):
    return slide.obsm["true_proportions"]


def test_trained_unrolled_beats_nnls_and_never_loses_to_untrained(demo, trained_demo_result):
    slide, reference = demo
    truth = _truth(slide)
    ours = trained_demo_result.proportions[truth.columns].to_numpy()
    nnls = nnls_proportions(slide, reference, cell_type_key=KEY)[truth.columns].to_numpy()
    untrained = (
        deconvolve(slide, reference, cell_type_key=KEY, train=False)
        .proportions[truth.columns]
        .to_numpy()
    )
    r_ours, r_nnls, r_untrained = rmse(ours, truth), rmse(nnls, truth), rmse(untrained, truth)
    assert r_ours < 0.85 * r_nnls, (r_ours, r_nnls)
    # training keeps the shipped parameters unless validation improves by > 5 %
    assert r_ours <= r_untrained + 1e-9, (r_ours, r_untrained)
    assert mean_jensen_shannon(ours, truth) < mean_jensen_shannon(nnls, truth)
    info = trained_demo_result.info["train"]
    assert info["val_rmse"] <= info["val_rmse_initial"]


def test_training_improves_on_hand_set_parameters(demo, tmp_path):
    """From the hand-set starting values (not the shipped, already tuned ones) training on
    slides simulated on the demo's layout lowers validation error, and the demo's true error."""
    from napari_stlnmf.model import DEFAULTS, UnrolledNMF

    slide, reference = demo
    truth = _truth(slide)
    start = tmp_path / "hand_set.pt"
    UnrolledNMF(1, 1, omega=DEFAULTS.omega_start).save(start, extra={"gene_weighting": "nb"})
    before = deconvolve(slide, reference, cell_type_key=KEY, params=start, train=False, seed=0)
    after = deconvolve(slide, reference, cell_type_key=KEY, params=start, train=True, seed=0)
    assert after.info["train"]["val_rmse"] < 0.95 * after.info["train"]["val_rmse_initial"]
    r_before = rmse(before.proportions[truth.columns].to_numpy(), truth)
    r_after = rmse(after.proportions[truth.columns].to_numpy(), truth)
    assert r_after < 0.95 * r_before, (r_after, r_before)


def test_result_layout_and_anndata_copy(demo, trained_demo_result):
    slide, _ = demo
    res = trained_demo_result
    assert list(res.proportions.index) == list(slide.obs_names)
    props = res.proportions.to_numpy()
    assert np.isfinite(props).all() and (props >= 0).all()
    np.testing.assert_allclose(props.sum(1), 1.0, atol=1e-9)
    np.testing.assert_allclose(res.mrna_fractions.sum(1), 1.0, atol=1e-9)
    assert (res.fit_error >= 0).all() and (res.fit_error < 1).all()
    out = res.adata
    assert out is not slide
    pd.testing.assert_frame_equal(out.obsm[PROPORTIONS_KEY], res.proportions)
    assert PROPORTIONS_KEY not in slide.obsm and UNS_KEY not in slide.uns  # input untouched
    uns = out.uns[UNS_KEY]
    assert uns["fractions"] == "cell" and len(uns["genes"]) == uns["n_genes_used"]
    assert uns["graph"]["features"] == "image"


def test_result_h5ad_roundtrip(tmp_path, trained_demo_result):
    path = tmp_path / "r.h5ad"
    trained_demo_result.adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    np.testing.assert_allclose(
        back.obsm[PROPORTIONS_KEY].to_numpy(), trained_demo_result.proportions.to_numpy()
    )


def test_saved_model_reused_without_training(demo, trained_demo):
    """Train once, save, reuse: the saved model gives the trained maps again without training
    (what a lab does for several slides with one reference)."""
    slide, reference = demo
    trained, path = trained_demo
    assert path.exists()
    reused = deconvolve(slide, reference, cell_type_key=KEY, params=path, train=False, seed=0)
    assert reused.info["train"] is None
    assert reused.info["gene_weighting"] == trained.info["gene_weighting"]  # kept with the model
    assert reused.info["params"] == trained.info["params"]
    np.testing.assert_allclose(
        reused.proportions.to_numpy(), trained.proportions.to_numpy(), atol=1e-5
    )


def test_same_seed_same_output(demo):
    slide, reference = demo
    kw = {"cell_type_key": KEY, "train": True, "train_epochs": 3, "n_train_slides": 3}
    a = deconvolve(slide, reference, seed=1, **kw).proportions
    b = deconvolve(slide, reference, seed=1, **kw).proportions
    pd.testing.assert_frame_equal(a, b)


def test_cell_and_mrna_fractions_differ_by_content(demo):
    slide, reference = demo
    res = deconvolve(
        slide, reference, cell_type_key=KEY, train=False, fractions="mrna", min_proportion=0
    )
    assert res.info["fractions"] == "mrna"
    pd.testing.assert_frame_equal(res.proportions, res.mrna_fractions)
    # types with more mRNA per cell take a larger share of mRNA than of cells
    content = (
        pd.Series(np.asarray(reference.X.sum(1)).ravel(), index=reference.obs[KEY].values)
        .groupby(level=0, observed=True)
        .mean()
    )
    big, small = content.idxmax(), content.idxmin()
    ratio = (res.mrna_fractions / res.cell_fractions).mean()
    assert ratio[big] > ratio[small]


def test_classic_method_runs(demo):
    slide, reference = demo
    res = deconvolve(slide, reference, cell_type_key=KEY, method="classic")
    assert rmse(res.proportions[_truth(slide).columns], _truth(slide)) < 0.08


def test_progress_and_cancel(demo):
    slide, reference = demo
    stages = []
    deconvolve(
        slide,
        reference,
        cell_type_key=KEY,
        train=True,
        train_epochs=2,
        n_train_slides=2,
        progress=lambda s, i, n: stages.append(s),
    )
    for stage in ("preparing", "graph", "training", "deconvolving", "done"):
        assert stage in stages
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Cancelled):
        deconvolve(slide, reference, cell_type_key=KEY, train=True, should_stop=stop)


def test_empty_spots_get_nan_and_flag(demo):
    slide, reference = demo
    s = slide.copy()
    X = s.X.tolil()
    X[[0, 5], :] = 0
    s.X = X.tocsr()
    with pytest.warns(UserWarning, match="2 spot"):
        res = deconvolve(s, reference, cell_type_key=KEY, train=False)
    assert res.proportions.iloc[[0, 5]].isna().all().all()
    assert list(res.qc.iloc[[0, 5]]) == ["no counts", "no counts"]
    assert res.proportions.drop(index=s.obs_names[[0, 5]]).notna().all().all()
    assert len(res.proportions) == s.n_obs


def _copy_slide(slide):
    return ad.AnnData(
        X=slide.X.copy(),
        obs=slide.obs.copy(),
        var=slide.var.copy(),
        obsm={"spatial": slide.obsm["spatial"].copy()},
    )


@pytest.mark.filterwarnings("ignore:.*names are not unique")
def test_bad_inputs_raise_clear_errors(demo):
    slide, reference = demo
    small = _copy_slide(slide)

    with pytest.raises(CellTypeKeyError, match="cell_type"):
        deconvolve(small, reference, cell_type_key="celltype", train=False)
    with pytest.raises(CellTypeKeyError):
        deconvolve(small, reference, train=False)

    renamed = small.copy()
    renamed.var_names = [f"ENSG{i:011d}" for i in range(renamed.n_vars)]
    with pytest.raises(GeneMismatchError, match="Ensembl"):
        deconvolve(renamed, reference, cell_type_key=KEY, train=False)
    lower = small.copy()
    lower.var_names = [g.lower() for g in lower.var_names]
    with pytest.raises(GeneMismatchError, match="case"):
        deconvolve(lower, reference, cell_type_key=KEY, train=False)
    assert (
        deconvolve(lower, reference, cell_type_key=KEY, train=False, case_insensitive=True)
        .proportions.notna()
        .all()
        .all()
    )

    dup = small.copy()
    dup.obs_names = ["same"] * dup.n_obs
    with pytest.raises(DuplicateNamesError, match="barcode|spot"):
        deconvolve(dup, reference, cell_type_key=KEY, train=False)

    neg = small.copy()
    neg.X = neg.X.toarray()
    neg.X[3, 4] = -1
    with pytest.raises(InvalidCountsError, match="negative"):
        deconvolve(neg, reference, cell_type_key=KEY, train=False)
    nan = small.copy()
    nan.X = nan.X.toarray()
    nan.X[3, 4] = np.nan
    with pytest.raises(InvalidCountsError, match="NaN"):
        deconvolve(nan, reference, cell_type_key=KEY, train=False)

    nocoord = small.copy()
    del nocoord.obsm["spatial"]
    with pytest.raises(CoordinateError, match="spatial"):
        deconvolve(nocoord, reference, cell_type_key=KEY, train=False)

    ref_empty = reference.copy()
    ref_empty.obs[KEY] = ref_empty.obs[KEY].cat.add_categories(["ghost"])
    with pytest.raises(EmptyCellTypeError, match="ghost"):
        deconvolve(small, ref_empty, cell_type_key=KEY, train=False)

    sig = pd.DataFrame(np.ones((small.n_vars, 2)), index=small.var_names, columns=["a", "b"])
    sig["b"] = 0.0
    with pytest.raises(EmptyCellTypeError, match="b"):
        deconvolve(small, sig, train=False)


def test_image_not_covering_spots_is_reported(demo):
    from napari_stlnmf.errors import ImageMismatchError

    slide, reference = demo
    wrong = slide.copy()
    lib = next(iter(wrong.uns["spatial"]))
    wrong.uns["spatial"][lib]["scalefactors"]["tissue_hires_scalef"] = (
        1.0  # full-res coords on a small image
    )
    with pytest.raises(ImageMismatchError, match="scale"):
        deconvolve(wrong, reference, cell_type_key=KEY, train=False)
    # the distance-only graph does not need the image
    assert (
        deconvolve(wrong, reference, cell_type_key=KEY, train=False, use_image=False).info["graph"][
            "features"
        ]
        == "none"
    )


def test_user_objects_not_modified(demo):
    slide, reference = demo
    s, r = _copy_slide(slide), reference.copy()
    X0, obs0, ref0 = s.X.copy(), s.obs.copy(), r.X.copy()
    deconvolve(s, r, cell_type_key=KEY, train=True, train_epochs=2, n_train_slides=2)
    assert (s.X != X0).nnz == 0 and (r.X != ref0).nnz == 0
    pd.testing.assert_frame_equal(s.obs, obs0)
    assert list(s.obsm.keys()) == ["spatial"] and not s.uns


def test_signature_reference_on_the_papers_grid():
    """A genes x types signature table as reference, on the original paper's square grid
    (its noiseless counts given Poisson noise at 2,000 counts per spot)."""
    from conftest import shared_dir

    folder = shared_dir("synthetic_square_2x2")
    counts = pd.read_csv(folder / "counts.csv.gz", index_col=0)
    coords = pd.read_csv(folder / "coords.csv", index_col=0)
    sig = pd.read_csv(folder / "reference_signature.csv", index_col=0)
    truth = pd.read_csv(folder / "truth_proportions.csv", index_col=0)
    X = counts.to_numpy()
    X = np.random.default_rng(0).poisson(X / X.sum(1, keepdims=True) * 2000).astype(np.float32)
    slide = ad.AnnData(
        X=sp.csr_matrix(X),
        obs=pd.DataFrame(index=counts.index),
        var=pd.DataFrame(index=counts.columns),
    )
    slide.obsm["spatial"] = coords[["x", "y"]].to_numpy(float)
    res = deconvolve(slide, sig, train=False, fractions="mrna")
    est = res.proportions[truth.columns].to_numpy()
    nnls = nnls_proportions(slide, sig)[truth.columns].to_numpy()
    assert rmse(est, truth) < rmse(nnls, truth)
    assert mean_jensen_shannon(est, truth) < mean_jensen_shannon(nnls, truth)


def test_cli_run_and_demo(tmp_path, demo, capsys):
    from napari_stlnmf.cli import main

    slide, reference = demo
    sp_path, ref_path = tmp_path / "slide.h5ad", tmp_path / "ref.h5ad"
    slide.write_h5ad(sp_path)
    reference.write_h5ad(ref_path)
    out = tmp_path / "out"
    code = main(
        [
            "run",
            "--slide",
            str(sp_path),
            "--reference",
            str(ref_path),
            "--cell-type-key",
            KEY,
            "--out",
            str(out),
            "--train",
            "--epochs",
            "2",
            "--quiet",
        ]
    )
    printed = capsys.readouterr().out
    assert (
        code == 0
        and "training: validation RMSE" in printed
        and "effective cells per spot" in printed
    )
    props = pd.read_csv(out / "proportions.csv", index_col=0)
    assert list(props.index) == list(slide.obs_names)
    assert (out / "result.h5ad").exists()
    maps = sorted(p.name for p in out.glob("map_*.png"))
    assert len(maps) == len(props.columns) + 1
    assert ad.read_h5ad(out / "result.h5ad").uns[UNS_KEY]["gene_weighting"] == "nb"
    code = main(
        [
            "run",
            "--slide",
            str(sp_path),
            "--reference",
            str(ref_path),
            "--cell-type-key",
            KEY,
            "--out",
            str(tmp_path / "sqrt"),
            "--no-train",
            "--weighting",
            "sqrt",
            "--min-proportion",
            "0.1",
            "--quiet",
        ]
    )
    uns = ad.read_h5ad(tmp_path / "sqrt" / "result.h5ad").uns[UNS_KEY]
    assert code == 0 and uns["gene_weighting"] == "sqrt" and uns["min_proportion"] == 0.1
    code = main(
        [
            "run",
            "--slide",
            str(sp_path),
            "--reference",
            str(ref_path),
            "--cell-type-key",
            "nope",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 2 and "nope" in capsys.readouterr().err


def test_fitted_gene_weights_follow_the_slides_noise(demo, trained_demo_result):
    """Training weighs genes by 1/sd measured on the slide: a gene made noisy on the slide
    loses weight; with Poisson noise only, the weights are the 1/sqrt(mean) ones."""
    from napari_stlnmf.preprocess import (
        build_reference,
        fitted_gene_weights,
        gene_weights_for,
        prepare,
    )

    slide, reference = demo
    ref = build_reference(reference, cell_type_key=KEY)
    prep = prepare(slide.X, slide.var_names, ref)
    V = slide.obsm["true_mrna_fractions"][prep.cell_types].to_numpy()[prep.spot_mask]
    gene_share = prep.gene_share / prep.gene_share.sum()
    V = (
        V * gene_share / (V * gene_share).sum(1, keepdims=True)
    )  # mRNA shares within the model's genes
    before = fitted_gene_weights(prep.X, prep.library_size, prep.B, V)

    j = int(np.argmax(prep.B.mean(1)))  # a well-expressed gene, made unreliable on the slide
    col = slide.var_names.get_loc(prep.genes[j])
    counts = sp.csr_matrix(slide.X, dtype=np.float32, copy=True).tolil()
    rng = np.random.default_rng(0)
    counts[:, col] = np.round(
        counts[:, col].toarray() * rng.lognormal(0, 1.0, size=(slide.n_obs, 1))
    )
    noisy = prepare(counts.tocsr(), slide.var_names, ref, genes=list(prep.genes))
    after = fitted_gene_weights(noisy.X, noisy.library_size, noisy.B, V)
    others = np.arange(len(before)) != j
    assert after[j] / after[others].mean() < 0.5 * before[j] / before[others].mean()

    mu = V @ prep.B.T * prep.library_size[:, None]
    poisson = rng.poisson(mu).astype(np.float32)
    pois = prepare(poisson, prep.genes, ref, genes=list(prep.genes))
    fitted = fitted_gene_weights(pois.X, pois.library_size, pois.B, V[pois.spot_mask])
    sqrt = gene_weights_for(pois.B, "sqrt")
    assert np.corrcoef(np.log(fitted), np.log(sqrt))[0, 1] > 0.99  # 0.977 on the real demo slide


def test_per_entry_weights_beat_gene_weights_on_mrna_fractions(demo, trained_demo_result):
    """Training defaults to per-entry negative-binomial weights (overdispersion measured on the
    slide: its spots sum single cells, so φ > 0); they estimate the demo's mRNA fractions better
    than one fitted weight per gene, trained the same way, without losing on cell fractions."""
    slide, reference = demo
    res = trained_demo_result
    assert res.info["gene_weighting"] == "nb" and res.info["overdispersion"] > 0
    assert res.info["params"]["refresh_layers"]
    per_gene = deconvolve(
        slide, reference, cell_type_key=KEY, gene_weighting="fitted", train=True, seed=0
    )
    mrna_truth = slide.obsm["true_mrna_fractions"]
    cols = list(mrna_truth.columns)
    r_entry = rmse(res.mrna_fractions[cols].to_numpy(), mrna_truth)
    r_gene = rmse(per_gene.mrna_fractions[cols].to_numpy(), mrna_truth)
    assert r_entry < 0.95 * r_gene, (r_entry, r_gene)
    truth = _truth(slide)
    assert rmse(res.proportions[truth.columns].to_numpy(), truth) <= rmse(
        per_gene.proportions[truth.columns].to_numpy(), truth
    )
    with pytest.raises(StlnmfError, match="unrolled"):
        deconvolve(slide, reference, cell_type_key=KEY, method="classic", gene_weighting="nb")


def test_compact_gram_matrices_give_the_same_maps(demo):
    """Past the float32 limit the per-spot Gram matrices are kept as bfloat16 upper triangles
    (10^6 bins x 50 types: 2.6 GB instead of 10 GB): the maps hardly move."""
    from napari_stlnmf.api import DeconvolutionSettings, run_deconvolution
    from napari_stlnmf.model import gram_bytes

    slide, reference = demo
    full = deconvolve(slide, reference, cell_type_key=KEY)
    assert full.info["train"] is None  # the default run uses the shipped parameters, no fine-tuning
    n, p = slide.n_obs, full.proportions.shape[1]
    limit = (gram_bytes(n, p) + gram_bytes(n, p, compact=True)) // 2
    settings = DeconvolutionSettings(max_gram_bytes=limit)
    compact = run_deconvolution(slide, reference, settings, cell_type_key=KEY)
    assert (
        full.info["gram_storage"] == "float32"
        and compact.info["gram_storage"] == "bfloat16 upper triangles"
    )
    assert np.abs(full.mrna_fractions.to_numpy() - compact.mrna_fractions.to_numpy()).mean() < 0.002
    truth = _truth(slide)
    r_full = rmse(full.proportions[truth.columns].to_numpy(), truth)
    r_compact = rmse(compact.proportions[truth.columns].to_numpy(), truth)
    assert abs(r_compact - r_full) < 0.01 * r_full, (r_compact, r_full)


def test_per_entry_weights_fall_back_when_their_gram_matrices_would_not_fit(demo):
    """Per-spot Gram matrices are spots x types² floats: past the limit even as bfloat16 upper
    triangles the default falls back to one weight per gene with a warning; asking for 'nb'
    explicitly fails with the sizes and the way out."""
    from napari_stlnmf.api import DeconvolutionSettings, run_deconvolution

    slide, reference = demo
    small = DeconvolutionSettings(max_gram_bytes=1024)
    with pytest.warns(RuntimeWarning, match="per-entry weights need"):
        res = run_deconvolution(slide, reference, small, cell_type_key=KEY)
    assert res.info["gene_weighting"] == "sqrt" and res.info["overdispersion"] is None
    assert np.isfinite(res.proportions.to_numpy()).all()
    explicit = DeconvolutionSettings(max_gram_bytes=1024, gene_weighting="nb")
    with pytest.raises(StlnmfError, match="gene_weighting='fitted'"):
        run_deconvolution(slide, reference, explicit, cell_type_key=KEY)


def test_platform_refinement_reads_the_effect_without_absent_types(demo, demo_reference):
    """A shallow slide with a per-gene platform effect: the quick fit leaves a little of every
    absent type in each spot, and read off the slide totals that excess looks like a platform
    effect on those types' genes. Refining the factors on a fit with small proportions zeroed
    brings the mRNA fractions (and cell fractions) closer to the truth."""
    from napari_stlnmf.api import DeconvolutionSettings, run_deconvolution
    from napari_stlnmf.calibration import PLATFORM_REFINE_PASSES
    from napari_stlnmf.datasets import hex_layout
    from napari_stlnmf.simulate import simulate_slide

    _, reference = demo
    xy = hex_layout(22, 22, pitch=100.0)
    sim = simulate_slide(
        xy,
        demo_reference,
        kind="regions",
        library_sizes=np.array([1000.0]),
        platform_sigma=0.3,
        seed=102,
    )
    slide = ad.AnnData(X=sp.csr_matrix(sim.counts), var=pd.DataFrame(index=demo_reference.genes))
    slide.obsm["spatial"] = xy
    errors = {}
    for passes in (0, PLATFORM_REFINE_PASSES):
        settings = DeconvolutionSettings(platform_refine_passes=passes)
        res = run_deconvolution(slide, reference, settings, cell_type_key=KEY)
        cols = demo_reference.cell_types
        errors[passes] = (
            rmse(res.mrna_fractions[cols].to_numpy(), sim.mrna_fractions),
            rmse(res.cell_fractions[cols].to_numpy(), sim.cell_fractions),
        )
    before, after = errors[0], errors[PLATFORM_REFINE_PASSES]
    assert after[0] < 0.9 * before[0], errors
    assert after[1] < before[1], errors


def test_auto_threshold_reads_cells_per_spot_off_the_noise(demo, demo_reference):
    """Spots of one or two cells (Visium HD bins) show nearly single cells' overdispersion:
    the effective cell count read off the noise is small there, and the 'auto' threshold zeroes
    the noise spread over absent types (lower RMSE and JSD than the fixed 0.05); spots of ~10
    cells keep 0.05."""
    from napari_stlnmf.datasets import hex_layout
    from napari_stlnmf.simulate import simulate_slide

    _, reference = demo
    xy = hex_layout(22, 22, pitch=100.0)
    cols = demo_reference.cell_types
    found = {}
    for mean_cells, depth in ((1.2, 300.0), (10.0, 3000.0)):
        sim = simulate_slide(
            xy,
            demo_reference,
            kind="regions",
            library_sizes=np.array([depth]),
            mean_cells=mean_cells,
            platform_sigma=0.2,
            seed=7,
        )
        slide = ad.AnnData(
            X=sp.csr_matrix(sim.counts), var=pd.DataFrame(index=demo_reference.genes)
        )
        slide.obsm["spatial"] = xy
        auto = deconvolve(slide, reference, cell_type_key=KEY)
        fixed = deconvolve(slide, reference, cell_type_key=KEY, min_proportion=0.05)
        found[mean_cells] = auto.info["cells_per_spot"], auto.info["min_proportion"]
        if mean_cells < 2:
            truth = sim.cell_fractions
            est_auto, est_fixed = (
                auto.cell_fractions[cols].to_numpy(),
                fixed.cell_fractions[cols].to_numpy(),
            )
            assert rmse(est_auto, truth) < 0.85 * rmse(est_fixed, truth)
            assert mean_jensen_shannon(est_auto, truth) < 0.6 * mean_jensen_shannon(
                est_fixed, truth
            )
        else:
            np.testing.assert_array_equal(
                auto.cell_fractions.to_numpy(), fixed.cell_fractions.to_numpy()
            )
    (n_few, t_few), (n_many, t_many) = found[1.2], found[10.0]
    assert 0.7 < n_few < 1.8 and t_few >= 0.08, found
    assert n_many > 3 and t_many == 0.05, found


def test_auto_threshold_needs_single_cells_and_raw_counts(demo):
    """A signature table gives no single cells to compare the slide's noise with, and scaled
    counts have no Poisson part to subtract: 0.05 in both cases. Scaled counts are refused
    unless allow_non_integer_slide says they are meant."""
    slide, reference = demo
    from napari_stlnmf.preprocess import build_reference

    signature = build_reference(reference, cell_type_key=KEY).profiles
    res = deconvolve(slide, signature)
    assert res.info["cells_per_spot"] is None and res.info["min_proportion"] == 0.05
    scaled = _copy_slide(slide)
    scaled.X = scaled.X * 6.6
    with pytest.raises(NotRawCountsError, match="allow_non_integer_slide"):
        deconvolve(scaled, reference, cell_type_key=KEY)
    res = deconvolve(scaled, reference, cell_type_key=KEY, allow_non_integer_slide=True)
    assert res.info["cells_per_spot"] is None and res.info["min_proportion"] == 0.05
    assert deconvolve(slide, reference, cell_type_key=KEY).info["cells_per_spot"] > 2
    with pytest.raises(StlnmfError, match="min_proportion"):
        deconvolve(slide, reference, cell_type_key=KEY, min_proportion="often")


def test_cell_fraction_head_lowers_cell_error_and_leaves_mrna_alone(demo, tmp_path):
    """The shipped parameters smooth cell fractions (not mRNA fractions) over the graph: without
    that head (a copy of the file with α = 0) the demo's mRNA fractions are the same and its
    cell fractions further from the truth."""
    import torch

    from napari_stlnmf.api import default_params_path

    slide, reference = demo
    blob = torch.load(default_params_path(), weights_only=True)
    assert float(blob["state"]["log_cell_smoothing"].exp()) > 0.05  # the shipped file has a head
    blob["state"]["log_cell_smoothing"] = torch.tensor(-30.0)
    torch.save(blob, tmp_path / "no_head.pt")
    with_head = deconvolve(slide, reference, cell_type_key=KEY)
    without = deconvolve(slide, reference, cell_type_key=KEY, params=tmp_path / "no_head.pt")
    np.testing.assert_allclose(
        with_head.mrna_fractions.to_numpy(), without.mrna_fractions.to_numpy(), atol=1e-6
    )
    truth = _truth(slide)
    err = {
        name: rmse(r.cell_fractions[truth.columns].to_numpy(), truth.to_numpy())
        for name, r in (("with", with_head), ("without", without))
    }
    assert err["with"] < 0.98 * err["without"], err


def test_stages_reported_in_order_and_named_for_people(demo):
    from napari_stlnmf.progress import Stage

    slide, reference = demo
    seen = []
    deconvolve(slide, reference, cell_type_key=KEY, progress=lambda s, i, n: seen.append(s))
    order = list(dict.fromkeys(seen))
    assert order == [
        Stage.READING,
        Stage.PREPARING,
        Stage.GRAPH,
        Stage.PLATFORM,
        Stage.DECONVOLVING,
        Stage.DONE,
    ]
    assert all(isinstance(s, Stage) for s in seen) and seen[0] == "reading"  # str-compatible
    assert {s.label for s in Stage} and Stage.TRAINING.label == "Training on simulated slides"
