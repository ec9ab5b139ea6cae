"""Simulated slides with known proportions, on the user's own spot layout.

Proportions are spatially smooth and sparse (1 to ~6 types per spot). Counts are sums of
real single cells drawn from the reference (or negative-binomial draws from the signature
when there are no cells), thinned to realistic library sizes, with an optional per-gene
platform effect (the systematic difference between reference and spatial technology).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .preprocess import Reference

__all__ = ["SimulatedSlide", "simulate_counts", "simulate_proportions", "simulate_slide"]

KINDS = ("smooth", "regions", "gradient", "near_pure")


@dataclass
class SimulatedSlide:
    counts: np.ndarray  # spots x genes
    cell_fractions: np.ndarray  # spots x types, realised cell fractions (rows sum to 1)
    mrna_fractions: np.ndarray  # spots x types, share of each type in the spot's mRNA
    n_cells: np.ndarray  # cells per spot
    kind: str


def _random_fields(xy, n_fields, length_scale, rng, n_features=24):
    """Smooth random fields via random Fourier features (O(n) in the number of spots)."""
    omega = rng.normal(size=(n_fields, n_features, 2)) / length_scale
    phase = rng.uniform(0, 2 * np.pi, size=(n_fields, n_features))
    amp = rng.normal(size=(n_fields, n_features)) * np.sqrt(2.0 / n_features)
    proj = np.einsum("nd,tfd->ntf", xy, omega) + phase[None]
    return (np.cos(proj) * amp[None]).sum(2)  # n x fields, ~unit variance


def _kmeans_labels(features, k, rng, n_iter=15):
    f = (features - features.mean(0)) / np.maximum(features.std(0), 1e-6)
    centres = f[rng.choice(len(f), size=k, replace=False)]
    for _ in range(n_iter):
        lab = ((f[:, None, :] - centres[None]) ** 2).sum(2).argmin(1)
        for j in range(k):
            if (lab == j).any():
                centres[j] = f[lab == j].mean(0)
    return lab


def _near_pure_proportions(u, n_types, extent, min_fraction, rng) -> np.ndarray:
    """1-2 types per spot: a region's type plus one minor type with a small random share."""
    n = len(u)
    n_regions = int(min(rng.integers(3, 7), n, max(n_types, 2)))
    centres = u[rng.choice(n, size=n_regions, replace=False)]
    warp = _random_fields(u, 2, extent * 0.3, rng) * extent * 0.05
    w = u + warp
    d2 = ((w[:, None, :] - centres[None]) ** 2).sum(2)
    region = d2.argmin(1)
    # distance (in spot spacings) to the bisector with every other region's centre
    gap = np.linalg.norm(centres[:, None] - centres[None], axis=2)
    to_boundary = (d2 - d2[np.arange(n), region][:, None]) / np.maximum(2 * gap[region], 1e-9)
    to_boundary[np.arange(n), region] = np.inf
    neighbour = to_boundary.argmin(1)
    boundary_distance = to_boundary[np.arange(n), neighbour]
    dominant = rng.choice(n_types, size=n_regions, replace=n_regions > n_types)
    secondary = (dominant + rng.integers(1, max(n_types, 2), size=n_regions)) % n_types
    pure_rate = rng.uniform(0.2, 0.6, size=n_regions)  # spots holding one type only
    max_share = rng.uniform(0.1, 0.35, size=n_regions)
    width = rng.uniform(1.0, 3.0)  # boundary band, spot spacings
    share = rng.uniform(0.0, 1.0, size=n) * max_share[region]
    share[rng.random(n) < pure_rate[region]] = 0.0
    minor = secondary[region]
    near = boundary_distance < width
    # at the boundary both regions' types meet (up to half each)
    blend = 0.5 * (1.0 - boundary_distance / width) * rng.uniform(0.6, 1.0, size=n)
    share = np.where(near, np.maximum(blend, share * 0.5), share)
    minor = np.where(near, dominant[neighbour], minor)
    share = np.where(share >= min_fraction, share, 0.0)
    prob = np.zeros((n, n_types))
    prob[np.arange(n), dominant[region]] = 1.0 - share
    prob[np.arange(n), minor] += share  # minor == dominant (few types) just adds back
    return prob


