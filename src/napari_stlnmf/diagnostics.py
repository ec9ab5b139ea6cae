"""Where the reference cannot explain the slide (issue 20, must-have 2): ``deconvolve(...,
diagnose=True)``.

**The scale.** Per spot, the negative-binomial deviance of the fit over the diagnostic genes
(the genes the fit used, plus the slide's most variable genes up to :data:`MAX_GENES` in all,
predicted from the fitted mRNA fractions re-estimated for the spot alone on these genes — 20
Poisson maximum-likelihood updates from the fit's, so that neither the map's spatial smoothing
nor the genes it was not fitted on count as misfit — and the reference's profiles) is compared
with its expectation under the fitted noise model: each entry's deviance has a mean and variance
computed exactly from NB(μ, φ) at its fitted mean (φ: the slide's overdispersion measured on a
first fit), summed over genes, so ``z_model = (D − E[D]) / sd[D]`` is a z-score under the model.
The flag uses the spot *with its graph neighbours* (their D, E[D] and Var[D] summed): a
population missing from the reference fills patches of spots, the composition noise of a spot of
few cells does not. ``z_model`` is then re-centred on the slide: a normal is fitted to its lower
quartile (5th and 25th percentiles; the spots the reference explains best, which a missing type
filling up to 3 in 4 spots does not reach) and ``deviance_z = (z_model − centre) / spread`` with
the spread never narrower than the model's (1). So **``deviance_z`` says how unusual a spot's
misfit is for this slide** — a platform effect, a reference from other donors or a φ off by a
little raise every spot's ``z_model`` alike and are removed — and spots with ``deviance_z > 3``
are ``poorly_explained``. ``spot_deviance_z`` is the same for the spot alone (not flagged on).
On the bundled demo with its full reference 2.8 % of spots are flagged (the tail of spots of a
few cells); with a type held out, see ``tests/test_diagnostics.py`` and ``docs/method.md``.

**Regions and genes.** Flagged spots connected on the spot graph form regions (at least
:data:`MIN_REGION_SPOTS` spots, numbered by size). For each, the genes carrying the residual:
the largest positive NB-standardised residuals ``(x − μ)/sqrt(μ + φμ²)`` summed over the
region's spots (top :data:`N_RESIDUAL_GENES`). Given a gene-set table (``marker_gene_sets``),
else the reference's own types' top markers, the population they mark is named by a
hypergeometric test of those genes against each set within the diagnostic genes (Bonferroni
over the sets, named at ``p < 0.01`` with at least two genes shared).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats
from scipy.sparse.csgraph import connected_components

from .errors import StlnmfError

__all__ = [
    "DEVIANCE_Z_THRESHOLD",
    "MAX_GENES",
    "MIN_REGION_SPOTS",
    "N_RESIDUAL_GENES",
    "Diagnostics",
    "check_gene_sets",
    "deviance_moments",
    "diagnose_fit",
    "diagnosis_summary",
    "nb_deviance",
    "reference_marker_sets",
]

DEVIANCE_Z_THRESHOLD = 3.0
MAX_GENES = 2000
MIN_REGION_SPOTS = 3
N_RESIDUAL_GENES = 20
NAMING_P = 0.01
N_REFERENCE_MARKERS = 50
REFIT_ITERATIONS = 20
_CHUNK_ENTRIES = 4_000_000  # spots x genes per dense block


@dataclass
class Diagnostics:
    """What :func:`diagnose_fit` found on one slide (or library).

    ``spots``: per fitted spot, ``deviance_z``, ``poorly_explained`` and ``region`` (-1: in no
    region); ``regions``: per region, ``n_spots``, the ``residual_genes`` (top first, ``;``
    separated), and the ``population`` named (empty if none), its ``population_p``
    (Bonferroni-adjusted) and ``population_genes``; ``info``: plain numbers for the run info."""

    spots: pd.DataFrame
    regions: pd.DataFrame
    info: dict = field(default_factory=dict)


def nb_deviance(x: np.ndarray, mu: np.ndarray, phi: float) -> np.ndarray:
    """Unit deviance of counts ``x`` under NB(mean ``mu``, ``Var = μ + φμ²``); Poisson at φ = 0."""
    x = np.asarray(x, dtype=np.float64)
    mu = np.maximum(np.asarray(mu, dtype=np.float64), 1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        term = np.where(x > 0, x * np.log(x / mu), 0.0)
    if phi <= 0:
        return 2.0 * (term - (x - mu))
    r = 1.0 / phi
    return 2.0 * (term - (x + r) * np.log((x + r) / (mu + r)))


_MOMENT_GRID = np.logspace(-4, 4, 161)


def deviance_moments(phi: float, grid: np.ndarray = _MOMENT_GRID) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of the unit deviance of one NB(μ, φ) count at each μ of ``grid``,
    summed exactly over the distribution (tails past 12 standard deviations dropped)."""
    means, variances = np.empty(grid.size), np.empty(grid.size)
    for i, mu in enumerate(grid):
        sd = np.sqrt(mu + phi * mu**2)
        x = np.arange(0, int(np.ceil(mu + 12 * sd + 20)) + 1, dtype=np.float64)
        if phi > 0:
            r = 1.0 / phi
            pmf = stats.nbinom.pmf(x, r, r / (r + mu))
        else:
            pmf = stats.poisson.pmf(x, mu)
        pmf = pmf / pmf.sum()
        d = nb_deviance(x, np.full_like(x, mu), phi)
        means[i] = float(pmf @ d)
        variances[i] = float(pmf @ (d - means[i]) ** 2)
    return means, variances


