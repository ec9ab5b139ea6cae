"""Accuracy metrics for estimated proportions (rows = spots, columns = cell types)."""

from __future__ import annotations

import numpy as np


def _pair(estimate, truth) -> tuple[np.ndarray, np.ndarray]:
    est = np.asarray(estimate, dtype=np.float64)
    tru = np.asarray(truth, dtype=np.float64)
    if est.shape != tru.shape:
        raise ValueError(f"estimate has shape {est.shape} but truth has shape {tru.shape}")
    return est, tru


def rmse(estimate, truth) -> float:
    """Root mean squared error over all spots and cell types."""
    est, tru = _pair(estimate, truth)
    return float(np.sqrt(np.mean((est - tru) ** 2)))


def relative_frobenius_error(estimate, truth) -> float:
    """``||estimate - truth||_F / ||truth||_F`` (the original paper's score)."""
    est, tru = _pair(estimate, truth)
    return float(np.linalg.norm(est - tru) / np.linalg.norm(tru))


def jensen_shannon(estimate, truth, *, eps: float = 1e-12) -> np.ndarray:
    """Per-spot Jensen-Shannon divergence (natural log, in [0, ln 2])."""
    est, tru = _pair(estimate, truth)
    p = est / np.maximum(est.sum(1, keepdims=True), eps)
    q = tru / np.maximum(tru.sum(1, keepdims=True), eps)
    m = 0.5 * (p + q)

    def kl(a, b):
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(a > 0, a * np.log(a / np.maximum(b, eps)), 0.0)
        return t.sum(1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def mean_jensen_shannon(estimate, truth) -> float:
    """Mean per-spot Jensen-Shannon divergence."""
    return float(np.mean(jensen_shannon(estimate, truth)))


def pearson_per_type(estimate, truth) -> np.ndarray:
    """Pearson r between estimate and truth for each cell type (NaN for constant columns)."""
    est, tru = _pair(estimate, truth)
    e = est - est.mean(0)
    t = tru - tru.mean(0)
    den = np.sqrt((e**2).sum(0) * (t**2).sum(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, (e * t).sum(0) / den, np.nan)


def score(estimate, truth) -> dict[str, float]:
    """All metrics in one dict: rmse, jsd (mean per spot), pearson (mean over types) and
    rel_frobenius."""
    return {
        "rmse": rmse(estimate, truth),
        "jsd": mean_jensen_shannon(estimate, truth),
        "pearson": float(np.nanmean(pearson_per_type(estimate, truth))),
        "rel_frobenius": relative_frobenius_error(estimate, truth),
    }
