"""One call from a slide and a reference to cell-type proportions: :func:`deconvolve`, a driver
over the public steps of :mod:`napari_stlnmf.pipeline`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import __version__, io
from ._constants import (
    FIT_ERROR_KEY,
    LOWER_KEY,
    MRNA_FRACTIONS_KEY,
    PROPORTIONS_KEY,
    QC_KEY,
    UNS_KEY,
    UPPER_KEY,
)

DOMINANT_TYPE_SUFFIX = "dominant_type"  # obs column: prefix + this
from .calibration import calibrate
from .checks import (
    check_callbacks,
    check_cell_types_not_ids,
    check_reference_is_not_slide,
    check_signature_orientation,
    check_slide_arguments,
)
from .diagnostics import combined_diagnostics, diagnose_library, diagnostics_obs
from .io._util import table_suffix
from .model import EntryNoise, UnrolledNMF, gram_bytes, pick_device
from .pipeline import (
    MAX_CELLS_PER_TYPE,
    DeconvolutionSettings,
    FixedCalibration,
    build_model,
    build_spot_graph,
    choose_gene_weighting,
    default_gene_weighting,
    default_params_path,
    entry_noise_for,
    fine_tune,
    finish,
    fit,
    load_reference,
    load_slide,
    make_solver,
    platform_effect_wanted,
    prepare_inputs,
    shipped_refinement_model,
    slide_libraries,
)
from .progress import Cancelled, Stage, check_stop, report
from .reference_check import check_before_fit
from .uncertainty import (
    DEFAULT_DRAWS,
    DEFAULT_LEVEL,
    Uncertainty,
    combined_uncertainty,
    library_uncertainty,
)

__all__ = [
    "Cancelled",
    "DeconvolutionResult",
    "DeconvolutionSettings",
    "deconvolve",
    "default_params_path",
    "run_deconvolution",
]

_SETTINGS = {f for f in DeconvolutionSettings.__dataclass_fields__}


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
    diagnostics, unexplained_regions
        With ``diagnose=True``: per spot ``deviance_z``, ``poorly_explained``, ``region``
        (NaN / False / -1 for spots without an estimate), and per region of poorly explained
        spots its genes and the population they mark
        (:mod:`napari_stlnmf.diagnostics`); else None.
    uncertainty
        With ``uncertainty=True``: an :class:`~napari_stlnmf.uncertainty.Uncertainty` whose
        ``lower`` and ``upper`` (DataFrames like ``proportions``) bound each proportion at the
        stated ``level``; else None.
    """

    proportions: pd.DataFrame
    cell_fractions: pd.DataFrame
    mrna_fractions: pd.DataFrame
    fit_error: pd.Series
    qc: pd.Series
    info: dict = field(default_factory=dict)
    adata: object | None = None
    model: UnrolledNMF | None = None
    diagnostics: pd.DataFrame | None = None
    unexplained_regions: pd.DataFrame | None = None
    uncertainty: Uncertainty | None = None