def _moments_at(mu: np.ndarray, phi: float, table) -> tuple[np.ndarray, np.ndarray]:
    means, variances = table
    logmu = np.log10(np.clip(mu, _MOMENT_GRID[0], _MOMENT_GRID[-1]))
    lg = np.log10(_MOMENT_GRID)
    return np.interp(logmu, lg, means), np.interp(logmu, lg, variances)


def check_gene_sets(gene_sets) -> dict[str, list[str]] | None:
    """``marker_gene_sets`` as a dict of gene lists (None stays None); anything else is refused
    with what to pass."""
    if gene_sets is None:
        return None
    if not isinstance(gene_sets, Mapping) or not gene_sets:
        raise StlnmfError(
            "marker_gene_sets must be a non-empty mapping of population name to a list of gene "
            f"names, e.g. {{'acinar': ['PRSS1', 'CPA1', ...]}}, not {type(gene_sets).__name__}"
        )
    out = {}
    for name, genes in gene_sets.items():
        if isinstance(genes, str) or not hasattr(genes, "__iter__"):
            raise StlnmfError(
                f"marker_gene_sets[{name!r}] must be a list of gene names, not {genes!r}"
            )
        out[str(name)] = [str(g) for g in genes]
    return out


def reference_marker_sets(
    reference, n: int = N_REFERENCE_MARKERS, *, cell_type_key: str | None = None
) -> dict[str, list[str]]:
    """Each reference type's top ``n`` genes by log fold change against the mean of the other
    types (the default gene-set table for naming a region). ``reference``: a
    :class:`~napari_stlnmf.preprocess.Reference`, or what :func:`deconvolve` takes (single
    cells with their ``cell_type_key``, or a genes x types signature table)."""
    from .preprocess import Reference, build_reference

    if not isinstance(reference, Reference):
        reference = build_reference(reference, cell_type_key=cell_type_key)
    prof = reference.profiles.to_numpy(dtype=np.float64)
    genes = reference.genes.astype(str)
    out = {}
    for t, name in enumerate(reference.cell_types):
        rest = np.delete(prof, t, axis=1)
        others = rest.mean(1) if rest.shape[1] else np.zeros(prof.shape[0])
        lfc = np.log((prof[:, t] + 1e-6) / (others + 1e-6))
        out[name] = list(genes[np.argsort(-lfc, kind="stable")[:n]])
    return out


