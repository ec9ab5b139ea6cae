"""Per-spot, per-type uncertainty intervals (issue 20, must-have 1): ``deconvolve(...,
uncertainty=True)``.

**Method: parametric bootstrap of the counts, re-running the fit.** From the fit, each spot's
expected counts over the genes used are ``μ = L · B v̂`` (``L`` the spot's counts on those genes,
``B`` the platform-corrected signatures the fit used, ``v̂`` its fitted mRNA shares). Each draw
takes new counts ``x* ~ NB(μ, φ)`` (``Var = μ + φμ²``, gamma-Poisson; φ the slide's
overdispersion as calibrated on its first fit, Poisson where the run measured none), scales them
as the pipeline does and re-runs **the same solver** on them — same B, gene weights, spot graph
and learned parameters, no re-training, no re-calibration, no re-selection of genes or
sub-profiles — then the same conversion to cell fractions. The draws' spread is the spread the
estimator itself shows on counts like these, so it includes what the map's spatial smoothing and
sum-to-one penalty do to the noise (a per-spot solve would not). Why this and not an analytic
interval: the unrolled estimator has no closed-form variance, and the noise model is the one the
fit already weights its data with, so the draws are honest about the model actually used.

**Interval.** Draws are taken without the ``min_proportion`` zeroing (it is a reporting step: a
proportion zeroed at 0.05 can be up to 0.05). Per spot and type, the draws' lower and upper
``(1 ± level)/2`` quantiles are measured from their median (so the estimator's bias under the
model is not counted as spread) and combined in quadrature with a model error ``z·τ`` (``z`` the
normal quantile of the level, ``τ`` = :data:`MODEL_SD` of the reported fractions, below):
``lower = p − sqrt(d_lo² + (zτ)²)``, ``upper = p + sqrt(d_hi² + (zτ)²)`` around the reported
proportion ``p``, clipped to [0, 1]. So every interval contains the point estimate, and a
proportion reported as zero gets ``[0, ~zτ]``.

**Calibration.** Count noise is not all the error: the cells in a spot vary in size and state
around the reference's means, the platform effect is estimated, the reference comes from other
cells. The bootstrap cannot see these, so its intervals alone cover the truth less often than
stated (at a stated 90 % on the training simulations: 0.49 of cell fractions, 0.74 of mRNA
fractions). ``τ`` is one extra standard deviation per proportion, the same for every spot and
type, that makes the stated coverage match at 50, 80 and 90 % (least squares) on training
simulations (seeds 0-5, ``smooth`` and ``regions`` slides of 6-10 types at 1,000-10,000 counts
per spot): 0.056 for cell fractions (they also carry the spread of cell sizes), 0.024 for mRNA
fractions. On held-out seeds and kinds (gradients, near-pure regions, platform effects, 1-2-cell
bins, the bundled demo) the coverage stays within a few percent of the stated level; on the real
seqFISH+ and osmFISH sets, whose errors are twice the simulations', it falls short
(``benchmarks/uncertainty_calibration.py``; table in ``docs/benchmarks.md``). Coverage is
counted over the entries where the type is present in the truth or the estimate: a type absent
from both is covered by any interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ._constants import UNCERTAINTY_DRAWS, UNCERTAINTY_LEVEL
from .errors import StlnmfError

__all__ = [
    "DEFAULT_DRAWS",
    "DEFAULT_LEVEL",
    "MODEL_SD",
    "Uncertainty",
    "check_uncertainty_options",
    "combined_uncertainty",
    "interval_from_draws",
    "library_uncertainty",
    "resample_fractions",
]

DEFAULT_DRAWS = UNCERTAINTY_DRAWS
DEFAULT_LEVEL = UNCERTAINTY_LEVEL
# τ: the model error added in quadrature to the bootstrap spread, per proportion, learnt on
# training simulations for cell and for mRNA fractions (benchmarks/uncertainty_calibration.py)
MODEL_SD = {"cell": 0.056, "mrna": 0.024}
_CHUNK_ENTRIES = 4_000_000  # spots x genes per dense block of expected counts


@dataclass
class Uncertainty:
    """Intervals of ``result.proportions``: ``lower`` and ``upper`` (spots x types DataFrames,
    NaN where a spot has no estimate), the stated ``level``, the number of draws and what the run
    used (``info``)."""

    lower: pd.DataFrame
    upper: pd.DataFrame
    level: float
    n_draws: int
    info: dict = field(default_factory=dict)

    @property
    def width(self) -> pd.DataFrame:
        return self.upper - self.lower


def check_uncertainty_options(uncertainty, draws, level) -> None:
    """``uncertainty`` a bool, ``draws`` an integer >= 2, ``level`` a number in (0, 1)."""
    from .checks import is_integer, is_number

    if not isinstance(uncertainty, (bool, np.bool_)):
        raise StlnmfError(
            f"uncertainty must be True or False, not {uncertainty!r}; set the number of draws "
            "with uncertainty_draws= and the interval's level with uncertainty_level="
        )
    if not is_integer(draws) or draws < 2 or draws > 10_000:
        raise StlnmfError(
            f"uncertainty_draws must be an integer from 2 to 10000 (default {DEFAULT_DRAWS}: "
            f"more draws, steadier interval ends), not {draws!r}"
        )
    if not is_number(level) or not math.isfinite(level) or not 0 < level < 1:
        raise StlnmfError(
            f"uncertainty_level must be a number strictly between 0 and 1 (e.g. 0.9 for 90 % "
            f"intervals), not {level!r}"
        )


def _draw_counts(mean_rows, phi: float, rng: np.random.Generator) -> np.ndarray:
    """NB(μ, φ) counts as gamma-Poisson (Poisson at φ = 0)."""
    if phi > 0:
        mean_rows = mean_rows * rng.gamma(1.0 / phi, phi, size=mean_rows.shape)
    return rng.poisson(mean_rows).astype(np.float32)


def _resampled_prepared(prepared, V: np.ndarray, phi: float, rng):
    """The prepared inputs with new counts drawn from the fitted model (rows scaled to sum to
    one, as :func:`~napari_stlnmf.preprocess.prepare` scales them)."""
    B = np.asarray(prepared.B, dtype=np.float64)
    L = np.asarray(prepared.library_size, dtype=np.float64)
    n, m = V.shape[0], B.shape[0]
    step = max(1, _CHUNK_ENTRIES // max(m, 1))
    blocks, totals = [], np.empty(n)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        mu = (V[rows] @ B.T) * L[rows, None]
        x = _draw_counts(np.maximum(mu, 0.0), phi, rng)
        empty = np.flatnonzero(x.sum(1) <= 0)
        if empty.size:  # a draw left a spot without counts: it keeps its observed counts
            observed = prepared.X[start + empty].toarray() * L[start + empty, None]
            x[empty] = observed
        totals[rows] = x.sum(1)
        blocks.append(sp.csr_matrix(x))
    counts = sp.vstack(blocks, format="csr")
    X = (sp.diags(1.0 / totals) @ counts).astype(np.float32).tocsr()
    return replace(prepared, X=X, library_size=totals.astype(prepared.library_size.dtype))


def resample_fractions(
    prepared,
    V,
    spots,
    solver,
    *,
    overdispersion: float,
    entry_noise=None,
    subtypes=None,
    n_draws: int = DEFAULT_DRAWS,
    fractions: str = "cell",
    seed: int = 0,
    device=None,
    progress=None,
    should_stop=None,
) -> np.ndarray:
    """``n_draws`` x spots x types (float32): the fit re-run on counts drawn from the fitted
    model, as unzeroed cell (or mRNA, ``fractions='mrna'``) fractions of the output types.

    ``V``: the fit's mRNA shares over the selected genes (rows sum to one); ``overdispersion``:
    φ of the draws (0: Poisson); ``entry_noise``: the fit's per-entry weights, if it used them
    (re-formed from each draw's library sizes). Seeded by ``seed`` alone."""
    from .pipeline import finish, fit
    from .progress import Stage, check_stop, report
    from .updates import EntryNoise

    V = np.asarray(V, dtype=np.float64)
    V = V / np.maximum(V.sum(1, keepdims=True), 1e-300)
    phi = max(float(overdispersion or 0.0), 0.0)
    rng = np.random.default_rng([int(seed), 20])
    out = None
    for b in range(n_draws):
        report(progress, Stage.UNCERTAINTY, b, n_draws)
        check_stop(should_stop)
        drawn = _resampled_prepared(prepared, V, phi, rng)
        noise = None
        if entry_noise is not None:
            library = torch.as_tensor(drawn.library_size, device=entry_noise.library_size.device)
            noise = EntryNoise(library, entry_noise.overdispersion, entry_noise.compact_gram)
        solved = fit(drawn, spots, solver, entry_noise=noise, device=device)
        f = finish(solved, drawn, spots, solver, min_proportion=0.0, subtypes=subtypes)
        values = f.cell if fractions == "cell" else f.mrna
        if out is None:
            out = np.empty((n_draws, *values.shape), dtype=np.float32)
        out[b] = values
    return out


def interval_from_draws(
    point: np.ndarray, draws: np.ndarray, level: float, model_sd: float = MODEL_SD["cell"]
) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper ends (see the module docstring): the draws' ``(1 ± level)/2`` quantiles
    measured from their median, each combined in quadrature with ``z·model_sd``, around
    ``point`` (the reported proportions), clipped to [0, 1]."""
    from scipy.stats import norm

    q_lo, med, q_hi = np.quantile(draws, [(1 - level) / 2, 0.5, (1 + level) / 2], axis=0)
    extra = (norm.ppf((1 + level) / 2) * model_sd) ** 2
    point = np.asarray(point, dtype=np.float64)
    lower = point - np.sqrt((med - q_lo) ** 2 + extra)
    upper = point + np.sqrt((q_hi - med) ** 2 + extra)
    return np.clip(lower, 0.0, point), np.clip(upper, point, 1.0)


def library_uncertainty(
    prepared, solved, spots, solver, calibration, fractions, settings, *,
    entry_noise=None, subtypes=None, device=None, progress=None, should_stop=None,
) -> tuple[np.ndarray, np.ndarray, dict]:  # fmt: skip
    """The driver's call on one library: lower and upper ends (fitted spots x output types) of
    the reported proportions (``fractions``: the run's :class:`~.pipeline.Fractions`), and the
    plain numbers of the run info."""
    from .calibration import estimate_noise

    V = solved.V.detach().cpu().numpy().astype(np.float64)
    noise = calibration.noise
    if noise is None:
        noise = estimate_noise(prepared.X, prepared.library_size, prepared.B, V)
    phi = max(float(noise.overdispersion or 0.0), 0.0)
    which = settings.fractions
    draws = resample_fractions(
        prepared, V, spots, solver,
        overdispersion=phi, entry_noise=entry_noise, subtypes=subtypes,
        n_draws=int(settings.uncertainty_draws), fractions=which, seed=int(settings.seed),
        device=device, progress=progress, should_stop=should_stop,
    )  # fmt: skip
    reported = fractions.cell if which == "cell" else fractions.mrna
    level = float(settings.uncertainty_level)
    lower, upper = interval_from_draws(reported, draws, level, MODEL_SD[which])
    info = {
        "method": "parametric bootstrap (NB(B v, phi) counts, the fit re-run on each draw) "
        "+ calibrated model error in quadrature",
        "level": level,
        "n_draws": int(settings.uncertainty_draws),
        "overdispersion": phi,
        "model_sd": MODEL_SD[which],
        "median_width": float(np.median(upper - lower)) if upper.size else 0.0,
    }
    return lower, upper, info


def combined_uncertainty(fits, obs_names: pd.Index, types: list[str], settings) -> Uncertainty:
    """Each library's intervals at its spots of the slide (NaN elsewhere)."""
    lower = np.full((len(obs_names), len(types)), np.nan)
    upper = np.full_like(lower, np.nan)
    info = {}
    for library, f in fits:
        if f.uncertainty is None:
            continue
        kept = np.flatnonzero(library.rows)[f.prep.spot_mask]
        columns = [types.index(t) for t in f.types]
        lo, hi, info = f.uncertainty
        lower[np.ix_(kept, columns)] = lo
        upper[np.ix_(kept, columns)] = hi
    return Uncertainty(
        pd.DataFrame(lower, index=obs_names, columns=types),
        pd.DataFrame(upper, index=obs_names, columns=types),
        level=float(settings.uncertainty_level),
        n_draws=int(settings.uncertainty_draws),
        info=info,
    )