def deconvolve(
    slide,
    reference,
    *,
    cell_type_key: str | None = None,
    coords=None,
    bin_size: float | None = None,
    library_id: str | None = None,
    library_key: str | None = None,
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
    reference_is_means: bool = False,
    allow_non_integer_slide: bool = False,
    max_cells_per_type: int | None = MAX_CELLS_PER_TYPE,
    obs_prefix: str = "stlnmf_",
    diagnose: bool = False,
    marker_gene_sets: dict[str, list[str]] | None = None,
    uncertainty: bool = False,
    uncertainty_draws: int = DEFAULT_DRAWS,
    uncertainty_level: float = DEFAULT_LEVEL,
    progress=None,
    should_stop=None,
) -> DeconvolutionResult:
    """Estimate the cell-type proportions of every spot.

    Parameters
    ----------
    slide
        AnnData (spots x genes, raw counts; ``obsm['spatial']`` = (x, y) in full-resolution
        pixels; optional ``uns['spatial'][library]`` images and scale factors), a path
        that :func:`napari_stlnmf.io.read_slide` reads (a SpatialData ``.zarr`` included) or a
        SpatialData object (:func:`napari_stlnmf.io.read_spatialdata`; write the results back
        with :func:`napari_stlnmf.io.write_spatialdata_results`).
    bin_size
        Visium HD folder given as a path: the bins to read, in µm (default 8). Square bins
        are linked to their whole 8-ring in the graph (``n_neighbors=4``: the 4 sides).
    reference
        Single-cell AnnData (with ``obs[cell_type_key]``), a signature DataFrame
        (genes x types), or a path to either.

        Raw counts are found the same way on both sides: ``layers['counts']`` (or
        ``'raw_counts'``, ``'umi_counts'``), else ``X`` if it holds whole numbers, else
        ``.raw.X``; ``info['slide_counts_source']`` and ``info['reference_counts_source']``
        say which. Log-transformed, fixed-total normalised (``normalize_total``, CPM) or
        non-integer values with no raw counts elsewhere raise
        :class:`~napari_stlnmf.errors.NotRawCountsError`. Genes are matched on the var names
        and on var columns such as ``gene_ids`` or ``feature_name``, with Ensembl version
        suffixes stripped, whichever pairs the most genes (``info['gene_matching']``).
    reference_is_means
        The AnnData reference's rows are mean expression (pseudo-bulks, metacells, expected
        counts), not raw counts per cell: accept non-integer values. A signature DataFrame is
        always taken as means.
    allow_non_integer_slide
        Accept slide counts that are not whole numbers but on a linear scale (expected counts
        from Salmon/alevin, ambient-corrected counts). Never log-transformed or normalised
        values. The noise-based cells-per-spot estimate needs whole counts and is skipped.
    max_cells_per_type
        A single-cell reference keeps at most this many cells per type, a seeded (``seed``)
        sample taken before anything is copied; an .h5ad path is read for those cells only, so
        an atlas of 10^6 cells costs memory for the cells kept. ``None`` keeps every cell.
    library_id
        The key of ``uns['spatial']`` whose image and scale factors to use (a slide of one
        sample whose ``uns['spatial']`` holds several).
    library_key
        Column of ``slide.obs`` naming each spot's sample, for several samples in one AnnData
        (a concatenated atlas): each library is fitted on its own — its own spot graph (no
        edges across samples, even where their coordinates overlap), its image and scale
        (``uns['spatial'][library]`` when present), platform effect and noise — with the
        reference read once; each library's result is the one it gets alone. ``info
        ['libraries']`` holds each library's run info.
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
        overdispersion; needs raw counts in the slide and a single-cell reference, else 0.05)
        and off the depth (the spots' counts over the reference's counts per cell): the larger
        of the two, so the threshold rises only when both say few cells. The values used are
        ``info['min_proportion']`` and ``info['cells_per_spot']`` (the two estimates:
        ``info['cells_per_spot_noise']``, ``info['cells_per_spot_depth']``).
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
        Skipped on small panels (fewer than 4 genes per fitted profile: there the factors
        cannot be told from composition); ``info['platform_effect_fitted']`` says.
    train_options
        Advanced: extra keyword arguments for the simulation of training slides
        (:func:`napari_stlnmf.train.make_training_slides`) and for training
        (:func:`napari_stlnmf.train.train_unrolled`), routed by name.
    obs_prefix
        Prefix of the per-type ``obs`` columns of ``result.adata`` (``'stlnmf_<type>'``, and
        ``'stlnmf_dominant_type'``).
    diagnose
        After the fit, flag the spots the reference cannot explain: each spot's
        negative-binomial deviance over the genes used (and the slide's most variable genes,
        up to 2000) against its expectation under the fitted noise, re-centred on the slide's
        median spot (``deviance_z``; ``poorly_explained`` above 3), connected flagged regions
        and the genes carrying their residual (:mod:`napari_stlnmf.diagnostics`). In
        ``result.diagnostics``, ``result.unexplained_regions``, ``obs['<prefix>deviance_z']``,
        ``obs['<prefix>poorly_explained']``, ``obs['<prefix>unexplained_region']`` and
        ``info['diagnostics']``.
    marker_gene_sets
        With ``diagnose``: population name -> marker genes, to name what a poorly explained
        region holds (hypergeometric test of its residual genes); default: the reference's
        own types' markers.
    uncertainty, uncertainty_draws, uncertainty_level
        Per spot and type, an interval for each reported proportion (``result.uncertainty``:
        ``lower``, ``upper``; ``obsm['stlnmf_lower']``, ``obsm['stlnmf_upper']``;
        ``info['uncertainty']``): a parametric bootstrap — ``uncertainty_draws`` (default 30)
        sets of counts drawn from the fitted negative-binomial model (φ as calibrated), the same
        fit re-run on each (no re-training, no re-calibration), the draws' spread around their
        median placed on the estimate and widened by a factor calibrated on simulations with
        truth so that ``uncertainty_level`` (default 0.9) of true proportions fall inside
        (:mod:`napari_stlnmf.uncertainty`). Costs one fit per draw. Seeded by ``seed``.
    progress, should_stop
        ``progress(stage, i, n)`` callback; ``should_stop()`` returning True cancels with
        :class:`Cancelled`.

    Returns
    -------
    DeconvolutionResult
        ``result.adata`` is a *copy* of the slide with ``obsm['stlnmf_proportions']`` (and
        ``'stlnmf_mrna_fractions'``), one ``obs`` column per type and the dominant type, the
        fit error and ``obs['stlnmf_qc']`` (``'ok'``, ``'no counts'``, or ``'outside
        tissue'`` for spots with ``obs['in_tissue'] == 0``, which are left out of the fit and
        get NaN), and ``uns['stlnmf']``; the input is never modified.

    Warns
    -----
    ReferenceWarning
        Before the fit, for each problem of the reference
        (:func:`napari_stlnmf.reference_check.check_reference`: nearly collinear types, types
        with fewer than 25 cells, placeholder labels, another species' gene names, most genes
        missing from the slide), saying what to do; also in ``info['reference_check']``.
    """
    options = {k: v for k, v in locals().items() if k in _SETTINGS}
    return run_deconvolution(
        slide,
        reference,
        DeconvolutionSettings(**options),
        cell_type_key=cell_type_key,
        coords=coords,
        bin_size=bin_size,
        progress=progress,
        should_stop=should_stop,
    )


