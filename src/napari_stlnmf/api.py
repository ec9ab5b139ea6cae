"""One call from a slide and a reference to cell-type proportions: :func:`deconvolve`, a driver
over the public steps of :mod:`napari_stlnmf.pipeline`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import __version__, io
from ._constants import (
    FIT_ERROR_KEY,
    MRNA_FRACTIONS_KEY,
    PROPORTIONS_KEY,
    QC_KEY,
    UNS_KEY,
)
from .calibration import calibrate
from .model import EntryNoise, UnrolledNMF, pick_device
from .pipeline import (
    MAX_CELLS_PER_TYPE,
    DeconvolutionSettings,
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
    prepare_inputs,
    shipped_refinement_model,
)
from .progress import Cancelled, Stage, check_stop, report

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
    """

    proportions: pd.DataFrame
    cell_fractions: pd.DataFrame
    mrna_fractions: pd.DataFrame
    fit_error: pd.Series
    qc: pd.Series
    info: dict = field(default_factory=dict)
    adata: object | None = None
    model: UnrolledNMF | None = None


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
    reference_is_means: bool = False,
    allow_non_integer_slide: bool = False,
    max_cells_per_type: int | None = MAX_CELLS_PER_TYPE,
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
    options = {k: v for k, v in locals().items() if k in _SETTINGS}
    return run_deconvolution(
        slide,
        reference,
        DeconvolutionSettings(**options),
        cell_type_key=cell_type_key,
        coords=coords,
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
    progress=None,
    should_stop=None,
) -> DeconvolutionResult:
    """:func:`deconvolve` with its options as one :class:`~.pipeline.DeconvolutionSettings`
    (which also holds the advanced ones): the method's steps, top to bottom."""
    t_start = time.perf_counter()
    s = settings
    torch.manual_seed(int(s.seed))
    device = pick_device(s.device)

    report(progress, Stage.READING, 0, 1)
    adata = load_slide(slide, coords)
    counts = io.validate_slide(adata, allow_non_integer=s.allow_non_integer_slide)
    ref = load_reference(
        reference,
        cell_type_key,
        is_means=s.reference_is_means,
        max_cells_per_type=s.max_cells_per_type,
        seed=int(s.seed),
    )
    check_stop(should_stop)

    report(progress, Stage.PREPARING, 0, 1)
    requested = s.gene_weighting or default_gene_weighting(s.method, s.params, s.train)
    prep, ref, subtypes = prepare_inputs(adata, ref, s, gene_weighting=requested, counts=counts)
    weighting, compact_gram = choose_gene_weighting(
        requested,
        explicit=s.gene_weighting is not None,
        train=s.train,
        n_spots=int(prep.spot_mask.sum()),
        n_types=len(prep.cell_types),
        max_gram_bytes=s.max_gram_bytes,
    )
    check_stop(should_stop)

    report(progress, Stage.GRAPH, 0, 1)
    spots = build_spot_graph(adata, prep, s)
    check_stop(should_stop)

    unrolled = s.method == "unrolled"
    platform = unrolled and s.fit_platform_effect
    if unrolled and (platform or weighting in ("fitted", "nb")):
        report(progress, Stage.PLATFORM, 0, 1)
    calibration = calibrate(
        prep, ref,
        slide_counts=counts.matrix, gene_weighting=weighting, min_proportion=s.min_proportion,
        platform_effect=platform, refine_with=shipped_refinement_model(prep) if platform else None,
        refine_passes=s.platform_refine_passes, seed=int(s.seed), device=device,
    )  # fmt: skip
    prep = calibration.prepared
    check_stop(should_stop)
    entry_noise = entry_noise_for(calibration, weighting, compact_gram=compact_gram, device=device)

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
    solver = make_solver(s, model)
    solved = fit(
        prep, spots, solver,
        entry_noise=entry_noise, device=device, progress=progress, should_stop=should_stop,
    )  # fmt: skip
    fractions = finish(
        solved, prep, spots, solver, min_proportion=calibration.min_proportion, subtypes=subtypes
    )
    types = prep.cell_types if subtypes is None else subtypes.cell_types
    info = _run_info(s, prep, spots, solver, calibration, train_report, subtypes, weighting)
    info.update(
        cell_types=types,
        overdispersion=None if entry_noise is None else entry_noise.overdispersion,
        gram_storage=_gram_storage(entry_noise),
        seconds=time.perf_counter() - t_start,
    )
    result = _result(adata, prep, fractions, info, model, types)
    report(progress, Stage.DONE, 1, 1)
    return result


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


def _result(adata, prep, fractions, info: dict, model, types) -> DeconvolutionResult:
    """Results with one row per input spot (NaN where a spot got no estimate)."""
    mask = prep.spot_mask
    obs_names = pd.Index(adata.obs_names.astype(str))

    def full(values):
        out = np.full((adata.n_obs, len(types)), np.nan)
        out[mask] = values
        return pd.DataFrame(out, index=obs_names, columns=types)

    cell_df, mrna_df = full(fractions.cell), full(fractions.mrna)
    fit_s = pd.Series(np.nan, index=obs_names, name=FIT_ERROR_KEY)
    fit_s[mask] = fractions.fit_error
    qc = pd.Series(np.where(mask, "ok", "no counts"), index=obs_names, name=QC_KEY)
    result = DeconvolutionResult(
        proportions=cell_df if info["fractions"] == "cell" else mrna_df,
        cell_fractions=cell_df,
        mrna_fractions=mrna_df,
        fit_error=fit_s,
        qc=qc,
        info=info,
        model=model,
    )
    result.adata = _annotated_copy(adata, result)
    return result


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
