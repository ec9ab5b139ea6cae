"""Sub-profiles of the reference's cell types, used only when the slide says they fit it better.

A labelled cell type is often a collapsed class of states (pyramidal neurons of every cortical
layer, say). A spot holds cells of ONE state of it, so the type's average profile misfits the
spot and the fit reaches for other types to make up the difference (osmFISH: hippocampal neurons
called at 0.29 in cortex, true 0.03). Splitting each type of a single-cell reference into a few
k-means sub-profiles lets the fit pick the state; the sub-types' fractions are summed back into
their type at the end. Splitting a homogeneous type only adds noise, so whether to split is
decided on the slide itself (:func:`choose_subtypes`): the resolution whose fit better predicts
genes held out of the fit (Poisson deviance, genes split in two folds) is used.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .preprocess import Prepared, Reference, gene_weights_for

__all__ = [
    "SUBTYPE_MARK",
    "HeldoutFolds",
    "Subtypes",
    "candidate_splits",
    "cell_features",
    "choose_subtypes",
    "heldout_deviance",
    "heldout_folds",
    "merge_subtypes",
    "split_cell_types",
]

SUBTYPE_MARK = "#"  # sub-type name: f"{type}{SUBTYPE_MARK}{j}"
MAX_SUBTYPES = 4  # sub-profiles per type at most
MIN_SUBTYPE_CELLS = 25  # cells per sub-profile at least (fewer: the type is not split)
MAX_FIT_CELLS = 2_000  # cells per type k-means is fitted on (the rest are assigned)
KMEANS_RESTARTS = 8  # k-means runs per type; the one of least within-cluster spread is kept
KMEANS_COMPONENTS = 30  # k-means runs on the type's top principal components of its cells
MIN_T = 2.0  # one-sided evidence (t of the per-spot deviance gain) for the sub-profiles
# and a gain worth the extra profiles: splits of homogeneous types reached 0.997 at t 3.3 and
# fitted worse (demo 0.0384 -> 0.0392); types made of states gave 0.56-0.90
MAX_DEVIANCE_RATIO = 0.99
# a sub-type's mRNA per cell: the geometric mean of its own cells' and its type's (weight of its
# own). Its own alone put cell-size noise into the cell fractions on real tissue (the splits
# follow expression state, clustered on depth-sensitive shares: osmFISH 0.1132 with the type's,
# 0.1288 with its own); the type's alone loses where states do differ in size (simulated states
# slide 0.0422 -> 0.0466); half each: 0.1155 and 0.0430
OWN_CONTENT_WEIGHT = 0.5
CV_SPOTS = 2_000  # spots the held-out deviance is measured on (paired t: plenty of power)
CANDIDATE_SPLITS = 3  # k-means splits (seeds) compared on the held-out genes


@dataclass(frozen=True)
class Subtypes:
    """A reference of sub-profiles and how they fold back into the user's cell types."""

    reference: Reference  # one profile per sub-type
    parent: np.ndarray  # per sub-type, the index of its cell type in `cell_types`
    cell_types: list[str]  # the user's cell types
    deviance_ratio: float  # held-out deviance with sub-profiles / without
    t_statistic: float  # of the per-spot gain (positive: the sub-profiles predict better)

    def as_dict(self) -> dict:
        return {
            "n_profiles": len(self.reference.cell_types),
            "deviance_ratio": self.deviance_ratio,
            "t_statistic": self.t_statistic,
        }


def _log_shares(counts: sp.csr_matrix) -> np.ndarray:
    lib = np.maximum(np.asarray(counts.sum(1)).ravel(), 1.0)
    return np.log1p(np.asarray((sp.diags(1.0 / lib) @ counts).todense()) * 1e3)