def run_deconvolution(
    slide,
    reference,
    settings: DeconvolutionSettings,
    *,
    cell_type_key: str | None = None,
    coords=None,
    bin_size: float | None = None,
    progress=None,
    should_stop=None,
) -> DeconvolutionResult:
    """:func:`deconvolve` with its options as one :class:`~.pipeline.DeconvolutionSettings`
    (which also holds the advanced ones): read the inputs once, then fit each library of the
    slide (:func:`~.pipeline.slide_libraries`) with the method's steps."""
    t_start = time.perf_counter()
    check_callbacks(progress, should_stop)
    check_slide_arguments(slide, coords)
    report(progress, Stage.READING, 0, 1)
    adata = load_slide(slide, coords, bin_size)
    io.validate_slide(adata, allow_non_integer=settings.allow_non_integer_slide)
    ref = slide_reference(reference, cell_type_key, adata, settings)
    check_stop(should_stop)
    fits = []
    for library in slide_libraries(adata, settings):
        # a copy, not a view: each library then runs exactly as if it were its own slide
        part = adata if library.rows.all() else adata[library.rows].copy()
        settings_here = replace(settings, library_id=library.library_id, library_key=None)
        fits.append((library, _fit_library(part, ref, settings_here, progress, should_stop)))
    result = _result(adata, fits, settings, seconds=time.perf_counter() - t_start)
    report(progress, Stage.DONE, 1, 1)
    return result