def simulate_proportions(
    coords,
    n_types: int,
    *,
    kind: str = "smooth",
    spacing: float | None = None,
    max_types_per_spot: int = 6,
    min_fraction: float = 0.05,
    features: np.ndarray | None = None,
    rng=None,
) -> np.ndarray:
    """Spatially smooth, sparse type probabilities per spot (rows sum to one).

    kind
        ``'smooth'``: softmax of smooth random fields (patches and gradients of mixtures);
        ``'regions'``: a few tissue regions, each dominated by one type (near one-hot, as in
        the original paper) — following the image features when given; ``'gradient'``:
        smooth linear trends between types (layered tissue); ``'near_pure'``: 3-6 contiguous
        regions, each spot holding its region's type and at most one other (the region's
        secondary type, or the neighbouring region's type near a boundary): 1-2 types per spot.
    """
    rng = np.random.default_rng(rng)
    xy = np.asarray(coords, dtype=np.float64)[:, :2]
    n = len(xy)
    if spacing is None:
        from .graph import spot_spacing

        spacing = spot_spacing(xy)
    u = (xy - xy.mean(0)) / spacing  # in spot spacings
    extent = max(float(np.ptp(u, axis=0).max()), 1.0)
    if kind == "smooth":
        ls = extent * rng.uniform(0.08, 0.3)
        logits = _random_fields(u, n_types, ls, rng) * rng.uniform(1.5, 4.0)
        logits += rng.normal(scale=0.8, size=n_types)[None]  # types differ in abundance
    elif kind == "regions":
        n_regions = int(rng.integers(3, min(8, max(4, n_types + 1)) + 1))
        if features is not None and rng.random() < 0.5 and n >= n_regions:
            region = _kmeans_labels(np.asarray(features, dtype=np.float64), n_regions, rng)
        else:
            centres = u[rng.choice(n, size=min(n_regions, n), replace=False)]
            warp = _random_fields(u, 2, extent * 0.3, rng) * extent * 0.05
            region = (((u + warp)[:, None, :] - centres[None]) ** 2).sum(2).argmin(1)
        dominant = rng.choice(n_types, size=n_regions, replace=n_regions > n_types)
        logits = rng.normal(scale=1.0, size=(n_regions, n_types))[region]
        logits[np.arange(n), dominant[region]] += rng.uniform(2.0, 4.0)
        logits += _random_fields(u, n_types, extent * 0.15, rng) * 0.7
    elif kind == "gradient":
        direction = rng.normal(size=2)
        direction /= np.linalg.norm(direction)
        s = u @ direction
        s = (s - s.min()) / max(np.ptp(s), 1e-9)
        centres = rng.uniform(-0.2, 1.2, size=n_types)
        width = rng.uniform(0.1, 0.35, size=n_types)
        logits = -((s[:, None] - centres[None]) ** 2) / (2 * width**2)
        logits += _random_fields(u, n_types, extent * 0.2, rng) * 0.5
    elif kind == "near_pure":
        # returned directly: the softmax below would give every type a small share
        return _near_pure_proportions(u, n_types, extent, min_fraction, rng)
    else:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    logits = logits - logits.max(1, keepdims=True)
    prob = np.exp(logits)
    prob /= prob.sum(1, keepdims=True)
    # sparsify: at most max_types_per_spot types, none below min_fraction
    k_max = int(min(max_types_per_spot, n_types))
    if k_max < n_types:
        cut = np.sort(prob, axis=1)[:, -k_max][:, None]
        prob = np.where(prob >= cut, prob, 0.0)
    prob = np.where(prob >= min_fraction, prob, 0.0)
    prob[np.arange(n), prob.argmax(1)] += prob.sum(1) == 0
    return prob / prob.sum(1, keepdims=True)