def _principal_components(features: np.ndarray, fit: np.ndarray, rng) -> np.ndarray:
    """All cells projected on the top ``KMEANS_COMPONENTS`` principal axes of the ``fit`` cells
    (randomised range finder, two power iterations): k-means in 30 dimensions instead of one
    per marker is ~5x faster for small types and ~60x for 2,000 cells of 1,500 genes, and the
    dropped axes are mostly noise."""
    n_comp = min(KMEANS_COMPONENTS, fit.size - 1)
    if features.shape[1] <= 2 * KMEANS_COMPONENTS or n_comp >= fit.size - 1:
        return features  # small panels or types: little to gain
    centre = features[fit].mean(0)
    A = features[fit] - centre
    Q = A @ rng.standard_normal((A.shape[1], n_comp + 10))
    for _ in range(2):
        Q, _ = np.linalg.qr(A @ (A.T @ np.linalg.qr(Q)[0]))
    _, _, axes = np.linalg.svd(Q.T @ A, full_matrices=False)
    return (features - centre) @ axes[:n_comp].T


def _kmeans(features: np.ndarray, k: int, seed: int) -> np.ndarray:
    from scipy.cluster.vq import kmeans2

    rng = np.random.default_rng(seed)
    fit = np.arange(features.shape[0])
    if fit.size > MAX_FIT_CELLS:
        fit = np.sort(rng.choice(fit, MAX_FIT_CELLS, replace=False))
    features = _principal_components(features, fit, rng)
    best, best_spread = None, np.inf
    for run in range(KMEANS_RESTARTS):
        with warnings.catch_warnings():  # an empty cluster: this run just loses to another
            warnings.simplefilter("ignore", UserWarning)
            centroids, label = kmeans2(features[fit], k, minit="++", seed=seed * 1000 + run)
        spread = float(((features[fit] - centroids[label]) ** 2).sum())
        if spread < best_spread:
            best, best_spread = centroids, spread
    d = ((features[:, None, :] - best[None]) ** 2).sum(2)
    return d.argmin(1)


def cell_features(reference: Reference, genes) -> np.ndarray:
    """Each reference cell's log shares (``log1p(1e3 · count / cell total)``) of those of
    ``genes`` the reference has: what :func:`split_cell_types` clusters (cells x genes, dense)."""
    if reference.cell_counts is None:
        raise ValueError("sub-profiles need a single-cell reference")
    pos = reference.profiles.index.get_indexer(pd.Index(genes))
    return _log_shares(reference.cell_counts[:, pos[pos >= 0]])