def slide_reference(reference, cell_type_key, adata, settings: DeconvolutionSettings):
    """The reference read for this slide (:func:`~.pipeline.load_reference`): a signature
    table oriented against the slide's genes, the cell-type column checked first."""
    reference = _oriented_signature(reference, adata)
    _check_cell_type_column(reference, cell_type_key, adata)
    return load_reference(
        reference,
        cell_type_key,
        is_means=settings.reference_is_means,
        max_cells_per_type=settings.max_cells_per_type,
        seed=int(settings.seed),
    )


def _oriented_signature(reference, adata):
    """A signature table (a DataFrame or a table's path, read here) checked to have the
    slide's genes as rows; other references are returned as given."""
    if isinstance(reference, (str, Path)) and table_suffix(Path(reference)):
        reference = io.read_reference(reference)
    if isinstance(reference, pd.DataFrame):
        check_signature_orientation(reference, adata.var_names)
    return reference


def _check_cell_type_column(reference, cell_type_key, adata) -> None:
    """The single-cell reference is not the slide itself, and its cell-type column is not an id
    column (only ``obs`` of an ``.h5ad`` path is read here)."""
    import anndata as ad

    obs = None
    if isinstance(reference, ad.AnnData):
        obs = reference.obs
    elif isinstance(reference, (str, Path)) and str(reference).lower().endswith(".h5ad"):
        io.reference.require_reference_file(Path(reference))
        obs = io.reference._read_obs(Path(reference))
    if obs is None:
        return
    check_reference_is_not_slide(obs.index, adata.obs_names)
    if cell_type_key is not None and cell_type_key in obs:
        check_cell_types_not_ids(obs[cell_type_key], cell_type_key)


@dataclass
class _LibraryFit:
    prep: object
    fractions: object
    info: dict
    model: UnrolledNMF | None
    types: list[str]
    diagnostics: object = None
    uncertainty: tuple | None = None
    kept_calibration: FixedCalibration | None = None


