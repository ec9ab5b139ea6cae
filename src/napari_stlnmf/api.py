"""One call from a slide and a reference to cell-type proportions: :func:`deconvolve`."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import __version__
from ._constants import (
    FIT_ERROR_KEY,
    MRNA_FRACTIONS_KEY,
    PROPORTIONS_KEY,
    QC_KEY,
    SPATIAL_KEY,
    UNS_KEY,
)
from .errors import StlnmfError
from .graph import SpatialGraph, build_graph, region_features, spot_image_features
from .model import (
    DEFAULTS,
    REFRESH_LAYERS,
    EntryNoise,
    UnrolledNMF,
    finalize_proportions,
    gram_bytes,
    pick_device,
    solve,
    to_cell_fractions,
)
from .preprocess import (
    Prepared,
    Reference,
    build_reference,
    fitted_gene_scale,
    prepare,
    with_platform_effect,
)
from .train import (
    Cancelled,
    _overdispersion,
    _sample_rows,
    calibrated_noise_ranges,
    estimate_noise,
    estimate_platform_effect,
    make_training_slides,
    reference_overdispersion,
    train_unrolled,
)

NOISE_SAMPLE_SPOTS = 5000  # spots used to measure the slide's noise before training
MAX_GRAM_BYTES = (
    4 * 2**30
)  # per-entry weights' per-spot Gram matrices (float32, else compact bfloat16)

__all__ = ["Cancelled", "DeconvolutionResult", "deconvolve", "default_params_path"]


def default_params_path() -> Path:
    """Parameters shipped with the package (λ's and σ's learned on simulated slides)."""
    return Path(__file__).parent / "data" / "default_params.pt"


@dataclass
class DeconvolutionResult:
    """What :func:`deconvolve` returns.

    Attributes
    ----------
    proportions
        spots x cell types, one row per input spot (NaN where a spot got no estimate),
        rows sum to one. Cell fractions unless ``fractions='mrna'`` was asked.
    cell_fractions, mrna_fractions
        Both conversions: share of the spot's *cells* and of its *mRNA* per type.
    fit_error
        Per-spot relative reconstruction error ``||g(x - B v)|| / ||g x||`` (high where the
        reference misses a cell type present in the tissue).
    qc
        ``"ok"`` or why a spot has no estimate.
    adata
        For AnnData input: a copy of the slide with the results in ``obsm``/``obs``/``uns``.
    """

    proportions: pd.DataFrame
    cell_fractions: pd.DataFrame
    mrna_fractions: pd.DataFrame
    fit_error: pd.Series
    qc: pd.Series
    info: dict = field(default_factory=dict)
    adata: object | None = None
    model: UnrolledNMF | None = None


def _report(progress, stage, i, n):
    if progress is not None:
        progress(stage, i, n)


def _check_stop(should_stop):
    if should_stop is not None and should_stop():
        raise Cancelled("deconvolution cancelled")


def _as_adata(slide, coords):
    import anndata as ad

    from . import io

    if isinstance(slide, (str, Path)):
        return io.read_slide(slide, coords=coords) if coords is not None else io.read_slide(slide)
    if isinstance(slide, ad.AnnData):
        return slide
    raise StlnmfError(
        f"slide must be an AnnData or a path (.h5ad, Space Ranger outs/ folder, counts CSV), "
        f"not {type(slide).__name__}"
    )


def _as_reference(reference, cell_type_key) -> Reference:
    from . import io

    if isinstance(reference, Reference):
        return reference
    if isinstance(reference, (str, Path)):
        reference = io.read_reference(reference, cell_type_key=cell_type_key)
    io.validate_reference(reference, cell_type_key=cell_type_key)
    return build_reference(reference, cell_type_key=cell_type_key)


def slide_features(adata, mask, *, library_id=None, use_image=True, region_key=None):
    """Per-spot features for the graph: region labels, else the image under each spot."""
    from . import io

    if region_key is not None:
        if region_key not in adata.obs:
            raise StlnmfError(f"region_key {region_key!r} is not a column of slide.obs")
        return region_features(adata.obs[region_key].astype(str).to_numpy()[mask]), "regions"
    if not use_image:
        return None, "none"
    found = io.get_image(adata, library_id=library_id)
    if found is None:
        return None, "none"
    io.check_image_covers_spots(adata, library_id=library_id)
    image, scalef, _ = found
    xy = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)[mask, :2] * scalef
    # Window radius in image pixels: half the stored spot diameter; without one (or under a
    # pixel) half the spot spacing of these spots, not io.spot_diameter's 0.55 estimate:
    # the shipped parameters were learned on features taken this way.
    diameter = io.spot_diameter(adata, library_id, estimate=False)
    radius = 0.5 * diameter * scalef if diameter else None
    if not radius or radius < 1:
        from .graph import spot_spacing

        radius = max(0.5 * spot_spacing(xy), 1.0)
    return spot_image_features(image, xy, radius), "image"


def deconvolve(
    slide,
    reference,
    *,
    cell_type_key: str | None = None,
    coords=None,
    library_id: str | None = None,
    method: str = "unrolled",
    train: bool = False,
    params: str | Path | None = None,
    n_layers: int | None = None,
    tied: bool = False,
    train_epochs: int = 60,
    n_train_slides: int = 10,
    use_image: bool = True,
    region_key: str | None = None,
    n_neighbors: int = 6,
    n_markers: int = 100,
    case_insensitive: bool = False,
    gene_weighting: str | None = None,
    fractions: str = "cell",
    min_proportion: float | str = "auto",
    save_params: str | Path | None = None,
    seed: int = 0,
    train_options: dict | None = None,
    calibrate_noise: bool = True,
    fit_platform_effect: bool = True,
    device: str = "auto",
    progress=None,
    should_stop=None,
) -> DeconvolutionResult:
    """Estimate the cell-type proportions of every spot.

    Parameters
    ----------
    slide
        AnnData (spots x genes, raw counts; ``obsm['spatial']`` = (x, y) in full-resolution
        pixels; optional ``uns['spatial'][library]`` images and scale factors) or a path
        that :func:`napari_stlnmf.io.read_slide` reads.
    reference
        Single-cell AnnData (with ``obs[cell_type_key]``), a signature DataFrame
        (genes x types), or a path to either.
    method
        ``'unrolled'`` (learned parameters) or ``'classic'`` (fixed λ's, iterate to
        convergence).
    train
        Fine-tune the parameters on slides simulated on this slide's own layout and
        reference before deconvolving (about 15 s to 3 min on a laptop; kept only if they beat
        the starting parameters by 5 % on held-out simulations). Default: use ``params`` or
        the shipped parameters, themselves learned by unrolling on simulated slides of many
        references — as accurate as fine-tuning on every benchmark slide, and seconds fast.
    fractions
        ``'cell'``: share of cells per type (mRNA fractions divided by each type's mRNA
        content); ``'mrna'``: share of the spot's transcripts. Both are returned.
    min_proportion
        Proportions below this are set to zero at the end (then rows are renormalised).
        ``'auto'`` (default): 0.05, raised on slides whose spots hold one or two cells (Visium HD
        bins, small spots) up to 0.25 — ``0.25 / n²`` with ``n`` the effective number of cells
        per spot read off the noise (a spot of n cells shows 1/n of single cells'
        overdispersion; needs raw counts in the slide and a single-cell reference, else 0.05).
        The values used are ``info['min_proportion']`` and ``info['cells_per_spot']``.
    gene_weighting
        Weights of the data term. ``'nb'``: one weight per spot and gene, the inverse of a
        negative-binomial variance ``μ/L + φμ²`` at the current fit (``L`` the spot's counts,
        ``φ`` the slide's overdispersion measured on a quick first fit), recomputed inside the
        layers — deep spots and well-measured genes count more (unrolled method only). One
        weight per gene: ``'fitted'`` (1/sd measured on the slide: Poisson variance plus the
        gene's excess residual after a quick first fit), ``'sqrt'`` (1/√mean, Poisson),
        ``'mean'`` (1/mean) or ``'none'``. Default (``None``): the weighting a saved model was
        trained with when ``params`` is given; ``'nb'`` when training; else the weighting the
        shipped parameters were tuned with.
    tied
        Training: one set of λ1, λ2, λ3 for all layers (``True``, as the original) or one per
        layer (``False``, default: lower RMSE on every slide of the held-out suite).
    calibrate_noise
        Before training, measure the slide's platform effect (and, for signature-only
        references, its extra-Poisson noise) from a first fit, and simulate training slides
        with noise around those levels instead of a fixed prior range.
    fit_platform_effect
        Unrolled model: before anything else, estimate how the slide's platform measures each
        gene differently from the reference (slide totals against a first fit, shrunk by their
        Poisson noise, as RCTD's platform-effect step) and rescale the reference's genes by it.
    train_options
        Advanced: extra keyword arguments for the simulation of training slides
        (:func:`napari_stlnmf.train.make_training_slides`) and for training
        (:func:`napari_stlnmf.train.train_unrolled`), routed by name.
    progress, should_stop
        ``progress(stage, i, n)`` callback; ``should_stop()`` returning True cancels with
        :class:`Cancelled`.

    Returns
    -------
    DeconvolutionResult
        For AnnData input, ``result.adata`` is a *copy* of the slide with
        ``obsm['stlnmf_proportions']`` and ``uns['stlnmf']``; the input is never modified.
    """
    from . import io

    t_start = time.perf_counter()
    if method not in ("unrolled", "classic"):
        raise StlnmfError(f"method must be 'unrolled' or 'classic', not {method!r}")
    if fractions not in ("cell", "mrna"):
        raise StlnmfError(f"fractions must be 'cell' or 'mrna', not {fractions!r}")
    if not (
        min_proportion == "auto"
        or (isinstance(min_proportion, (int, float)) and 0 <= min_proportion < 1)
    ):
        raise StlnmfError(
            f"min_proportion must be 'auto' or a number in [0, 1), not {min_proportion!r}"
        )
    rng_seed = int(seed)
    torch.manual_seed(rng_seed)
    dev = pick_device(device)

    _report(progress, "reading", 0, 1)
    adata = _as_adata(slide, coords)
    io.validate_slide(adata)
    ref = _as_reference(reference, cell_type_key)
    _check_stop(should_stop)

    weighting_given = gene_weighting is not None
    if gene_weighting is None:
        gene_weighting = _default_gene_weighting(method, params, train)
    if gene_weighting == "nb" and method != "unrolled":
        raise StlnmfError("gene_weighting='nb' (per-entry weights) needs method='unrolled'")
    _report(progress, "preparing", 0, 1)
    prep: Prepared = prepare(
        adata.X,
        adata.var_names,
        ref,
        n_markers=n_markers,
        case_insensitive=case_insensitive,
        gene_weighting=gene_weighting,
    )
    mask = prep.spot_mask
    n_kept, n_types = int(mask.sum()), len(prep.cell_types)
    # past the limit in float32, the Gram matrices are kept as bfloat16 upper triangles (a quarter)
    compact_gram = gram_bytes(n_kept, n_types) > MAX_GRAM_BYTES
    needed = gram_bytes(n_kept, n_types, compact=True)
    if gene_weighting == "nb" and needed > MAX_GRAM_BYTES:
        fallback = "fitted" if train else "sqrt"
        message = (
            f"per-entry weights need {needed / 2**30:.1f} GiB of per-spot Gram matrices (bfloat16 upper "
            f"triangles) for {n_kept:,} spots x {n_types} cell types (limit {MAX_GRAM_BYTES / 2**30:.0f} GiB)"
        )
        if weighting_given:
            raise StlnmfError(
                message + "; use gene_weighting='fitted' (or 'sqrt') or fewer cell types"
            )
        warnings.warn(
            f"{message}: using one weight per gene ('{fallback}') instead",
            RuntimeWarning,
            stacklevel=2,
        )
        gene_weighting = (
            fallback  # prepare() scaled genes the same way for both ('sqrt' until fitted)
        )
    xy = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)[:, :2]
    _check_stop(should_stop)

    _report(progress, "graph", 0, 1)
    features, feature_source = slide_features(
        adata, mask, library_id=library_id, use_image=use_image, region_key=region_key
    )
    graph: SpatialGraph = build_graph(xy[mask], n_neighbors=n_neighbors, features=features)
    _check_stop(should_stop)

    ref_sel = ref.subset_genes(prep.genes)
    m, p = prep.B.shape
    B = torch.as_tensor(prep.B, device=dev)
    scale = torch.as_tensor(prep.gene_scale, device=dev)
    train_report = None
    if method == "unrolled" and (fit_platform_effect or gene_weighting in ("fitted", "nb")):
        _report(progress, "platform", 0, 1)
    if method == "unrolled" and fit_platform_effect:
        prep, log_factor = _fit_platform_effect(prep, rng_seed)
        ref_sel = ref_sel.scale_genes(np.exp(log_factor))
        B = torch.as_tensor(prep.B, device=dev)
        _check_stop(should_stop)
    entry_noise = first_noise = None
    cells_per_spot = None
    # φ's Poisson part assumes raw counts on both sides (scaled or normalised values would fake noise)
    counts_both = (
        ref.cell_counts is not None
        and _integer_valued(ref.cell_counts)
        and _integer_valued(adata.X)
    )
    auto_threshold = min_proportion == "auto" and counts_both
    if gene_weighting in ("fitted", "nb") or auto_threshold:
        sample = _sample_rows(prep.X.shape[0], NOISE_SAMPLE_SPOTS, rng_seed)
        V_first = _quick_fit(prep, sample, prep.gene_scale)
        X_s, lib_s = prep.X[sample], prep.library_size[sample]
        slide_noise = estimate_noise(X_s, lib_s, prep.B, V_first)
        if gene_weighting == "fitted":
            prep = replace(prep, gene_scale=fitted_gene_scale(X_s, lib_s, prep.B, V_first))
            scale = torch.as_tensor(prep.gene_scale, device=dev)
        elif gene_weighting == "nb":
            first_noise = slide_noise
            entry_noise = EntryNoise(
                torch.as_tensor(prep.library_size, device=dev),
                _overdispersion(slide_noise),
                compact_gram=compact_gram,
            )
        if counts_both:  # the reference's own counts: ref_sel's are rescaled by the platform effect
            cell_phi = reference_overdispersion(ref.subset_genes(prep.genes), seed=rng_seed)
            cells_per_spot = effective_cells_per_spot(cell_phi, _overdispersion(slide_noise))
    if min_proportion == "auto":
        min_proportion = auto_min_proportion(cells_per_spot)
    if method == "unrolled":
        param_file = params if params is not None else default_params_path()
        if Path(param_file).exists():
            model, _ = UnrolledNMF.load(param_file, genes=list(prep.genes), n_types=p)
        elif params is not None:
            raise StlnmfError(f"parameter file {params} does not exist")
        else:
            model = UnrolledNMF(m, p, omega=DEFAULTS.omega_start)
        if n_layers is not None and n_layers != model.n_layers:
            model.n_layers = int(n_layers)
            if not model.tied:
                raise StlnmfError("n_layers cannot be changed for an untied (per-layer) model")
        if entry_noise is None:
            model.refresh_layers = None
        elif model.refresh_layers is None:
            model.refresh_layers = REFRESH_LAYERS
        if train and not tied and model.tied:  # learn one set of λ's per layer
            rows = model.log_lambda.detach().repeat(model.n_layers, 1)
            model.log_lambda = torch.nn.Parameter(rows)
            model.tied = False
        model.to(dev)
        if train:
            n_val = max(2, n_train_slides // 4)
            total = n_train_slides + n_val
            _report(progress, "simulating", 0, total)
            sim_kw, fit_kw = _split_train_options(train_options)
            noise = None
            if calibrate_noise:
                # measured on the quick first fit when there was one (no second full-slide fit),
                # else on a fit with the model's parameters
                noise = (
                    first_noise
                    if first_noise is not None
                    else _first_fit_noise(model, prep, B, scale, graph, rng_seed)
                )
                for k, v in calibrated_noise_ranges(
                    noise, signature_only=ref_sel.cell_counts is None
                ).items():
                    sim_kw.setdefault(k, v)
            slides = make_training_slides(
                xy[mask],
                graph,
                ref_sel,
                n_slides=total,
                features=features,
                library_sizes=prep.library_size,
                seed=rng_seed,
                device=dev,
                **sim_kw,
            )
            _check_stop(should_stop)
            train_report = train_unrolled(
                model,
                prep.B,
                prep.gene_scale,
                prep.mrna_content,
                slides[:n_train_slides],
                slides[n_train_slides:],
                epochs=train_epochs,
                progress=progress,
                should_stop=should_stop,
                seed=rng_seed,
                overdispersion=0.0 if entry_noise is None else entry_noise.overdispersion,
                **fit_kw,
            )
            train_report.noise = noise
            _release_freed_memory()
            if save_params is not None:
                model.save(
                    save_params,
                    genes=prep.genes,
                    cell_types=prep.cell_types,
                    extra={"train": train_report.as_dict(), "gene_weighting": gene_weighting},
                )
        _report(progress, "deconvolving", 0, model.n_layers)

        def cb(i, n):
            _report(progress, "deconvolving", i, n)
            _check_stop(should_stop)

        with torch.no_grad():
            BtX, BtB = model.gram(prep.X, B, scale)
        V = model.infer(prep.X, B, scale, graph, callback=cb, gram=(BtX, BtB), noise=entry_noise)
        gene_scale_eff = (scale * model.gene_weights()).detach()
        described = model.describe()
    else:
        model = None
        s = DEFAULTS
        g2 = scale**2
        Bw = B * g2[:, None]
        BtX = torch.as_tensor(np.asarray(prep.X @ Bw.cpu().numpy()), device=dev)
        BtB = B.T @ Bw
        n_iter = n_layers or 1000

        def cb(i, n):
            _report(progress, "deconvolving", i, n)
            _check_stop(should_stop)

        V = solve(
            BtX,
            BtB,
            adjacency=graph.adjacency(s.sigma_distance, s.sigma_feature),
            lam1=s.lambda_graph,
            lam2=s.lambda_sum,
            ridge=torch.full((p,), 2 * s.lambda_ridge),
            n_iter=n_iter,
            tol=1e-5,
            callback=cb,
        )
        gene_scale_eff = scale
        described = {
            "lambda_graph": s.lambda_graph,
            "lambda_sum": s.lambda_sum,
            "lambda_ridge": s.lambda_ridge,
            "sigma_distance": s.sigma_distance,
            "sigma_feature": s.sigma_feature,
            "max_iter": n_iter,
        }

    with torch.no_grad():
        V = V / V.sum(1, keepdim=True).clamp_min(1e-12)
        fit = _fit_error(prep.X, gene_scale_eff, V, BtX, BtB)
        mrna_sel = V.cpu().numpy().astype(np.float64)
    cells = (
        to_cell_fractions(mrna_sel, prep.mrna_content)
        if model is None
        else model.cell_fractions(mrna_sel, prep.mrna_content, graph)
    )
    cell = finalize_proportions(cells, min_proportion)
    # transcripts of the whole transcriptome, not only the selected genes
    mrna = finalize_proportions(mrna_sel / prep.gene_share[None, :], min_proportion)

    obs_names = pd.Index(adata.obs_names.astype(str))

    def full(values):
        out = np.full((adata.n_obs, p), np.nan)
        out[mask] = values
        return pd.DataFrame(out, index=obs_names, columns=prep.cell_types)

    cell_df, mrna_df = full(cell), full(mrna)
    fit_s = pd.Series(np.nan, index=obs_names, name=FIT_ERROR_KEY)
    fit_s[mask] = fit
    qc = pd.Series(np.where(mask, "ok", "no counts"), index=obs_names, name=QC_KEY)
    info = {
        "version": __version__,
        "method": method,
        "fractions": fractions,
        "fractions_meaning": "share of cells per type"
        if fractions == "cell"
        else "share of the spot's mRNA per type",
        "cell_types": prep.cell_types,
        "genes": [str(g) for g in prep.genes],
        **prep.info,
        "graph": {
            "n_edges": graph.n_edges // 2,
            "n_neighbors": n_neighbors,
            "features": feature_source,
            "spacing": graph.spacing,
        },
        "params": described,
        "train": None if train_report is None else train_report.as_dict(),
        "min_proportion": min_proportion,
        "cells_per_spot": cells_per_spot,
        "gene_weighting": gene_weighting,
        "overdispersion": None if entry_noise is None else entry_noise.overdispersion,
        "gram_storage": None
        if entry_noise is None
        else ("bfloat16 upper triangles" if compact_gram else "float32"),
        "seed": rng_seed,
        "seconds": time.perf_counter() - t_start,
    }
    result = DeconvolutionResult(
        proportions=cell_df if fractions == "cell" else mrna_df,
        cell_fractions=cell_df,
        mrna_fractions=mrna_df,
        fit_error=fit_s,
        qc=qc,
        info=info,
        model=model,
    )
    result.adata = _annotated_copy(adata, result)
    _report(progress, "done", 1, 1)
    return result


PLATFORM_SAMPLE_SPOTS = 20_000  # gene totals are stable long before 10^6 bins
PLATFORM_PASSES = 2
PLATFORM_REFINE_PASSES = 3
PLATFORM_REFINE_SPOTS = (
    2_000  # 1,000-4,235 spots gave the same maps (±0.0003) on the benchmark slides
)
PLATFORM_MIN_PROPORTION = 0.05  # the default output's zeroing, whatever the caller asks for


def _fit_platform_effect(prep: Prepared, seed: int) -> tuple[Prepared, np.ndarray]:
    """Per-gene platform factors from the slide totals (on a seeded subsample of spots);
    returns the corrected inputs and the log factors.

    First from a quick non-spatial fit, then refined with the shipped parameters' per-entry
    fit with small proportions zeroed: the quick fit leaves a little of every absent type in
    each spot, and summed over the slide that excess reads as a platform effect on the genes
    of those types (it cost a third of the mRNA-fraction accuracy on shallow slides).

    Both fits use fixed parameters, not the model's learned ones, so a saved model reused on
    the same slide sees the same corrected inputs as when it was trained."""
    rows = _sample_rows(prep.X.shape[0], PLATFORM_SAMPLE_SPOTS, seed)
    X, lib = prep.X[rows], prep.library_size[rows]
    log_factor = np.zeros(prep.B.shape[0])
    current = prep
    for _ in range(PLATFORM_PASSES):
        V = _quick_fit(current, rows, prep.gene_scale)
        log_factor = log_factor + estimate_platform_effect(X, lib, current.B, V)
        current = with_platform_effect(prep, log_factor)
    if not default_params_path().exists():
        return current, log_factor
    model, _ = UnrolledNMF.load(
        default_params_path(), genes=list(prep.genes), n_types=prep.B.shape[1]
    )
    if model.refresh_layers is None:
        model.refresh_layers = REFRESH_LAYERS
    rows = _sample_rows(prep.X.shape[0], PLATFORM_REFINE_SPOTS, seed)
    X, lib = prep.X[rows], prep.library_size[rows]
    noise = EntryNoise(torch.as_tensor(lib), _quick_overdispersion(current, rows))
    for _ in range(PLATFORM_REFINE_PASSES):
        V = model.infer(
            X, torch.as_tensor(current.B), torch.as_tensor(prep.gene_scale), noise=noise
        )
        V = V.cpu().numpy().astype(np.float64)
        # zero small transcript shares as the output does, back to shares of the selected genes
        V = (
            finalize_proportions(V / current.gene_share[None, :], PLATFORM_MIN_PROPORTION)
            * current.gene_share[None, :]
        )
        # x ≈ f ⊙ Σ_k (v_k / t_k) B0_k with t_k the type's total after scaling: a fresh estimate
        # of the whole factor against the reference's own profiles
        type_total = (prep.B.astype(np.float64) * np.exp(log_factor)[:, None]).sum(0)
        log_factor = estimate_platform_effect(
            X, lib, prep.B, V / V.sum(1, keepdims=True) / type_total[None, :]
        )
        current = with_platform_effect(prep, log_factor)
    return current, log_factor


def _first_fit_noise(model, prep: Prepared, B, scale, graph, seed: int) -> dict:
    """:func:`estimate_noise` after a fit of the whole slide with the model's parameters, on a
    seeded subsample of spots (the estimate densifies its rows: 10^6 bins would not fit)."""
    V = model.infer(prep.X, B, scale, graph).cpu().numpy().astype(np.float64)
    V /= np.maximum(V.sum(1, keepdims=True), 1e-12)
    rows = _sample_rows(prep.X.shape[0], NOISE_SAMPLE_SPOTS, seed)
    return estimate_noise(prep.X[rows], prep.library_size[rows], prep.B, V[rows])


def _release_freed_memory() -> None:
    """Hand memory freed by training back to the OS before the full-slide inference: glibc keeps
    training's many mid-sized tensors in its heap (+1.6 GB resident at 10^6 bins otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to do
        pass


def _quick_fit(prep: Prepared, rows: np.ndarray, gene_scale: np.ndarray) -> np.ndarray:
    """mRNA fractions of ``rows`` from the default parameters (50 layers, no graph): the first
    fit the slide's platform effect and gene weights are measured on."""
    model = UnrolledNMF(*prep.B.shape, omega=DEFAULTS.omega_start)
    V = model.infer(
        prep.X[rows], torch.as_tensor(prep.B), torch.as_tensor(gene_scale), None, n_layers=50
    )
    V = V.cpu().numpy().astype(np.float64)
    return V / np.maximum(V.sum(1, keepdims=True), 1e-12)


def _quick_overdispersion(prep: Prepared, rows: np.ndarray) -> float:
    """φ of the slide measured on a quick first fit of ``rows``."""
    V = _quick_fit(prep, rows, prep.gene_scale)
    return _overdispersion(estimate_noise(prep.X[rows], prep.library_size[rows], prep.B, V))


AUTO_MIN_PROPORTION = (
    0.05,
    0.25,
)  # floor (spots of ~2+ effective cells, or unknown) and cap (one cell)


def _integer_valued(matrix, at_most: int = 200_000) -> bool:
    """Whether (a sample of) the stored values are whole numbers, as raw counts are."""
    values = (
        matrix.data
        if hasattr(matrix, "data") and not isinstance(matrix, np.ndarray)
        else np.asarray(matrix).ravel()
    )
    values = np.asarray(values[:at_most], dtype=np.float64)
    return bool(np.all(np.abs(values - np.round(values)) < 1e-6))


def effective_cells_per_spot(
    cell_overdispersion: float, spot_overdispersion: float
) -> float | None:
    """How many cells a spot holds, read off the noise: summing n independent cells divides
    single cells' overdispersion φ by n (by Σ w² with w the cells' mRNA shares, so big cells
    count more and this is below the head count). None when either φ is not measurable."""
    if cell_overdispersion <= 1e-6 or spot_overdispersion <= 1e-6:
        return None
    return float(cell_overdispersion / spot_overdispersion)


def auto_min_proportion(cells_per_spot: float | None) -> float:
    """The 'auto' zeroing threshold, ``0.25 / n²`` within [0.05, 0.25]: both the smallest real
    share (1/n) and the noise a spot spreads over absent types (φ ∝ 1/n) grow as spots hold fewer
    cells, so spots of one or two cells (Visium HD bins) lose that noise; spots of ~2+ effective
    cells keep 0.05. Calibrated on simulated slides of 1-12 cells per spot (docs/method.md)."""
    lo, hi = AUTO_MIN_PROPORTION
    if cells_per_spot is None:
        return lo
    return float(np.clip(0.25 / cells_per_spot**2, lo, hi))


def _default_gene_weighting(method: str, params, train: bool) -> str:
    """The weighting a saved model was trained with; 'nb' when training; else the shipped
    defaults' weighting; 'sqrt' for the classic method."""
    if method != "unrolled":
        return "sqrt"
    if params is None and train:
        return "nb"
    path = params if params is not None else default_params_path()
    if Path(path).exists():
        return UnrolledNMF.saved_extra(path).get("gene_weighting", "sqrt")
    return "sqrt"


def _split_train_options(options: dict | None) -> tuple[dict, dict]:
    """Route ``train_options`` to make_training_slides / train_unrolled by parameter name."""
    import inspect

    sim_names = set(inspect.signature(make_training_slides).parameters)
    fit_names = set(inspect.signature(train_unrolled).parameters)
    sim_kw, fit_kw = {}, {}
    for k, v in (options or {}).items():
        if k in sim_names:
            sim_kw[k] = v
        elif k in fit_names:
            fit_kw[k] = v
        else:
            raise StlnmfError(f"unknown train option {k!r}")
    return sim_kw, fit_kw


def _fit_error(X, gene_scale, V, BtX, BtB) -> np.ndarray:
    """Relative weighted residual per spot without forming the dense residual matrix."""
    g2 = (gene_scale**2).cpu().numpy().astype(np.float64)
    xsq = np.asarray(X.multiply(X) @ g2).ravel()
    cross = (V * BtX).sum(1).cpu().numpy()
    quad = ((V @ BtB) * V).sum(1).cpu().numpy()
    res = np.maximum(xsq - 2 * cross + quad, 0.0)
    return np.sqrt(res / np.maximum(xsq, 1e-30))


def _annotated_copy(adata, result: DeconvolutionResult):
    """Copy of the slide with results in obsm/obs/uns (the user's object stays untouched)."""
    out = adata.copy()
    out.obsm[PROPORTIONS_KEY] = result.proportions.set_axis(out.obs_names)
    out.obsm[MRNA_FRACTIONS_KEY] = result.mrna_fractions.set_axis(out.obs_names)
    out.obs[FIT_ERROR_KEY] = result.fit_error.to_numpy()
    out.obs[QC_KEY] = pd.Categorical(result.qc.to_numpy())
    uns = dict(result.info)
    uns["params"] = {
        k: (np.asarray(v) if isinstance(v, list) else v) for k, v in uns["params"].items()
    }
    uns["train"] = uns["train"] or {}
    out.uns[UNS_KEY] = uns
    return out
