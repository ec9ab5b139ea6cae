"""What the slide says about itself before the fit: the per-gene platform effect, the noise
(overdispersion φ), the effective number of cells per spot and the zeroing threshold it implies.

Everything here is measured on a quick first fit (no graph, fixed parameters) of a seeded sample
of spots. The platform effect is an iterated estimate (each pass fits again with the corrected
reference); noise, fitted gene weights and cells per spot then all come from ONE quick fit on the
corrected inputs (:func:`calibrate`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .errors import StlnmfError
from .graph import feature_scale
from .model import DEFAULTS, REFRESH_LAYERS, EntryNoise, UnrolledNMF, finalize_proportions
from .preprocess import (
    Prepared,
    Reference,
    fitted_gene_weights,
    match_gene_identifiers,
    prepare,
    with_platform_effect,
)

if TYPE_CHECKING:
    from .io.counts import FoundCounts
    from .subtypes import Subtypes

__all__ = [
    "AUTO_MIN_PROPORTION",
    "Calibration",
    "FixedCalibration",
    "SlideNoise",
    "auto_min_proportion",
    "calibrate",
    "combined_cells_per_spot",
    "depth_cells_per_spot",
    "effective_cells_per_spot",
    "estimate_noise",
    "estimate_platform_effect",
    "fit_platform_effect",
    "integer_valued",
    "quick_fit",
    "quick_platform_effect",
    "reference_overdispersion",
    "sample_rows",
]

NOISE_SAMPLE_SPOTS = 5000  # spots the noise is measured on
PLATFORM_SAMPLE_SPOTS = 20_000  # gene totals are stable long before 10^6 bins
PLATFORM_PASSES = 2
PLATFORM_REFINE_PASSES = 3
PLATFORM_REFINE_SPOTS = 2_000  # more spots gave the same maps (docs/method.md)
PLATFORM_MIN_PROPORTION = 0.05  # the default output's zeroing, whatever the caller asks for
AUTO_MIN_PROPORTION = (0.05, 0.25)  # floor (~2+ effective cells, or unknown) and cap (one cell)
QUICK_FIT_LAYERS = 50


@dataclass(frozen=True)
class SlideNoise:
    """Noise of the slide beyond the reference's profiles, measured after a first fit.

    ``platform_sigma``: robust spread over genes of log(observed / predicted) slide totals (a
    per-gene platform effect). ``overdispersion``: φ of ``Var(x) = μ/L + φμ²`` (0: Poisson)."""

    platform_sigma: float = 0.0
    overdispersion: float = 0.0

    @property
    def gamma_shape(self) -> float:
        """The same extra-Poisson noise as the shape of a gamma multiplier (inf: none)."""
        return 1.0 / self.overdispersion if self.overdispersion > 0 else float("inf")


@dataclass(frozen=True)
class Calibration:
    """What :func:`calibrate` measured, and the inputs corrected by it."""

    prepared: Prepared  # platform effect corrected; gene weights fitted if asked
    log_platform_factor: np.ndarray | None  # per selected gene; None when not fitted
    noise: SlideNoise | None  # None when nothing needed it
    cells_per_spot: float | None  # effective cells per spot (None: not measurable)
    min_proportion: float  # the zeroing threshold to use
    cells_per_spot_noise: float | None = None  # φ_cells / φ_slide
    cells_per_spot_depth: float | None = None  # spot counts / the reference's counts per cell


def sample_rows(n: int, at_most: int, seed: int) -> np.ndarray:
    """All rows, or a seeded sorted sample of ``at_most`` of them."""
    rows = np.arange(n)
    if n > at_most:
        rows = np.sort(np.random.default_rng(seed).choice(rows, at_most, replace=False))
    return rows


def integer_valued(matrix, at_most: int = 200_000) -> bool:
    """Whether (a sample of) the stored values are whole numbers, as raw counts are."""
    dense = isinstance(matrix, np.ndarray) or not hasattr(matrix, "data")
    values = np.asarray(matrix).ravel() if dense else matrix.data
    values = np.asarray(values[:at_most], dtype=np.float64)
    return bool(np.all(np.abs(values - np.round(values)) < 1e-6))


def quick_fit(prepared: Prepared, rows: np.ndarray, *, device=None) -> np.ndarray:
    """mRNA fractions of ``rows`` (summing to one) from fixed parameters, no graph: the first fit
    the platform effect, the noise and the gene weights are measured on."""
    model = UnrolledNMF(*prepared.B.shape, omega=DEFAULTS.omega_start).to(device)
    V = model.infer(
        prepared.X[rows],
        torch.as_tensor(prepared.B, device=device),
        torch.as_tensor(prepared.gene_weights, device=device),
        None,
        n_layers=QUICK_FIT_LAYERS,
    )
    V = V.cpu().numpy().astype(np.float64)
    return V / np.maximum(V.sum(1, keepdims=True), 1e-12)


def _log_ratio_spread(
    observed: np.ndarray, predicted: np.ndarray, noise_var: np.ndarray
) -> tuple[np.ndarray, float]:
    """Per-gene log(observed / predicted slide total), centred on its median, and its robust
    variance (MAD²) minus the noise part (``noise_var`` per gene): the spread of a per-gene
    platform effect."""
    r = np.log(observed / predicted)
    r = r - np.median(r)
    spread = 1.4826 * float(np.median(np.abs(r)))
    return r, max(spread**2 - float(np.median(noise_var)), 0.0)


def _slide_totals(X, lib: np.ndarray) -> np.ndarray:
    """Σ_s lib_s x_sg without densifying a sparse X."""
    if sp.issparse(X):
        return np.asarray(X.T @ lib).ravel()
    return np.asarray(X, dtype=np.float64).T @ lib


def estimate_platform_effect(
    X,
    library_size: np.ndarray,
    B: np.ndarray,
    V: np.ndarray,
    *,
    min_count: float = 20.0,
    profile_variance: np.ndarray | None = None,
) -> np.ndarray:
    """Per-gene log factor by which the slide's platform measures each gene differently from
    the reference (as RCTD's platform-effect fit), from the slide totals: observed
    ``Σ_s x_sg`` against predicted ``Σ_s lib_s (B V)_sg``.

    Each gene's log ratio is centred and shrunk towards zero by its Poisson noise
    (``r σ² / (σ² + 1/count)``, σ² the spread beyond that noise), so a slide without a platform
    effect gets factors of ~1, and genes with few counts are left alone. ``X`` may be sparse
    (never densified); ``V`` are mRNA fractions over the same genes.

    With ``profile_variance`` (genes x types, the relative sampling variance of B's entries:
    profiles averaged over few reference cells) the prediction's own error joins the noise: it
    is shared by every spot, so no slide size averages it away, and without it a rare type's
    profile error reads as a platform effect on its genes (which then moves every type).
    """
    lib = np.asarray(library_size, dtype=np.float64)
    obs = _slide_totals(X, lib)
    B = np.asarray(B, dtype=np.float64)
    type_totals = np.asarray(V, dtype=np.float64).T @ lib
    pred = B @ type_totals
    ok = (obs >= min_count) & (pred > 0)
    out = np.zeros(obs.size)
    if ok.sum() < 10:
        return out
    noise_var = 1.0 / obs[ok]
    if profile_variance is not None:
        # var of log pred ≈ Σ_t (share of pred from type t)² · relative variance of B_gt
        from_type = B[ok] * type_totals[None, :] / pred[ok][:, None]
        noise_var = noise_var + (from_type**2 * profile_variance[ok]).sum(1)
    r, sigma2 = _log_ratio_spread(obs[ok], pred[ok], noise_var)
    out[ok] = r * sigma2 / (sigma2 + noise_var)
    return np.clip(out, -3.0, 3.0)


def estimate_noise(
    X, library_size: np.ndarray, B: np.ndarray, V: np.ndarray, *, min_mu: float = 2.0
) -> SlideNoise:
    """Noise of the real slide beyond the reference, from a first (untrained) fit.

    ``X`` spots x genes (rows sum to one), ``library_size`` per spot, ``B`` genes x types
    (columns sum to one), ``V`` mRNA fractions. Both parts are measured after the fit has
    absorbed what it can; the excess variance over Poisson is ``E[(x-μ)² - x] = φμ²``.
    """
    lib = np.asarray(library_size, dtype=np.float64)
    V = np.asarray(V, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    tot_o = _slide_totals(X, lib)
    tot_m = B @ (V.T @ lib)
    ok = (tot_o > 20) & (tot_m > 0)
    if ok.sum() < 10:
        return SlideNoise()
    r, sigma2 = _log_ratio_spread(tot_o[ok], tot_m[ok], 1.0 / tot_o[ok])
    sigma = float(np.sqrt(sigma2))
    # remove the platform effect first; the dense spots x genes work is done in place
    factor = np.ones(B.shape[0])
    factor[ok] = np.exp(r)
    Bc = B * factor[:, None]
    obs = X.astype(np.float64).toarray() if sp.issparse(X) else np.array(X, dtype=np.float64)
    obs *= lib[:, None]
    row_scale = obs.sum(1) / np.maximum(V @ Bc.sum(0), 1e-12)
    mu_c = (V * row_scale[:, None]) @ Bc.T
    sel = mu_c >= min_mu
    if sel.sum() < 50:
        return SlideNoise(platform_sigma=sigma)
    resid = np.subtract(obs, mu_c)
    np.square(resid, out=resid)
    resid -= obs
    excess = float(np.sum(resid, where=sel))
    phi = excess / float(np.sum(np.square(mu_c, out=mu_c), where=sel))
    return SlideNoise(platform_sigma=sigma, overdispersion=phi if phi > 1e-6 else 0.0)


def _noise_of_rows(prepared: Prepared, rows: np.ndarray, V: np.ndarray) -> SlideNoise:
    return estimate_noise(prepared.X[rows], prepared.library_size[rows], prepared.B, V)


def reference_overdispersion(
    reference: Reference, *, max_cells: int = 2_000, seed: int = 0
) -> float:
    """φ of single cells around their type's profile, measured as :func:`estimate_noise` measures
    a slide (each cell a "spot" of one type); 0 for a signature-only reference.

    A spot summing n independent cells shows about φ_cell / n of it, so the ratio to the slide's
    φ reads how many cells a spot holds (:func:`effective_cells_per_spot`)."""
    if reference.cell_counts is None:
        return 0.0
    rows = sample_rows(reference.cell_counts.shape[0], max_cells, seed)
    C = reference.cell_counts[rows]
    lib = np.asarray(C.sum(1), dtype=np.float64).ravel()
    keep = lib > 0
    if keep.sum() < 10:
        return 0.0
    C, lib, labels = C[keep], lib[keep], reference.cell_labels[rows][keep]
    B = reference.profiles.to_numpy(np.float64)
    B = B / np.maximum(B.sum(0, keepdims=True), 1e-300)
    V = np.eye(B.shape[1])[labels]
    shares = C.multiply(1.0 / lib[:, None]).tocsr()
    return estimate_noise(shares, lib, B, V).overdispersion


def effective_cells_per_spot(
    cell_overdispersion: float, spot_overdispersion: float
) -> float | None:
    """How many cells a spot holds, read off the noise: summing n independent cells divides
    single cells' overdispersion φ by n (by Σ w² with w the cells' mRNA shares, so big cells
    count more and this is below the head count). None when either φ is not measurable."""
    if cell_overdispersion <= 1e-6 or spot_overdispersion <= 1e-6:
        return None
    return float(cell_overdispersion / spot_overdispersion)


def depth_cells_per_spot(
    library_size: np.ndarray, V: np.ndarray, mrna_content: np.ndarray
) -> float | None:
    """How many cells a spot holds, read off its depth: the spot's counts over the counts per
    cell its fitted mix of types has in the reference (median over spots).

    ``V`` mRNA fractions over the selected genes, ``mrna_content`` the reference's counts per
    cell of each type in those genes, ``library_size`` the spots' counts in them. Exact when
    slide and reference capture molecules equally well (same platform); a capture platform that
    catches fewer molecules per cell than the single-cell reference (Visium against scRNA-seq)
    gives too few. Independent of the noise model behind :func:`effective_cells_per_spot`."""
    content = np.asarray(mrna_content, dtype=np.float64)
    lib = np.asarray(library_size, dtype=np.float64)
    if content.size == 0 or not np.all(np.isfinite(content)) or np.any(content <= 0):
        return None
    cells = np.asarray(V, dtype=np.float64) / content[None, :]
    per_cell = content[None, :] * cells / np.maximum(cells.sum(1, keepdims=True), 1e-300)
    per_cell = per_cell.sum(1)
    ok = (per_cell > 0) & (lib > 0)
    if not ok.any():
        return None
    return float(np.median(lib[ok] / per_cell[ok]))


def combined_cells_per_spot(noise: float | None, depth: float | None) -> float | None:
    """The cells per spot the 'auto' threshold uses: the larger of the noise and the depth
    estimates, so the threshold rises above its floor only when both say spots hold few cells.

    The noise estimate reads too FEW cells whenever the slide's residual holds variance the
    reference's cells do not (cells of a spot sharing a state, another field or stripe of
    tissue, genes whose dispersion differs between cells and spots: seqFISH+ 1.2 against a true
    10.6, osmFISH 2.4 against 5.8); the depth estimate reads too few when the slide's platform
    catches fewer molecules per cell than the reference's. Neither reads too many in those
    cases, so the larger one is the safer. None when the noise is not measurable (the floor)."""
    if noise is None:
        return None
    return noise if depth is None else max(noise, depth)


def auto_min_proportion(cells_per_spot: float | None) -> float:
    """The 'auto' zeroing threshold, ``0.25 / n²`` within [0.05, 0.25]: both the smallest real
    share (1/n) and the noise a spot spreads over absent types (φ ∝ 1/n) grow as spots hold fewer
    cells, so spots of one or two cells (Visium HD bins) lose that noise; spots of ~2+ effective
    cells keep 0.05. Calibrated on simulated slides of 1-12 cells per spot (docs/method.md)."""
    lo, hi = AUTO_MIN_PROPORTION
    if cells_per_spot is None:
        return lo
    return float(np.clip(0.25 / cells_per_spot**2, lo, hi))


# genes per fitted profile below which the per-gene platform factors are not fitted: the
# slide totals identify them only beyond the directions that trade with composition, one per
# profile. Simulated 12-type panels with a true effect (σ 0.3-0.5): at 5 genes per type the
# correction helps (0.061 -> 0.052 mean RMSE), at 3 it is a coin toss (0.077 vs 0.076) and costs
# 10 % without an effect; osmFISH (32 genes, 12 types) loses 0.113 -> 0.127 with it
MIN_GENES_PER_PROFILE_FOR_PLATFORM = 4


def platform_effect_identifiable(n_genes: int, n_profiles: int) -> bool:
    """Whether a slide has enough genes per fitted profile for per-gene platform factors."""
    return n_genes >= MIN_GENES_PER_PROFILE_FOR_PLATFORM * n_profiles


def quick_platform_effect(
    prepared: Prepared, *, seed: int, device=None
) -> tuple[Prepared, np.ndarray]:
    """The platform effect's first estimate (:data:`PLATFORM_PASSES` quick non-spatial fits on
    a seeded sample of spots, no refinement): the corrected inputs and the log factors."""
    rows = sample_rows(prepared.X.shape[0], PLATFORM_SAMPLE_SPOTS, seed)
    X, lib = prepared.X[rows], prepared.library_size[rows]
    log_factor = np.zeros(prepared.B.shape[0])
    current = prepared
    for _ in range(PLATFORM_PASSES):
        V = quick_fit(current, rows, device=device)
        log_factor = log_factor + estimate_platform_effect(
            X, lib, current.B, V, profile_variance=prepared.profile_variance
        )
        current = with_platform_effect(prepared, log_factor)
    return current, log_factor


def fit_platform_effect(
    prepared: Prepared,
    *,
    seed: int,
    refine_with: UnrolledNMF | None,
    refine_passes: int = PLATFORM_REFINE_PASSES,
    device=None,
    quick: tuple[Prepared, np.ndarray] | None = None,
) -> tuple[Prepared, np.ndarray]:
    """Per-gene platform factors from the slide totals (on a seeded sample of spots); returns
    the corrected inputs and the log factors. ``quick``: :func:`quick_platform_effect` of the
    same inputs, seed and device when already computed (it is the first step here).

    First from quick non-spatial fits, then (when ``refine_with`` is given: the shipped
    parameters) refined on that model's per-entry fit with small proportions zeroed: the quick
    fit leaves a little of every absent type in each spot, and summed over the slide that excess
    reads as a platform effect on the genes of those types.

    The fits use fixed parameters, not the ones being fine-tuned, so a saved model reused on
    the same slide sees the same corrected inputs as when it was trained."""
    if quick is None:
        quick = quick_platform_effect(prepared, seed=seed, device=device)
    current, log_factor = quick
    if refine_with is None or refine_passes == 0:
        return current, log_factor
    rows = sample_rows(prepared.X.shape[0], PLATFORM_REFINE_SPOTS, seed)
    X, lib = prepared.X[rows], prepared.library_size[rows]
    phi = _noise_of_rows(current, rows, quick_fit(current, rows, device=device)).overdispersion
    noise = EntryNoise(torch.as_tensor(lib, device=device), phi)
    scale = torch.as_tensor(prepared.gene_weights, device=device)
    refine_with = refine_with.to(device)
    for _ in range(refine_passes):
        B = torch.as_tensor(current.B, device=device)
        V = refine_with.infer(X, B, scale, noise=noise)
        V = V.cpu().numpy().astype(np.float64)
        # zero small transcript shares as the output does, back to shares of the selected genes
        share = current.gene_share[None, :]
        V = finalize_proportions(V / share, PLATFORM_MIN_PROPORTION) * share
        # x ≈ f ⊙ Σ_k (v_k / t_k) B0_k with t_k the type's total after scaling: a fresh estimate
        # of the whole factor against the reference's own profiles
        type_total = (prepared.B.astype(np.float64) * np.exp(log_factor)[:, None]).sum(0)
        V_raw = V / V.sum(1, keepdims=True) / type_total[None, :]
        log_factor = estimate_platform_effect(
            X, lib, prepared.B, V_raw, profile_variance=prepared.profile_variance
        )
        current = with_platform_effect(prepared, log_factor)
    return current, log_factor


def refinement_model(path, prepared: Prepared) -> UnrolledNMF | None:
    """The shipped parameters as the platform refinement uses them (per-entry weights), or None
    when the file is missing."""
    from pathlib import Path

    if not Path(path).exists():
        return None
    model, _ = UnrolledNMF.load(path, genes=list(prepared.genes), n_types=prepared.B.shape[1])
    if model.refresh_layers is None:
        model.refresh_layers = REFRESH_LAYERS
    return model


def calibrate(
    prepared: Prepared,
    reference: Reference,
    *,
    slide_counts,
    gene_weighting: str,
    min_proportion: float | str,
    platform_effect: bool,
    refine_with: UnrolledNMF | None = None,
    refine_passes: int = PLATFORM_REFINE_PASSES,
    seed: int = 0,
    device=None,
    quick_platform: tuple[Prepared, np.ndarray] | None = None,
) -> Calibration:
    """The platform effect (if ``platform_effect``), then ONE quick fit on the corrected inputs
    from which the noise, the fitted gene weights (``gene_weighting='fitted'``) and the effective
    cells per spot (``min_proportion='auto'``) are read.

    ``slide_counts``: the slide's stored values (φ's Poisson part assumes raw counts on both
    sides: scaled or normalised values would fake noise, so then the threshold stays 0.05).
    ``quick_platform``: :func:`quick_platform_effect` of these inputs, seed and device, when the
    caller has it already (the sub-profile test computes it)."""
    log_factor = None
    if platform_effect:
        prepared, log_factor = fit_platform_effect(
            prepared,
            seed=seed,
            refine_with=refine_with,
            refine_passes=refine_passes,
            device=device,
            quick=quick_platform,
        )
    counts_both = (
        reference.cell_counts is not None
        and integer_valued(reference.cell_counts)
        and integer_valued(slide_counts)
    )
    noise = cells_per_spot = by_noise = by_depth = None
    if gene_weighting in ("fitted", "nb") or (min_proportion == "auto" and counts_both):
        rows = sample_rows(prepared.X.shape[0], NOISE_SAMPLE_SPOTS, seed)
        V = quick_fit(prepared, rows, device=device)
        noise = _noise_of_rows(prepared, rows, V)
        if gene_weighting == "fitted":
            X, lib = prepared.X[rows], prepared.library_size[rows]
            prepared = replace(prepared, gene_weights=fitted_gene_weights(X, lib, prepared.B, V))
        if counts_both:  # the reference's own counts, not rescaled by the platform effect
            cell_phi = reference_overdispersion(reference.subset_genes(prepared.genes), seed=seed)
            by_noise = effective_cells_per_spot(cell_phi, noise.overdispersion)
            # the reference's own counts per cell in these genes, as `prepare` has them (the
            # platform effect's rescaling of the content is fitted on the slide itself)
            share = reference.profiles.loc[prepared.genes, prepared.cell_types].sum(0)
            content = (reference.mrna_content[prepared.cell_types] * share).to_numpy(np.float64)
            by_depth = depth_cells_per_spot(prepared.library_size[rows], V, content)
            cells_per_spot = combined_cells_per_spot(by_noise, by_depth)
    if min_proportion == "auto":
        min_proportion = auto_min_proportion(cells_per_spot)
    return Calibration(
        prepared, log_factor, noise, cells_per_spot, float(min_proportion), by_noise, by_depth
    )


@dataclass(frozen=True)
class FixedCalibration:
    """A slide's calibration kept to deconvolve parts of it alike (the tiles of a slide too
    large for one fit, :func:`napari_stlnmf.tiling.deconvolve_tiled`): measured once, on a
    seeded sample of its spots, so that no part's answer depends on which part it is in.

    Holds what the slide-wide steps decide: the genes and the reference (split into
    sub-profiles when they were chosen), the gene weighting, the platform-corrected profiles
    and gene weights, the noise and the zeroing threshold (``calibration``, its slide arrays
    emptied), the image features' scale for the graph, the per-entry Gram scales and the
    over-relaxation ω the fit kept (after damping, if it diverged)."""

    reference: Reference
    subtypes: Subtypes | None
    gene_weighting: str
    calibration: Calibration
    feature_scale: tuple[np.ndarray, np.ndarray] | None
    gram_scales: tuple[float, ...] | None
    info: dict
    omega: float | None = None  # the over-relaxation the sample's fit ended with

    @classmethod
    def of_run(cls, reference, subtypes, weighting, calibration, spots, scale_log, info, omega):
        """What a run on the sample measured (its slide-sized arrays dropped)."""
        prep = calibration.prepared
        bare = replace(
            prep,
            X=prep.X[:0],
            spot_mask=np.zeros(0, bool),
            library_size=np.zeros(0, prep.library_size.dtype),
        )
        scale = None if spots.features is None else feature_scale(spots.features)
        scales = tuple(scale_log) if scale_log else None
        kept = replace(calibration, prepared=bare)
        return cls(reference, subtypes, weighting, kept, scale, scales, info, omega)

    @property
    def genes(self) -> pd.Index:
        return self.calibration.prepared.genes

    def prepare(self, counts: FoundCounts, *, case_insensitive: bool = False) -> Prepared:
        """A part's inputs on the calibration's genes (:func:`~.preprocess.prepare`)."""
        genes, _ = match_gene_identifiers(
            counts.var, self.reference, case_insensitive=case_insensitive
        )
        return prepare(
            counts.matrix,
            genes,
            self.reference,
            case_insensitive=case_insensitive,
            gene_weighting=self.gene_weighting,
            genes=list(self.genes),
        )

    def applied_to(self, prepared: Prepared) -> Calibration:
        """This calibration with ``prepared``'s spots: the corrected profiles, gene weights and
        the per-type contents put in place of the uncorrected ones."""
        cal = self.calibration.prepared
        if not prepared.genes.equals(cal.genes):
            raise StlnmfError("this part of the slide lacks genes of its calibration")
        corrected = replace(
            prepared,
            B=cal.B,
            gene_weights=cal.gene_weights,
            mrna_content=cal.mrna_content,
            gene_share=cal.gene_share,
            profile_variance=cal.profile_variance,
            info={**prepared.info, **{k: v for k, v in cal.info.items() if k not in prepared.info}},
        )
        return replace(self.calibration, prepared=corrected)