def _fit_library(
    adata,
    ref,
    s: DeconvolutionSettings,
    progress=None,
    should_stop=None,
    *,
    fixed: FixedCalibration | None = None,
    keep_calibration: bool = False,
):
    """One sample's spots, from inputs to fractions: the method's steps, top to bottom.

    ``fixed``: the slide-wide steps' decisions taken from a :class:`FixedCalibration` instead
    of measured on these spots (a tile of a slide); ``keep_calibration``: return the ones
    measured here as one (``fit.kept_calibration``)."""
    torch.manual_seed(int(s.seed))
    device = pick_device(s.device)
    counts = io.slide_counts(adata, allow_non_integer=s.allow_non_integer_slide)

    report(progress, Stage.PREPARING, 0, 1)
    as_read = ref
    quick_platform = None
    if fixed is None:
        requested = s.gene_weighting or default_gene_weighting(s.method, s.params, s.train)
        inputs = prepare_inputs(
            adata, ref, s, gene_weighting=requested, counts=counts, device=device
        )
        prep, ref, subtypes = inputs.prepared, inputs.reference, inputs.subtypes
        quick_platform = inputs.quick_platform
        reference_check = check_before_fit(
            as_read, counts.var.index, prep, case_insensitive=s.case_insensitive
        )
        weighting, compact_gram = choose_gene_weighting(
            requested,
            explicit=s.gene_weighting is not None,
            train=s.train,
            n_spots=int(prep.spot_mask.sum()),
            n_types=len(prep.cell_types),
            max_gram_bytes=s.max_gram_bytes,
        )
    else:
        prep = fixed.prepare(counts, case_insensitive=s.case_insensitive)
        ref, subtypes = fixed.reference, fixed.subtypes
        reference_check = fixed.info.get("reference_check", [])
        weighting = fixed.gene_weighting
        n_spots, n_types = int(prep.spot_mask.sum()), len(prep.cell_types)
        compact_gram = gram_bytes(n_spots, n_types) > s.max_gram_bytes
    check_stop(should_stop)

    report(progress, Stage.GRAPH, 0, 1)
    scale = None if fixed is None else fixed.feature_scale
    spots = build_spot_graph(adata, prep, s, feature_scale=scale)
    check_stop(should_stop)

    unrolled = s.method == "unrolled"
    if fixed is not None:
        calibration = fixed.applied_to(prep)
        platform = calibration.log_platform_factor is not None
    else:
        platform = platform_effect_wanted(prep, s)
        if unrolled and (platform or weighting in ("fitted", "nb")):
            report(progress, Stage.PLATFORM, 0, 1)
        refine_with = shipped_refinement_model(prep) if platform else None
        calibration = calibrate(
            prep, ref,
            slide_counts=counts.matrix, gene_weighting=weighting, min_proportion=s.min_proportion,
            platform_effect=platform, refine_with=refine_with,
            refine_passes=s.platform_refine_passes, seed=int(s.seed), device=device,
            quick_platform=quick_platform,
        )  # fmt: skip
    prep = calibration.prepared
    check_stop(should_stop)
    scale_log = [] if keep_calibration else None
    entry_noise = entry_noise_for(
        calibration, weighting, compact_gram=compact_gram, device=device,
        gram_scales=None if fixed is None else fixed.gram_scales, scale_log=scale_log,
    )  # fmt: skip

    model = build_model(prep, s, entry_weights=entry_noise is not None) if unrolled else None
    train_report = None
    if model is not None and s.train:
        train_report = fine_tune(
            model, prep, ref, calibration, spots, s,
            entry_noise=entry_noise, progress=progress, should_stop=should_stop,
        )  # fmt: skip
        if s.save_params is not None:
            extra = {"train": train_report.as_dict(), "gene_weighting": weighting}
            model.save(s.save_params, genes=prep.genes, cell_types=prep.cell_types, extra=extra)
    if model is not None and fixed is not None:
        model.fixed_omega = fixed.omega  # ω is decided once for the slide, not per part
    solver = make_solver(s, model)
    solved = fit(
        prep, spots, solver,
        entry_noise=entry_noise, device=device, progress=progress, should_stop=should_stop,
    )  # fmt: skip
    fractions = finish(
        solved, prep, spots, solver, min_proportion=calibration.min_proportion, subtypes=subtypes
    )
    types = prep.cell_types if subtypes is None else subtypes.cell_types
    diagnostics = None
    if s.diagnose:
        diagnostics = diagnose_library(
            counts, ref, as_read, prep, solved.V.cpu().numpy(), spots.graph, calibration, s
        )
    intervals = None
    if s.uncertainty:
        intervals = library_uncertainty(
            prep, solved, spots, solver, calibration, fractions, s,
            entry_noise=entry_noise, subtypes=subtypes, device=device,
            progress=progress, should_stop=should_stop,
        )  # fmt: skip
    info = _run_info(s, prep, spots, solver, calibration, train_report, subtypes, weighting)
    info.update(
        cell_types=types,
        overdispersion=None if entry_noise is None else entry_noise.overdispersion,
        gram_storage=_gram_storage(entry_noise),
        platform_effect_fitted=platform,
        reference_check=reference_check,
    )
    if diagnostics is not None:
        info["diagnostics"] = diagnostics.info
    if intervals is not None:
        info["uncertainty"] = intervals[2]
    fit_here = _LibraryFit(prep, fractions, info, model, types, diagnostics, intervals)
    if keep_calibration:
        omega = None if model is None else model.last_omega
        fit_here.kept_calibration = FixedCalibration.of_run(
            ref, subtypes, weighting, calibration, spots, scale_log, info, omega
        )
    return fit_here


def _gram_storage(entry_noise: EntryNoise | None) -> str | None:
    if entry_noise is None:
        return None
    return "bfloat16 upper triangles" if entry_noise.compact_gram else "float32"