def _variable_genes(counts: sp.csr_matrix, candidates: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` candidate columns with the highest variance-to-mean ratio of depth-normalised
    counts (genes with fewer than 10 counts in all skipped)."""
    if n <= 0 or candidates.size == 0:
        return np.empty(0, dtype=np.int64)
    sub = counts[:, candidates]
    lib = np.asarray(counts.sum(1)).ravel()
    norm = sp.diags(np.median(lib) / np.maximum(lib, 1)) @ sub
    mean = np.asarray(norm.mean(0)).ravel()
    var = np.asarray(norm.multiply(norm).mean(0)).ravel() - mean**2
    total = np.asarray(sub.sum(0)).ravel()
    score = np.where((total >= 10) & (mean > 0), var / np.maximum(mean, 1e-12), -np.inf)
    top = np.argsort(-score, kind="stable")[:n]
    return candidates[top[np.isfinite(score[top])]]


def diagnose_fit(
    counts,
    slide_genes,
    fractions: np.ndarray,
    prepared,
    reference,
    graph,
    *,
    overdispersion: float,
    marker_gene_sets: Mapping[str, list[str]] | None = None,
    marker_reference=None,
    max_genes: int = MAX_GENES,
    threshold: float = DEVIANCE_Z_THRESHOLD,
    refit_iterations: int = REFIT_ITERATIONS,
) -> Diagnostics:
    """Flag the spots the fit does not explain, group them into regions and name what they
    hold (see the module docstring for the scale).

    Parameters
    ----------
    counts
        Raw counts of the fitted spots (``prepared.spot_mask`` rows) x the slide's genes.
    slide_genes
        The slide's gene names in the reference's naming (as
        :func:`~napari_stlnmf.preprocess.match_gene_identifiers` returns them).
    fractions
        The fit's mRNA shares over the selected genes (spots x ``prepared.cell_types``).
    prepared, reference
        The fit's inputs (``reference`` aligned with ``prepared.cell_types``).
    graph
        The spot graph (:class:`~napari_stlnmf.graph.SpatialGraph`) over the fitted spots.
    overdispersion
        φ of ``Var(x) = μ + φμ²`` (the slide's, measured on a first fit).
    marker_gene_sets
        Population name -> genes, to name a region's residual genes; default: the markers of
        ``marker_reference``'s (else ``reference``'s) types.
    """
    from .preprocess import match_genes

    counts = sp.csr_matrix(counts, dtype=np.float64)
    phi = max(float(overdispersion or 0.0), 0.0)
    si, ri = match_genes(slide_genes, reference.genes)
    used = pd.Index(reference.genes[ri].astype(str)).get_indexer(prepared.genes.astype(str))
    used = used[used >= 0]
    rest = np.setdiff1d(np.arange(si.size), used)
    extra = _variable_genes(counts[:, si], rest, max(max_genes - used.size, 0))
    cols = np.concatenate([used, extra])  # positions in (si, ri)
    genes = pd.Index(reference.genes[ri[cols]].astype(str))
    # profiles of the diagnostic genes: the fit's (platform-corrected) B on the genes it used,
    # the reference's elsewhere, both per unit of each type's whole-transcriptome mRNA
    prof = reference.profiles.to_numpy(dtype=np.float64)[ri[cols]]
    prof[: used.size] = np.asarray(prepared.B, dtype=np.float64) * prepared.gene_share[None, :]
    weights = np.asarray(fractions, dtype=np.float64) / prepared.gene_share[None, :]
    weights /= np.maximum(weights.sum(1, keepdims=True), 1e-300)
    X = counts[:, si[cols]].tocsr()
    weights = _refit(X, weights, prof, refit_iterations)
    n_spots, n_genes = X.shape
    D, E, V = _spot_deviance(X, weights, prof, phi, np.arange(n_spots))
    z_spot, _, _ = _slide_scale((D - E) / np.sqrt(np.maximum(V, 1e-12)))
    # the spot with its graph neighbours: a missing type's spots come in patches, the
    # composition noise of a few-cell spot does not
    A = _adjacency(graph, n_spots) + sp.identity(n_spots, format="csr")
    D, E, V = A @ D, A @ E, A @ V
    z, centre, spread = _slide_scale((D - E) / np.sqrt(np.maximum(V, 1e-12)))
    flagged = z > threshold
    region = _regions(flagged, graph)
    regions = _describe_regions(
        region, X, weights, prof, phi, genes,
        _gene_sets(marker_gene_sets, marker_reference or reference),
        from_table=marker_gene_sets is not None,
    )  # fmt: skip
    spots = pd.DataFrame(
        {
            "deviance_z": z,
            "poorly_explained": flagged,
            "region": region.astype(np.int64),
            "spot_deviance_z": z_spot,
        }
    )
    info = {
        "n_genes": int(n_genes),
        "n_genes_fitted": int(used.size),
        "overdispersion": phi,
        "z_model_median": centre,
        "z_model_spread": spread,
        "threshold": float(threshold),
        "n_poorly_explained": int(flagged.sum()),
        "share_poorly_explained": float(flagged.mean()) if n_spots else 0.0,
        "n_regions": len(regions),
    }
    return Diagnostics(spots, regions, info)


def _refit(X, weights, prof, n_iter: int) -> np.ndarray:
    """Each spot's mixture re-estimated alone on the diagnostic genes (Poisson maximum
    likelihood: multiplicative updates started from the fit's), so that the deviance measures
    what no mix of the reference's types explains, not the spatial smoothing of the map nor
    the genes it was not fitted on."""
    if n_iter <= 0:
        return weights
    total = prof.sum(0)
    P = prof / np.maximum(total[None, :], 1e-300)  # columns sum to one on these genes
    out = np.empty_like(weights)
    step = max(1, _CHUNK_ENTRIES // max(X.shape[1], 1))
    for start in range(0, X.shape[0], step):
        rows = slice(start, min(start + step, X.shape[0]))
        x = X[rows].toarray()
        depth = np.maximum(x.sum(1, keepdims=True), 1e-300)
        h = weights[rows] * total[None, :]
        h = np.maximum(h / np.maximum(h.sum(1, keepdims=True), 1e-300), 1e-8)
        for _ in range(n_iter):
            h *= (x / np.maximum(h @ P.T, 1e-300)) @ P / depth
        w = h / np.maximum(total[None, :], 1e-300)
        out[rows] = w / np.maximum(w.sum(1, keepdims=True), 1e-300)
    return out


def _block(X, weights, prof, rows):
    """Dense counts and NB means of a block of spots: each spot's counts over the diagnostic
    genes spread by its mixture of profiles."""
    x = X[rows].toarray()
    p = weights[rows] @ prof.T
    p /= np.maximum(p.sum(1, keepdims=True), 1e-300)
    return x, p * x.sum(1, keepdims=True)


def _spot_deviance(X, weights, prof, phi, spots):
    """Per spot of ``spots``: deviance, its expectation and variance under NB(μ, φ)."""
    table = deviance_moments(phi)
    n = spots.size
    D, E, V = np.zeros(n), np.zeros(n), np.zeros(n)
    step = max(1, _CHUNK_ENTRIES // max(X.shape[1], 1))
    for start in range(0, n, step):
        rows = spots[start : start + step]
        x, mu = _block(X, weights, prof, rows)
        mean, var = _moments_at(mu, phi, table)
        part = slice(start, start + rows.size)
        D[part] = nb_deviance(x, mu, phi).sum(1)
        E[part], V[part] = mean.sum(1), var.sum(1)
    return D, E, V


def _slide_scale(z_model: np.ndarray) -> tuple[np.ndarray, float, float]:
    """``z_model`` re-centred and scaled on the slide's best-explained spots: centre and spread
    of a normal fitted to the lower quartile (the 5th and 25th percentiles, which spots the
    reference cannot explain, up to 3 in 4 of them, do not reach), the spread never narrower
    than the model's (1)."""
    if z_model.size < 4:
        return z_model - (np.median(z_model) if z_model.size else 0.0), 0.0, 1.0
    q05, q25 = np.quantile(z_model, [0.05, 0.25])
    spread = max(1.0, float((q25 - q05) / 0.9704))  # Φ⁻¹(0.25) − Φ⁻¹(0.05)
    centre = float(q25 + 0.6745 * spread)
    return (z_model - centre) / spread, centre, spread


def _adjacency(graph, n: int) -> sp.csr_matrix:
    return sp.csr_matrix((np.ones(graph.rows.size), (graph.rows, graph.cols)), shape=(n, n))


def _regions(flagged: np.ndarray, graph) -> np.ndarray:
    """Connected flagged spots on the graph, numbered from 0 by size (largest first); -1 for
    spots in no region of at least MIN_REGION_SPOTS."""
    n = flagged.size
    region = np.full(n, -1, dtype=np.int64)
    if not flagged.any():
        return region
    keep = flagged[graph.rows] & flagged[graph.cols]
    adj = sp.csr_matrix(
        (np.ones(int(keep.sum())), (graph.rows[keep], graph.cols[keep])), shape=(n, n)
    )
    _, labels = connected_components(adj, directed=False)
    labels = np.where(flagged, labels, -1)
    ids, sizes = np.unique(labels[flagged], return_counts=True)
    order = [
        i for i, s in sorted(zip(ids, sizes), key=lambda t: (-t[1], t[0])) if s >= MIN_REGION_SPOTS
    ]
    for k, lab in enumerate(order):
        region[labels == lab] = k
    return region


def _gene_sets(marker_gene_sets, reference) -> dict[str, list[str]]:
    return (
        dict(marker_gene_sets) if marker_gene_sets is not None else reference_marker_sets(reference)
    )


def _describe_regions(region, X, weights, prof, phi, genes, gene_sets, *, from_table):
    columns = [
        "region", "n_spots", "residual_genes", "population", "population_p",
        "population_genes", "population_source",
    ]  # fmt: skip
    out = []
    universe = set(genes)
    sets = {k: sorted(set(v) & universe) for k, v in gene_sets.items()}
    sets = {k: v for k, v in sets.items() if v}
    for k in range(int(region.max()) + 1 if region.size else 0):
        rows = np.flatnonzero(region == k)
        x, mu = _block(X, weights, prof, rows)
        resid = ((x - mu) / np.sqrt(np.maximum(mu + phi * mu**2, 1e-12))).sum(0)
        order = np.argsort(-resid, kind="stable")
        top = [genes[g] for g in order[:N_RESIDUAL_GENES] if resid[g] > 0]
        name, p_best, hits = "", 1.0, []
        for set_name, members in sets.items():
            shared = sorted(set(top) & set(members), key=top.index)
            if len(shared) < 2:
                continue
            p = stats.hypergeom.sf(len(shared) - 1, len(genes), len(members), len(top))
            p = min(1.0, p * len(sets))
            if p < p_best:
                name, p_best, hits = set_name, float(p), shared
        if p_best >= NAMING_P:
            name, hits = "", []
        out.append(
            {
                "region": k,
                "n_spots": int(rows.size),
                "residual_genes": ";".join(top),
                "population": name,
                "population_p": p_best,
                "population_genes": ";".join(hits),
                "population_source": ("gene sets" if from_table else "reference markers")
                if name
                else "",
            }
        )
    return pd.DataFrame(out, columns=columns)


def diagnose_library(counts, reference, as_read, prepared, fractions, graph, calibration, settings):
    """The driver's call on one library: :func:`diagnose_fit` on its fitted spots, with the
    slide's genes paired to the reference's as the fit paired them and φ as calibrated (else
    measured here on the fit)."""
    from .calibration import estimate_noise
    from .preprocess import match_gene_identifiers

    names, _ = match_gene_identifiers(
        counts.var, reference, case_insensitive=settings.case_insensitive
    )
    V = np.asarray(fractions, dtype=np.float64)
    noise = calibration.noise
    if noise is None:
        noise = estimate_noise(prepared.X, prepared.library_size, prepared.B, V)
    matrix = sp.csr_matrix(counts.matrix)[np.flatnonzero(prepared.spot_mask)]
    if settings.case_insensitive:
        names = pd.Index(names.astype(str).str.upper())
        upper = reference.genes.astype(str).str.upper()
        reference = _renamed_genes(reference, upper)
        prepared = _renamed_prepared(prepared, pd.Index(prepared.genes.astype(str).str.upper()))
    return diagnose_fit(
        matrix, names, V, prepared, reference, graph,
        overdispersion=noise.overdispersion,
        marker_gene_sets=settings.marker_gene_sets,
        marker_reference=as_read,
    )  # fmt: skip


def _renamed_genes(reference, genes):
    from dataclasses import replace

    return replace(reference, profiles=reference.profiles.set_axis(pd.Index(genes), axis=0))


def _renamed_prepared(prepared, genes):
    from dataclasses import replace

    return replace(prepared, genes=genes)


def combined_diagnostics(fits, obs_names: pd.Index) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each library's diagnostics at its spots of the slide (NaN / False / -1 elsewhere), region
    numbers made unique across libraries (with a ``library`` column when there are several)."""
    n = len(obs_names)
    per_spot = pd.DataFrame(
        {
            "deviance_z": np.full(n, np.nan),
            "poorly_explained": np.zeros(n, dtype=bool),
            "region": np.full(n, -1, dtype=np.int64),
            "spot_deviance_z": np.full(n, np.nan),
        },
        index=obs_names,
    )
    tables, offset = [], 0
    for library, f in fits:
        if f.diagnostics is None:
            continue
        kept = np.flatnonzero(library.rows)[f.prep.spot_mask]
        spots = f.diagnostics.spots
        for column in ("deviance_z", "poorly_explained", "spot_deviance_z"):
            per_spot.iloc[kept, per_spot.columns.get_loc(column)] = spots[column].to_numpy()
        r = spots["region"].to_numpy()
        per_spot.iloc[kept, per_spot.columns.get_loc("region")] = np.where(r >= 0, r + offset, -1)
        table = f.diagnostics.regions.copy()
        table["region"] += offset
        if library.name is not None:
            table.insert(1, "library", library.name)
        tables.append(table)
        offset += len(table)
    regions = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    return per_spot, regions


def diagnostics_obs(per_spot: pd.DataFrame, prefix: str) -> dict[str, np.ndarray]:
    """The ``obs`` columns of the annotated AnnData."""
    return {
        f"{prefix}deviance_z": per_spot["deviance_z"].to_numpy(),
        f"{prefix}poorly_explained": per_spot["poorly_explained"].to_numpy(),
        f"{prefix}unexplained_region": per_spot["region"].to_numpy(),
        f"{prefix}spot_deviance_z": per_spot["spot_deviance_z"].to_numpy(),
    }


def diagnosis_summary(per_spot: pd.DataFrame, regions: pd.DataFrame, *, n_regions=3, n_genes=5):
    """A few plain sentences on what ``deconvolve(diagnose=True)`` found (the dock shows them):
    the share of spots poorly explained, then the largest regions with their top residual genes
    and the population they mark."""
    z = per_spot["deviance_z"].to_numpy(dtype=float)
    n = int(np.isfinite(z).sum())
    flagged = int(per_spot["poorly_explained"].to_numpy(dtype=bool).sum())
    if n == 0:
        return "No spot was diagnosed (no estimates)."
    if flagged == 0:
        return (
            f"The reference explains every spot: none of {n:,} is unusual for this slide "
            f"(misfit z > {DEVIANCE_Z_THRESHOLD:g})."
        )
    head = (
        f"{flagged / n:.1%} of spots ({flagged:,} of {n:,}) poorly explained by the reference "
        f"(misfit z > {DEVIANCE_Z_THRESHOLD:g})"
    )
    if regions is None or not len(regions):
        return (
            f"{head}, scattered: no patch of {MIN_REGION_SPOTS} or more neighbouring spots, "
            "so more likely noise than a cell type missing from the reference."
        )
    lines = [f"{head}; {len(regions)} region{'s' if len(regions) > 1 else ''}:"]
    for _, r in (
        regions.sort_values("n_spots", ascending=False, kind="stable").head(n_regions).iterrows()
    ):
        genes = [g for g in str(r["residual_genes"]).split(";") if g][:n_genes]
        line = f"region {int(r['region'])} ({int(r['n_spots'])} spots)"
        line += f": top residual genes {', '.join(genes)}" if genes else ""
        if r.get("population"):
            line += f", markers of {r['population']} (p = {float(r['population_p']):.1g})"
        lines.append(line)
    if len(regions) > n_regions:
        lines.append(f"… and {len(regions) - n_regions} smaller (unexplained_regions.csv)")
    return "\n".join(lines)