def split_cell_types(
    reference: Reference,
    genes,
    *,
    max_per_type: int = MAX_SUBTYPES,
    min_cells: int = MIN_SUBTYPE_CELLS,
    seed: int = 0,
    features: np.ndarray | None = None,
) -> tuple[Reference, np.ndarray]:
    """Each type of a single-cell reference split into ``min(max_per_type, n_cells // min_cells)``
    k-means sub-profiles (log shares of ``genes``, e.g. the selected markers); returns the
    reference of sub-types (named ``type#j``; types too small to split keep their name) and each
    sub-type's parent index. ``features``: :func:`cell_features` of ``reference`` and ``genes``,
    computed here when not given (several splits of one reference can share them)."""
    if reference.cell_counts is None:
        raise ValueError("sub-profiles need a single-cell reference")
    counts, labels = reference.cell_counts, reference.cell_labels
    if features is None:
        features = cell_features(reference, genes)
    code = np.empty(labels.size, dtype=np.int64)
    names, parent = [], []
    for t, name in enumerate(reference.cell_types):
        idx = np.flatnonzero(labels == t)
        k = int(min(max_per_type, idx.size // min_cells))
        sub = _kmeans(features[idx], k, seed) if k > 1 else np.zeros(idx.size, dtype=np.int64)
        used = np.unique(sub)
        for j in used:
            code[idx[sub == j]] = len(names)
            names.append(name if used.size == 1 else f"{name}{SUBTYPE_MARK}{j}")
            parent.append(t)
    n = len(names)
    n_cells = np.bincount(code, minlength=n)
    member = sp.csr_matrix((np.ones(code.size), (code, np.arange(code.size))), shape=(n, code.size))
    member = sp.diags(1.0 / n_cells) @ member
    lib = np.asarray(counts.sum(1)).ravel()
    profiles = np.asarray((member @ (sp.diags(1.0 / lib) @ counts)).todense()).T
    split = Reference(
        profiles=pd.DataFrame(profiles, index=reference.profiles.index, columns=names),
        mrna_content=pd.Series(
            reference.mrna_content[reference.cell_types].to_numpy()[parent]
            ** (1 - OWN_CONTENT_WEIGHT)
            * np.asarray(member @ lib).ravel() ** OWN_CONTENT_WEIGHT,
            index=names,
        ),
        cell_counts=counts,
        cell_labels=code,
        variance_to_mean=reference.variance_to_mean,
    )
    return split, np.asarray(parent, dtype=np.int64)


@dataclass(frozen=True)
class HeldoutFolds:
    """The slide's sampled spots split by gene folds once, for several :func:`heldout_deviance`
    calls (slicing a CSR matrix by columns costs more than the fits on it)."""

    genes: tuple  # per fold: (training genes, held-out genes)
    fit_inputs: tuple  # per fold: the training genes' counts as the quick fit takes them
    libraries: tuple  # per fold: each spot's total on the training genes (>= 1)
    held_out: tuple  # per fold: dense counts of the held-out genes


def heldout_folds(prepared: Prepared, *, folds: int = 2, seed: int = 0) -> HeldoutFolds:
    """:class:`HeldoutFolds` of ``prepared`` (:data:`CV_SPOTS` seeded spots, genes dealt into
    ``folds`` folds at random)."""
    from .calibration import sample_rows

    rows = sample_rows(prepared.X.shape[0], CV_SPOTS, seed)
    X = prepared.X[rows].multiply(prepared.library_size[rows][:, None]).tocsr()
    fold = np.random.default_rng(seed).permutation(X.shape[1]) % folds
    genes, fit_inputs, libraries, held_out = [], [], [], []
    for f in range(folds):
        train, test = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        Xt = X[:, train]
        lib = np.asarray(Xt.sum(1)).ravel()
        genes.append((train, test))
        fit_inputs.append(sp.csr_matrix(Xt.multiply(1.0 / np.maximum(lib, 1.0)[:, None])))
        libraries.append(np.maximum(lib, 1.0))
        held_out.append(np.asarray(X[:, test].todense(), dtype=np.float64))
    return HeldoutFolds(tuple(genes), tuple(fit_inputs), tuple(libraries), tuple(held_out))


def heldout_deviance(
    prepared: Prepared,
    B: np.ndarray,
    *,
    folds: int = 2,
    seed: int = 0,
    split: HeldoutFolds | None = None,
):
    """Per-spot Poisson deviance of genes held out of the fit: for each fold of ``prepared``'s
    genes, mRNA shares are fitted on the other genes' counts (the quick fit, 'sqrt' weights) and
    predict the held-out genes' counts (scaled to the spot's total on them). ``B`` genes x
    profiles on ``prepared.genes`` (columns need not sum to one). ``split``: the folds
    (:func:`heldout_folds` with ``folds`` and ``seed``), made here when not given."""
    from .calibration import quick_fit

    if split is None:
        split = heldout_folds(prepared, folds=folds, seed=seed)
    B = np.asarray(B, dtype=np.float64)
    deviance = np.zeros(split.held_out[0].shape[0])
    for (train, test), Xt, lib, Y in zip(
        split.genes, split.fit_inputs, split.libraries, split.held_out, strict=True
    ):
        total = np.maximum(B[train].sum(0), 1e-300)
        Bt = (B[train] / total).astype(np.float32)
        part = replace(
            prepared, X=Xt, B=Bt, gene_weights=gene_weights_for(Bt, "sqrt"), library_size=lib
        )
        V = quick_fit(part, np.arange(Xt.shape[0]))
        pred = (V / total[None, :]) @ B[test].T
        mu = Y.sum(1, keepdims=True) * pred / np.maximum(pred.sum(1, keepdims=True), 1e-300)
        mu = np.maximum(mu, 1e-9)
        ylogy = np.where(Y > 0, Y * np.log(np.where(Y > 0, Y, 1.0) / mu), 0.0)
        deviance += 2.0 * (ylogy - (Y - mu)).sum(1)
    return deviance


def candidate_splits(reference: Reference, genes, *, seed: int = 0) -> tuple:
    """The :data:`CANDIDATE_SPLITS` k-means splits :func:`choose_subtypes` compares
    (:func:`split_cell_types` with seeds ``seed * CANDIDATE_SPLITS + j``), each with its parents;
    kept on the reference (:meth:`~.preprocess.Reference.memo`) for the next slide with the same
    ``genes`` and ``seed``: they depend on nothing else, and cost about a quarter of a
    Visium slide's fit."""

    def compute():
        features = cell_features(reference, genes)  # slicing the cells' genes: once for all
        return tuple(
            split_cell_types(reference, genes, seed=seed * CANDIDATE_SPLITS + j, features=features)
            for j in range(CANDIDATE_SPLITS)
        )

    key = ("candidate_splits", tuple(str(g) for g in genes), int(seed))
    return reference.memo(key, compute)


def choose_subtypes(
    prepared: Prepared,
    reference: Reference,
    *,
    log_platform_factor: np.ndarray | None = None,
    seed: int = 0,
    min_t: float = MIN_T,
    max_ratio: float = MAX_DEVIANCE_RATIO,
) -> Subtypes | None:
    """Sub-profiles of the reference's types (:func:`split_cell_types` on ``prepared``'s genes;
    of a few k-means splits, the one whose fit best predicts the slide's held-out genes) if they
    predict those genes better than the types' profiles (:func:`heldout_deviance`, paired over
    spots, t ≥ ``min_t``) by a margin worth the extra profiles (deviance ratio ≤ ``max_ratio``);
    else None (also for a signature table, or when no type is large enough to split).

    ``log_platform_factor`` (per gene of ``prepared``, from the types' profiles) rescales both
    sets of profiles first: uncorrected, a platform effect is misfit that more profiles absorb
    (a 10-type slide with σ 0.7 chose sub-profiles and lost 12 %)."""
    factor = 1.0 if log_platform_factor is None else np.exp(log_platform_factor)[:, None]
    if reference.cell_counts is None or reference.cell_labels is None:
        return None
    coarse = reference.profiles.loc[prepared.genes, prepared.cell_types].to_numpy(np.float64)
    coarse = coarse * factor
    folds = heldout_folds(prepared, seed=seed)
    d_coarse = heldout_deviance(prepared, coarse, split=folds)
    splits = candidate_splits(reference, prepared.genes, seed=seed)
    if len(splits[0][0].cell_types) == len(reference.cell_types):
        return None  # no type is large enough to split
    best = None
    for split, parent in splits:
        fine = split.profiles.loc[prepared.genes].to_numpy(np.float64) * factor
        d_fine = heldout_deviance(prepared, fine, split=folds)
        if best is None or d_fine.sum() < best[2].sum():
            best = (split, parent, d_fine)
    split, parent, d_fine = best
    gain = d_coarse - d_fine
    sd = float(gain.std(ddof=1)) if gain.size > 1 else 0.0
    t = float(gain.mean() / (sd / np.sqrt(gain.size))) if sd > 0 else 0.0
    ratio = float(d_fine.sum() / max(d_coarse.sum(), 1e-300))
    if t < min_t or ratio > max_ratio:
        return None
    return Subtypes(split, parent, list(reference.cell_types), ratio, t)


def merge_subtypes(values: np.ndarray, parent: np.ndarray, n_types: int) -> np.ndarray:
    """Sub-types' columns summed into their types' (spots x sub-types -> spots x types)."""
    fold = np.zeros((parent.size, n_types))
    fold[np.arange(parent.size), parent] = 1.0
    return np.asarray(values, dtype=np.float64) @ fold