def _run_info(settings, prep, spots, solver, calibration, train_report, subtypes, weighting):
    """What the run did, as plain values (it goes to ``uns['stlnmf']``)."""
    cell = settings.fractions == "cell"
    return {
        "version": __version__,
        "method": settings.method,
        "fractions": settings.fractions,
        "fractions_meaning": "share of cells per type"
        if cell
        else "share of the spot's mRNA per type",
        "cell_types": prep.cell_types,
        "genes": [str(g) for g in prep.genes],
        **prep.info,
        "graph": {
            "n_edges": spots.graph.n_edges // 2,
            "n_neighbors": settings.n_neighbors,
            "features": spots.feature_source,
            "spacing": spots.graph.spacing,
        },
        "params": solver.describe(),
        "train": None if train_report is None else train_report.as_dict(),
        "min_proportion": calibration.min_proportion,
        "cells_per_spot": calibration.cells_per_spot,
        "cells_per_spot_noise": calibration.cells_per_spot_noise,
        "cells_per_spot_depth": calibration.cells_per_spot_depth,
        "seed": int(settings.seed),
        "cell_subtypes": None if subtypes is None else subtypes.as_dict(),
        "gene_weighting": weighting,
    }


def _result(adata, fits, settings: DeconvolutionSettings, *, seconds: float):
    """Results with one row per input spot (NaN where a spot got no estimate, with the reason
    in ``qc``), from each library's fit."""
    obs_names = pd.Index(adata.obs_names.astype(str))
    types = list(dict.fromkeys(t for _, f in fits for t in f.types))
    cell = np.full((adata.n_obs, len(types)), np.nan)
    mrna = np.full_like(cell, np.nan)
    error = np.full(adata.n_obs, np.nan)
    qc = np.full(adata.n_obs, "outside tissue", dtype=object)
    for library, f in fits:
        rows = np.flatnonzero(library.rows)
        kept = rows[f.prep.spot_mask]
        columns = [types.index(t) for t in f.types]
        cell[np.ix_(kept, columns)] = f.fractions.cell
        mrna[np.ix_(kept, columns)] = f.fractions.mrna
        error[kept] = f.fractions.fit_error
        qc[rows] = np.where(f.prep.spot_mask, "ok", "no counts")
    info = _combined_info([(library.name, f.info) for library, f in fits], settings)
    info["cell_types"] = types
    info["n_spots_outside_tissue"] = int((qc == "outside tissue").sum())
    info["seconds"] = seconds
    cell_df = pd.DataFrame(cell, index=obs_names, columns=types)
    mrna_df = pd.DataFrame(mrna, index=obs_names, columns=types)
    result = DeconvolutionResult(
        proportions=cell_df if settings.fractions == "cell" else mrna_df,
        cell_fractions=cell_df,
        mrna_fractions=mrna_df,
        fit_error=pd.Series(error, index=obs_names, name=FIT_ERROR_KEY),
        qc=pd.Series(qc.astype(str), index=obs_names, name=QC_KEY),
        info=info,
        model=fits[0][1].model if len(fits) == 1 else None,
    )
    if settings.diagnose:
        result.diagnostics, result.unexplained_regions = combined_diagnostics(fits, obs_names)
    if settings.uncertainty:
        result.uncertainty = combined_uncertainty(fits, obs_names, types, settings)
    result.adata = _annotated_copy(adata, result, obs_prefix=settings.obs_prefix)
    return result


_SHARED_INFO = ("version", "method", "fractions", "fractions_meaning", "seed", "gene_weighting")


def _combined_info(infos: list[tuple[str | None, dict]], settings) -> dict:
    """One library: its run info. Several: what they share, the spot counts summed, and each
    library's own info under ``'libraries'``."""
    if len(infos) == 1 and infos[0][0] is None:
        return dict(infos[0][1])
    first = infos[0][1]
    info = {k: first[k] for k in _SHARED_INFO}
    info["library_key"] = settings.library_key
    for key in ("n_spots_used", "n_spots_empty"):
        info[key] = int(sum(i.get(key, 0) for _, i in infos))
    info["libraries"] = {name: i for name, i in infos}
    return info