def simulate_counts(
    probabilities: np.ndarray,
    reference: Reference,
    *,
    mean_cells: float = 8.0,
    library_sizes: np.ndarray | None = None,
    platform_sigma: float = 0.0,
    gamma_shape: float = 5.0,
    rng=None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw cells per spot and their counts.

    Returns ``(counts, cell_fractions, mrna_fractions, n_cells)``. ``library_sizes`` are
    resampled (with jitter) as the spots' total counts; default: 5,000 per spot.
    """
    rng = np.random.default_rng(rng)
    n, p = probabilities.shape
    n_cells = 1 + rng.poisson(max(mean_cells - 1, 0), size=n)
    k = rng.multinomial(n_cells, probabilities)  # cells per spot and type
    cell_fractions = k / k.sum(1, keepdims=True)
    m = reference.profiles.shape[0]
    if reference.cell_counts is not None:
        labels = reference.cell_labels
        members = [np.flatnonzero(labels == t) for t in range(p)]
        spot_idx, cell_idx = [], []
        for t in range(p):
            spots_t = np.repeat(np.arange(n), k[:, t])
            spot_idx.append(spots_t)
            cell_idx.append(members[t][rng.integers(0, members[t].size, size=spots_t.size)])
        spot_idx = np.concatenate(spot_idx)
        cell_idx = np.concatenate(cell_idx)
        S = sp.csr_matrix(
            (np.ones(spot_idx.size, dtype=np.float32), (spot_idx, cell_idx)),
            shape=(n, reference.cell_counts.shape[0]),
        )
        expr = np.asarray((S @ reference.cell_counts).todense(), dtype=np.float64)
        lib = np.asarray(reference.cell_counts.sum(1)).ravel()
        type_mrna = np.zeros((n, p))
        np.add.at(type_mrna, (spot_idx, labels[cell_idx]), lib[cell_idx])
    else:
        prof = reference.profiles.to_numpy()
        content = reference.mrna_content.to_numpy()
        type_mrna = k * content[None, :]
        mu = type_mrna @ prof.T
        expr = mu * rng.gamma(gamma_shape, 1.0 / gamma_shape, size=mu.shape)
    mrna_fractions = type_mrna / np.maximum(type_mrna.sum(1, keepdims=True), 1e-12)
    if platform_sigma > 0:
        expr = expr * np.exp(rng.normal(scale=platform_sigma, size=m))[None, :]
    total = np.maximum(expr.sum(1), 1e-12)
    if library_sizes is None or len(library_sizes) == 0:
        target = np.full(n, 5000.0)
    else:
        target = rng.choice(np.asarray(library_sizes, dtype=np.float64), size=n)
        target = target * np.exp(rng.normal(scale=0.1, size=n))
    counts = rng.poisson(expr * (target / total)[:, None]).astype(np.float32)
    return counts, cell_fractions, mrna_fractions, n_cells


def simulate_slide(
    coords,
    reference: Reference,
    *,
    kind: str = "smooth",
    features=None,
    library_sizes=None,
    mean_cells: float = 8.0,
    platform_sigma: float = 0.0,
    max_types_per_spot: int = 6,
    spacing: float | None = None,
    gamma_shape: float = 5.0,
    seed=None,
) -> SimulatedSlide:
    """A slide on ``coords`` with known cell and mRNA fractions."""
    rng = np.random.default_rng(seed)
    prob = simulate_proportions(
        coords,
        len(reference.cell_types),
        kind=kind,
        spacing=spacing,
        max_types_per_spot=max_types_per_spot,
        features=features,
        rng=rng,
    )
    counts, cf, mf, nc = simulate_counts(
        prob,
        reference,
        mean_cells=mean_cells,
        library_sizes=library_sizes,
        platform_sigma=platform_sigma,
        gamma_shape=gamma_shape,
        rng=rng,
    )
    return SimulatedSlide(counts, cf, mf, nc, kind)