def type_columns(cell_types, prefix: str) -> dict[str, str]:
    """The ``obs`` column of each type's proportion (``prefix + type``, in its
    :func:`stored_type_names` spelling)."""
    return {t: f"{prefix}{k}" for t, k in stored_type_names(cell_types).items()}


def stored_type_names(cell_types) -> dict[str, str]:
    """Each type's name as ``.h5ad`` can store it as a key: ``/`` (an HDF5 path separator,
    which anndata is deprecating in keys) becomes ``_``, made unique by a suffix if that
    collides. ``uns['stlnmf']['stored_type_names']`` records them (aligned with
    ``'cell_types'``)."""
    names = [str(t) for t in cell_types]
    out, taken = {}, set()
    for name in names:
        key = name.replace("/", "_")
        if key != name:
            base, n = key, 2
            while key in taken or (key in names and key != name):
                key, n = f"{base}_{n}", n + 1
        out[name] = key
        taken.add(key)
    return out


def _annotated_copy(adata, result: DeconvolutionResult, *, obs_prefix: str = "stlnmf_"):
    """Copy of the slide with results in obsm/obs/uns (the user's object stays untouched):
    ``obsm`` tables, and one ``obs`` column per type plus the dominant type, so that
    ``sc.pl.spatial(adata, color='stlnmf_<type>')`` and squidpy colour by them directly."""
    out = adata.copy()
    stored = stored_type_names(result.proportions.columns)
    out.obsm[PROPORTIONS_KEY] = result.proportions.set_axis(out.obs_names).rename(columns=stored)
    out.obsm[MRNA_FRACTIONS_KEY] = result.mrna_fractions.set_axis(out.obs_names).rename(
        columns=stored
    )
    columns = type_columns(result.proportions.columns, obs_prefix)
    for t, column in columns.items():
        out.obs[column] = result.proportions[t].to_numpy()
    out.obs[obs_prefix + DOMINANT_TYPE_SUFFIX] = _dominant_type(result.proportions)
    out.obs[FIT_ERROR_KEY] = result.fit_error.to_numpy()
    out.obs[QC_KEY] = pd.Categorical(result.qc.to_numpy())
    if result.diagnostics is not None:
        for column, values in diagnostics_obs(result.diagnostics, obs_prefix).items():
            out.obs[column] = values
    if result.uncertainty is not None:
        unc = result.uncertainty
        for key, table in ((LOWER_KEY, unc.lower), (UPPER_KEY, unc.upper)):
            out.obsm[key] = table.set_axis(out.obs_names).rename(columns=stored)
    out.uns[UNS_KEY] = _h5ad_safe(dict(result.info))
    out.uns[UNS_KEY]["stored_type_names"] = list(stored.values())
    return out


def _dominant_type(proportions: pd.DataFrame) -> pd.Categorical:
    values = proportions.to_numpy()
    has = ~np.isnan(values).all(1)
    best = np.full(values.shape[0], None, dtype=object)
    best[has] = proportions.columns.to_numpy()[np.nanargmax(values[has], axis=1)]
    return pd.Categorical(best, categories=list(proportions.columns))


def _h5ad_safe(info: dict) -> dict:
    """Run info as ``.h5ad`` stores it: list-valued parameters as arrays, no None training."""
    info = dict(info)
    if "params" in info:
        info["params"] = {
            k: (np.asarray(v) if isinstance(v, list) else v) for k, v in info["params"].items()
        }
    if "train" in info:
        info["train"] = info["train"] or {}
    if "libraries" in info:
        info["libraries"] = {name: _h5ad_safe(i) for name, i in info["libraries"].items()}
    return info
