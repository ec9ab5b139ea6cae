"""Reference signatures, gene matching and selection, and scaling of X and B.

The factorisation works on library-size-normalised spots and on signatures whose columns
sum to one over the selected genes, with gene rows weighted (1/sqrt(mean) by default), so
that the data term and the regularisers live on a common scale (the original's λ's were
inert because counts in the thousands swamped them).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import (
    DuplicateNamesError,
    EmptyCellTypeError,
    GeneMismatchError,
    InvalidCountsError,
    StlnmfError,
)
from .io.counts import subsample_per_type
from .io.validate import (
    check_cell_type_key,
    check_cell_type_sizes,
    check_counts,
    check_unique,
    reference_counts,
    validate_signature,
)

__all__ = [
    "Prepared",
    "Reference",
    "build_reference",
    "match_gene_identifiers",
    "match_genes",
    "prepare",
    "select_marker_genes",
]

MIN_SHARED_GENES = 10
# a marker of a type must be detected in at least this share of the type's reference cells
# (scanpy's min_in_group_fraction): top fold changes of a type with few cells are otherwise
# genes one or two of its cells happen to express, which the slide's cells of that type do not
# (seqFISH+ olfactory bulb, 12-49 cells in 4 of its 9 types: 0.1016 -> 0.0816 cell RMSE)
MIN_MARKER_DETECTION = 0.25
# ... and its fold change is that of the type's mean less this many standard errors of the
# mean (a one-sided 97.5 % bound): the types of few cells keep the genes all their cells share
# (halved seqFISH+ near-pure 0.178 -> 0.162 cell RMSE; the default run elsewhere within 1.5 %)
MARKER_CONFIDENCE = 2.0

# var columns that name genes in files from Space Ranger / scanpy (gene_ids, feature_types),
# CELLxGENE (feature_name, feature_id: var_names are Ensembl ids there) and others
GENE_ID_COLUMNS = (
    "gene_ids",
    "gene_id",
    "feature_id",
    "ensembl_id",
    "feature_name",
    "gene_symbols",
    "gene_symbol",
    "gene_name",
    "gene_names",
    "symbol",
)
_ENSEMBL_VERSION = r"^(ENS[A-Z]*\d{6,})\.\d+$"  # ENSG00000123456.4 -> ENSG00000123456
# results a Reference keeps of work that each slide fitted with it repeats (its sub-profiles for
# the slide's markers); a batch's slides mostly share one gene panel, so two suffice
REFERENCE_MEMO_ENTRIES = 2


@dataclass
class Reference:
    """What the model needs from a reference.

    Attributes
    ----------
    profiles
        genes x cell types; each column sums to one (expression *profile* of the type).
    mrna_content
        Mean library size (total counts per cell) of each type: converts mRNA fractions to
        cell fractions.
    cell_counts
        Cells x genes counts (CSR) of a single-cell reference, or None for a signature table.
    cell_labels
        Integer type index per cell (aligned with ``cell_counts``), or None.
    variance_to_mean
        Pooled within-type variance-to-mean ratio per gene (None without single cells).
    gene_ids
        Other names of the genes (the reference's ``var`` columns in :data:`GENE_ID_COLUMNS`),
        indexed like ``profiles``; :func:`match_gene_identifiers` tries them on the slide.
    info
        Where the counts came from (``counts_source``) and how many cells were kept
        (``n_cells``, ``n_cells_kept``, ``max_cells_per_type``).
    """

    profiles: pd.DataFrame
    mrna_content: pd.Series
    cell_counts: sp.csr_matrix | None = None
    cell_labels: np.ndarray | None = None
    variance_to_mean: pd.Series | None = None
    gene_ids: pd.DataFrame | None = None
    info: dict = field(default_factory=dict)
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def memo(self, key, compute):
        """``compute()``, kept under ``key`` for the next slide that asks for the same (at most
        :data:`REFERENCE_MEMO_ENTRIES`, the least recently used dropped; not pickled, so a
        scattered reference starts empty on each worker). Only for work that depends on
        nothing but this reference and ``key``; the reference is not modified after it is
        built."""
        if key in self._memo:
            value = self._memo.pop(key)
        else:
            value = compute()
        self._memo[key] = value  # most recently used last
        while len(self._memo) > REFERENCE_MEMO_ENTRIES:
            self._memo.pop(next(iter(self._memo)))
        return value

    def __getstate__(self):
        return {**self.__dict__, "_memo": {}}

    @property
    def cell_types(self) -> list[str]:
        return [str(c) for c in self.profiles.columns]

    @property
    def genes(self) -> pd.Index:
        return self.profiles.index

    def subset_genes(self, genes) -> Reference:
        genes = pd.Index(genes)
        pos = self.profiles.index.get_indexer(genes)
        return Reference(
            profiles=self.profiles.iloc[pos],
            mrna_content=self.mrna_content,
            cell_counts=None if self.cell_counts is None else self.cell_counts[:, pos],
            cell_labels=self.cell_labels,
            variance_to_mean=None
            if self.variance_to_mean is None
            else self.variance_to_mean.iloc[pos],
        )

    def scale_genes(self, factors) -> Reference:
        """The reference as the slide's platform would measure it: gene g scaled by
        ``factors[g]``."""
        f = np.asarray(factors, dtype=np.float64)
        return Reference(
            profiles=self.profiles * f[:, None],
            mrna_content=self.mrna_content,
            cell_counts=None
            if self.cell_counts is None
            else (self.cell_counts @ sp.diags(f.astype(np.float32))).tocsr(),
            cell_labels=self.cell_labels,
            variance_to_mean=self.variance_to_mean,
        )


def _as_csr(x) -> sp.csr_matrix:
    return (
        sp.csr_matrix(x, dtype=np.float32) if not sp.issparse(x) else x.tocsr().astype(np.float32)
    )


def gene_identifiers(var: pd.DataFrame) -> pd.DataFrame:
    """The text columns of ``var`` named in :data:`GENE_ID_COLUMNS`, as strings (None where
    missing), indexed by the var names."""
    columns = {}
    for name in GENE_ID_COLUMNS:
        if name in var.columns and not pd.api.types.is_numeric_dtype(var[name]):
            columns[name] = [None if pd.isna(v) else str(v) for v in var[name].astype(object)]
    return pd.DataFrame(columns, index=pd.Index(var.index.astype(str)), dtype=object)


def build_reference(
    reference,
    *,
    cell_type_key: str | None = None,
    min_cells: int = 1,
    is_means: bool = False,
    max_cells_per_type: int | None = None,
    seed: int = 0,
) -> Reference:
    """Turn a single-cell AnnData or a signature table into a :class:`Reference`.

    Parameters
    ----------
    reference
        AnnData (cells x genes, raw counts in ``layers['counts']``, ``X`` or ``.raw``:
        :func:`~napari_stlnmf.io.validate.reference_counts`) with ``obs[cell_type_key]``, or a
        DataFrame of mean expression (genes x cell types).
    cell_type_key
        Column of ``reference.obs`` holding the cell-type labels (AnnData only).
    min_cells
        Types with fewer cells raise :class:`EmptyCellTypeError`.
    is_means
        The AnnData's rows are mean expression (pseudo-bulks, metacells), not raw counts per
        cell: non-integer values are accepted. Without it they raise
        :class:`~napari_stlnmf.errors.NotRawCountsError`.
    max_cells_per_type
        Keep at most this many cells of each type, drawn with ``seed`` before anything is
        converted (atlases of 10^6 cells); None keeps every cell.
    """
    if isinstance(reference, pd.DataFrame):
        validate_signature(reference)
        sig = reference.astype(np.float64)
        totals = sig.sum(0)
        sig.columns = [str(c) for c in sig.columns]
        return Reference(
            profiles=sig / totals.to_numpy(),
            mrna_content=pd.Series(totals.to_numpy(), index=sig.columns),
            info={"counts_source": "signature table"},
        )

    # AnnData single-cell reference
    obs = reference.obs
    check_cell_type_key(obs, cell_type_key)
    if reference.n_obs == 0 or reference.n_vars == 0:
        raise InvalidCountsError(
            f"The reference is empty ({reference.n_obs} cells x {reference.n_vars} genes)."
        )
    found = reference_counts(reference, is_means=is_means)
    check_unique(
        found.genes,
        "gene name(s)",
        "Gene names must be unique; run `reference.var_names_make_unique()`.",
    )
    # the cells kept are chosen before any conversion: only their rows are ever copied
    rows = subsample_per_type(obs[cell_type_key], max_cells_per_type, seed)
    kept = found.matrix if rows.size == reference.n_obs else found.matrix[rows]
    counts = _as_csr(kept)
    cell_names = reference.obs_names if rows.size == reference.n_obs else reference.obs_names[rows]
    check_counts(counts, cell_names, found.genes, "reference", ("cell", "gene"))
    labels = obs[cell_type_key].iloc[rows]
    if labels.isna().any():
        warnings.warn(
            f"{int(labels.isna().sum())} reference cells have no cell type and are ignored",
            stacklevel=2,
        )
    keep = ~labels.isna().to_numpy()
    labels = labels[keep].astype(str)
    counts = counts[np.flatnonzero(keep)]
    types = sorted(labels.unique().tolist())
    code = pd.Categorical(labels, categories=types).codes.astype(np.int64)
    n_cells = np.bincount(code, minlength=len(types))
    if rows.size == reference.n_obs:
        check_cell_type_sizes(pd.Series(n_cells, index=types), cell_type_key, min_cells, obs)
    else:  # sizes before the subsampling: a type is only capped, never made too small
        sizes = obs[cell_type_key].value_counts(dropna=True)
        check_cell_type_sizes(sizes, cell_type_key, min_cells, obs)
    lib = np.asarray(counts.sum(1)).ravel()
    if (lib <= 0).any():
        warnings.warn(
            f"{int((lib <= 0).sum())} reference cells have no counts and are ignored", stacklevel=2
        )
        ok = np.flatnonzero(lib > 0)
        counts, code, lib = counts[ok], code[ok], lib[ok]
        n_cells = np.bincount(code, minlength=len(types))
        if (n_cells == 0).any():
            empty = [t for t, c in zip(types, n_cells) if c == 0]
            raise EmptyCellTypeError(f"cell type(s) {empty} have no cells with counts")
    member = sp.csr_matrix(
        (np.ones_like(code, dtype=np.float64), (code, np.arange(code.size))),
        shape=(len(types), code.size),
    )
    member = sp.diags(1.0 / n_cells) @ member
    norm = sp.diags(1.0 / lib) @ counts
    profiles = np.asarray((member @ norm).todense()).T  # genes x types, columns sum to 1
    content = np.asarray(member @ lib).ravel()
    # pooled within-type variance-to-mean ratio of normalised expression (×1e4)
    mean_sq = np.asarray((member @ norm.multiply(norm)).todense()).T
    var = np.maximum(mean_sq - profiles**2, 0.0)
    w = n_cells / n_cells.sum()
    pooled_var = (var * w).sum(1)
    pooled_mean = (profiles * w).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        vmr = np.where(pooled_mean > 0, pooled_var / pooled_mean, 0.0)
    genes = found.genes
    return Reference(
        profiles=pd.DataFrame(profiles, index=genes, columns=types),
        mrna_content=pd.Series(content, index=types),
        cell_counts=counts,
        cell_labels=code,
        variance_to_mean=pd.Series(vmr, index=genes),
        gene_ids=gene_identifiers(found.var),
        info={
            "counts_source": found.source,
            "n_cells": int(reference.n_obs),
            "n_cells_kept": int(code.size),
            "max_cells_per_type": max_cells_per_type,
        },
    )


def match_genes(
    slide_genes, reference_genes, *, case_insensitive: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the shared genes in the slide and in the reference (same order)."""
    s = pd.Index(slide_genes).astype(str)
    r = pd.Index(reference_genes).astype(str)
    if case_insensitive:
        s, r = s.str.upper(), r.str.upper()
        for name, idx in (("slide", s), ("reference", r)):
            if idx.has_duplicates:
                dup = idx[idx.duplicated()].unique()[:5].tolist()
                raise DuplicateNamesError(
                    f"gene names of the {name} collide when case is ignored, e.g. {dup}; "
                    "match case-sensitively or make the names unique"
                )
    shared = s.intersection(r, sort=False)
    if len(shared) < MIN_SHARED_GENES:
        hint = ""
        if (
            not case_insensitive
            and len(s.str.upper().intersection(r.str.upper())) >= MIN_SHARED_GENES
        ):
            hint = (
                " Many genes match when case is ignored (mouse vs human symbols?):"
                " use case_insensitive=True."
            )
        elif s.str.startswith("ENS").mean() > 0.5 and not r.str.startswith("ENS").mean() > 0.5:
            hint = (
                " The slide uses Ensembl ids and the reference gene symbols: convert one of "
                "them, or keep the other naming in a var column ('gene_ids', 'feature_name'): "
                "those are matched too."
            )
        elif r.str.startswith("ENS").mean() > 0.5 and not s.str.startswith("ENS").mean() > 0.5:
            hint = (
                " The reference uses Ensembl ids and the slide gene symbols: convert one of "
                "them, or keep the other naming in a var column ('gene_ids', 'feature_name'): "
                "those are matched too."
            )
        raise GeneMismatchError(
            f"slide and reference share {len(shared)} gene(s), at least {MIN_SHARED_GENES} are "
            "needed "
            f"(slide e.g. {s[:3].tolist()}, reference e.g. {r[:3].tolist()}).{hint}"
        )
    return s.get_indexer(shared), r.get_indexer(shared)


def detection_rate(reference: Reference) -> np.ndarray | None:
    """genes x types: the share of each type's reference cells with a count of the gene (None
    for a signature table)."""
    if reference.cell_counts is None or reference.cell_labels is None:
        return None
    labels = np.asarray(reference.cell_labels)
    n_types = reference.profiles.shape[1]
    member = sp.csr_matrix(
        (np.ones(labels.size), (labels, np.arange(labels.size))), shape=(n_types, labels.size)
    )
    n_cells = np.maximum(np.asarray(member.sum(1)).ravel(), 1.0)
    detected = member @ (sp.csr_matrix(reference.cell_counts) > 0).astype(np.float64)
    return (np.asarray(detected.todense()) / n_cells[:, None]).T


def profile_sampling_variance(reference: Reference, genes: np.ndarray) -> np.ndarray | None:
    """genes x types: the relative sampling variance of each type's mean profile at the genes
    (positions in the reference), ``Var(cells' normalised expression) / (n_cells · mean²)``.
    A profile averaged over a few cells is that far from its type's (None for a signature
    table: its error is unknown)."""
    if reference.cell_counts is None or reference.cell_labels is None:
        return None
    counts = sp.csr_matrix(reference.cell_counts)
    labels = np.asarray(reference.cell_labels)
    n_types = reference.profiles.shape[1]
    lib = np.maximum(np.asarray(counts.sum(1)).ravel(), 1e-12)
    norm = (sp.diags(1.0 / lib) @ counts[:, genes]).tocsr()
    member = sp.csr_matrix(
        (np.ones(labels.size), (labels, np.arange(labels.size))), shape=(n_types, labels.size)
    )
    n_cells = np.maximum(np.asarray(member.sum(1)).ravel(), 1.0)
    mean = np.asarray((member @ norm).todense()) / n_cells[:, None]
    mean_sq = np.asarray((member @ norm.multiply(norm)).todense()) / n_cells[:, None]
    var = np.maximum(mean_sq - mean**2, 0.0) * (n_cells / np.maximum(n_cells - 1, 1))[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(mean > 0, var / (n_cells[:, None] * mean**2), 0.0)
    return rel.T


def _identifier_keys(values, *, strip_versions: bool, case_insensitive: bool) -> pd.Series:
    """Comparable keys of gene names; None for missing names and for names that occur more than
    once (they cannot be paired one to one)."""
    keys = pd.Series([None if v is None or pd.isna(v) else str(v) for v in values], dtype=object)
    if strip_versions:
        keys = keys.str.replace(_ENSEMBL_VERSION, r"\1", regex=True)
    if case_insensitive:
        keys = keys.str.upper()
    return keys.where(~keys.duplicated(keep=False) & keys.notna(), None)


def _name_columns(var_names, table: pd.DataFrame | None) -> dict[str, list]:
    out = {"var_names": list(pd.Index(var_names).astype(str))}
    if table is not None:
        out.update({f"var[{c!r}]": list(table[c]) for c in table.columns})
    return out


def match_gene_identifiers(
    slide_var: pd.DataFrame, reference: Reference, *, case_insensitive: bool = False
) -> tuple[pd.Index, dict]:
    """The slide's gene names to match on, translated to the reference's where another naming
    pairs more genes, and a report of the pairing (``info['gene_matching']``).

    Tried on either side: the var names and the var columns of :data:`GENE_ID_COLUMNS`
    (``gene_ids``, ``feature_name``, ...), each as written and with Ensembl version suffixes
    stripped (ENSG00000123456.4 -> ENSG00000123456) on both sides; the pairing sharing the most
    genes wins, var names with var names on a tie. When it is not that one, the slide's
    matched genes are renamed to the reference's var names (unmatched ones get a name that
    matches nothing). Too few shared genes raise :class:`GeneMismatchError` naming what was
    tried."""
    slide_names = pd.Index(slide_var.index.astype(str))
    slide_columns = _name_columns(slide_names, gene_identifiers(slide_var))
    reference_columns = _name_columns(reference.genes, reference.gene_ids)
    best = None
    for strip in (False, True):
        options = {"strip_versions": strip, "case_insensitive": case_insensitive}
        slide_keys = {k: _identifier_keys(v, **options) for k, v in slide_columns.items()}
        reference_keys = {k: _identifier_keys(v, **options) for k, v in reference_columns.items()}
        for s_name, s_keys in slide_keys.items():
            for r_name, r_keys in reference_keys.items():
                shared = set(s_keys.dropna()) & set(r_keys.dropna())
                if best is None or len(shared) > best[0]:
                    best = (len(shared), s_name, r_name, strip, s_keys, r_keys, shared)
    n_shared, s_name, r_name, strip, s_keys, r_keys, shared = best
    report = {
        "slide": s_name,
        "reference": r_name,
        "version_suffixes_stripped": bool(strip),
        "n_shared_genes": int(n_shared),
        "n_slide_genes": len(slide_names),
        "n_reference_genes": len(reference.genes),
    }
    if n_shared < MIN_SHARED_GENES:
        tried = (
            f" Also tried slide {list(slide_columns)} against reference "
            f"{list(reference_columns)}, with and without Ensembl version suffixes: at most "
            f"{n_shared} shared ({s_name} with {r_name})."
        )
        try:
            match_genes(slide_names, reference.genes, case_insensitive=case_insensitive)
        except GeneMismatchError as err:
            raise GeneMismatchError(f"{err}{tried}") from None
    if (s_name, r_name, strip) == ("var_names", "var_names", False):
        return slide_names, report
    to_reference = dict(zip(r_keys, reference.genes.astype(str)))
    renamed = [
        to_reference[key] if key in shared else f"{name} (unmatched)"
        for key, name in zip(s_keys, slide_names)
    ]
    return pd.Index(renamed), report


def select_marker_genes(
    reference: Reference,
    *,
    n_markers: int = 100,
    min_expression: float = 1e-5,
    max_variance_to_mean_quantile: float = 0.995,
    expressed: np.ndarray | None = None,
    min_detection: float = MIN_MARKER_DETECTION,
    marker_confidence: float = MARKER_CONFIDENCE,
) -> np.ndarray:
    """Positions of informative genes: the top ``n_markers`` per type by log fold change
    against the other types (the geometric mean of their mean and their highest expression).

    Genes with a within-type variance-to-mean ratio above the ``max_variance_to_mean_quantile``
    (noise genes unrelated to type) and genes not ``expressed`` in the slide are skipped; with
    single cells, a type's markers must be detected in ``min_detection`` of its cells, and its
    mean enters the fold change less ``marker_confidence`` standard errors of the mean over its
    cells (0: the mean itself; a signature table has no standard errors).
    """
    prof = reference.profiles.to_numpy()
    m, p = prof.shape
    ok = prof.max(1) >= min_expression
    if expressed is not None:
        ok &= expressed
    if reference.variance_to_mean is not None and max_variance_to_mean_quantile < 1:
        vmr = reference.variance_to_mean.to_numpy()
        ok &= vmr <= np.quantile(vmr[ok], max_variance_to_mean_quantile) if ok.any() else True
    eps = 1e-6
    detected = detection_rate(reference)
    # rank a type's genes by a lower confidence bound of its mean, not the mean: a mean over
    # a few cells is as high as the one or two of them that express the gene most
    lower = prof
    genes = np.flatnonzero(ok)
    rel = profile_sampling_variance(reference, genes) if marker_confidence > 0 else None
    if rel is not None:
        lower = np.zeros_like(prof)
        lower[genes] = prof[genes] * np.maximum(1.0 - marker_confidence * np.sqrt(rel), 0.0)
    chosen = np.zeros(m, dtype=bool)
    for t in range(p):
        rest = np.delete(prof, t, axis=1)
        # against the geometric mean of the other types' mean and their highest: against the
        # mean alone, a gene of two similar types ranks high for both yet cannot split them
        # (seqFISH+ interneurons / neuroblasts); against the highest alone, a type with no
        # gene of its own loses its markers
        others = np.sqrt(rest.mean(1) * rest.max(1)) if p > 1 else np.zeros(m)
        lfc = np.log((lower[:, t] + eps) / (others + eps))
        lfc[~ok] = -np.inf
        if detected is not None:
            lfc[detected[:, t] < min_detection] = -np.inf
        top = np.argsort(-lfc, kind="stable")[:n_markers]
        chosen[top[np.isfinite(lfc[top])]] = True
    idx = np.flatnonzero(chosen)
    if idx.size < MIN_SHARED_GENES:
        idx = np.flatnonzero(ok)
    return idx


@dataclass
class Prepared:
    """Scaled inputs of the factorisation.

    ``X`` (spots x genes, CSR) rows sum to one, ``B`` (genes x types) columns sum to one;
    ``gene_weights`` are the data term's per-gene weights chosen by ``gene_weighting`` (the
    unrolled model multiplies them by its learned gene weights).
    """

    X: sp.csr_matrix
    B: np.ndarray
    gene_weights: np.ndarray
    genes: pd.Index
    cell_types: list[str]
    mrna_content: np.ndarray  # per type, counts per cell in the selected genes
    gene_share: np.ndarray  # per type, share of its mRNA falling in the selected genes
    spot_mask: np.ndarray  # spots of the slide kept (with counts on the selected genes)
    library_size: np.ndarray  # counts per kept spot on the selected genes
    info: dict = field(default_factory=dict)
    # genes x types: relative sampling variance of B's entries (None for a signature table)
    profile_variance: np.ndarray | None = None


def with_platform_effect(prep: Prepared, log_factor: np.ndarray) -> Prepared:
    """``prep`` with B's genes scaled by ``exp(log_factor)`` (columns renormalised); each
    type's mRNA content and gene share follow the change of its total in these genes."""
    Bf = prep.B.astype(np.float64) * np.exp(log_factor)[:, None]
    total = Bf.sum(0)
    return replace(
        prep,
        B=(Bf / total).astype(np.float32),
        mrna_content=prep.mrna_content * total,
        gene_share=prep.gene_share * total,
        info={**prep.info, "platform_effect_sd": float(np.std(log_factor))},
    )


GENE_WEIGHTINGS = ("nb", "fitted", "sqrt", "mean", "none")


def gene_weights_for(B: np.ndarray, weighting: str = "sqrt") -> np.ndarray:
    """Row weights of genes: 1/sqrt(mean) ('sqrt'), 1/mean ('mean') or none.

    ``'fitted'`` needs a first fit (:func:`fitted_gene_weights`) and ``'nb'`` (per-entry weights
    inside the model's layers) the fitted values; until then both are 'sqrt'.
    Normalised so that ``mean(diag(Bw^T Bw)) = 1``: λ's then have a meaning that does not
    depend on the number of genes or on sequencing depth.
    """
    mean = B.mean(1)
    floor = max(np.quantile(mean[mean > 0], 0.01), 1e-12) if (mean > 0).any() else 1.0
    mean = np.maximum(mean, floor)
    if weighting in ("sqrt", "fitted", "nb"):
        s = mean**-0.5
    elif weighting == "mean":
        s = 1.0 / mean
    elif weighting in ("none", None):
        s = np.ones_like(mean)
    else:
        raise StlnmfError(f"gene_weighting must be one of {GENE_WEIGHTINGS}, not {weighting!r}")
    return _normalised_scale(B, s)


def _normalised_scale(B: np.ndarray, s: np.ndarray) -> np.ndarray:
    bw = B * s[:, None]
    s = s / np.sqrt(np.mean((bw**2).sum(0)))
    return s.astype(np.float32)


def fitted_gene_weights(X, library_size: np.ndarray, B: np.ndarray, V: np.ndarray) -> np.ndarray:
    """Gene weights 1/sd measured on the slide: each gene's Poisson variance plus its excess
    squared residual after a first fit ``V`` (feasible weighted least squares).

    Genes the reference describes badly on this slide (cell-to-cell variation, a state or
    donor difference, a platform effect left over) count less; with Poisson noise only this
    is the 'sqrt' weighting. ``X`` spots x genes with rows summing to one.
    """
    Xd = X.toarray() if sp.issparse(X) else np.asarray(X)
    fit = np.asarray(V, dtype=np.float64) @ np.asarray(B, dtype=np.float64).T
    lib = np.asarray(library_size, dtype=np.float64)
    poisson = (fit / lib[:, None]).mean(0)
    excess = np.maximum(((Xd - fit) ** 2).mean(0) - poisson, 0.0)
    var = poisson + excess
    positive = var[var > 0]
    var = np.maximum(
        var, np.quantile(positive, 0.01) if positive.size else 1.0
    )  # as 'sqrt' floors the mean
    return _normalised_scale(B, var**-0.5)


def normalise_counts(counts) -> tuple[np.ndarray, np.ndarray]:
    """Dense float32 spots x genes with rows summing to one, and the library sizes."""
    if sp.issparse(counts):
        counts = counts.toarray()
    x = np.asarray(counts, dtype=np.float32)
    lib = x.sum(1)
    return x / np.where(lib > 0, lib, 1)[:, None], lib


def prepare(
    counts,
    slide_genes,
    reference: Reference,
    *,
    n_markers: int = 100,
    case_insensitive: bool = False,
    gene_weighting: str = "sqrt",
    genes: list[str] | None = None,
) -> Prepared:
    """Match, select and scale: the model's inputs from raw slide counts and a reference."""
    counts = _as_csr(counts)
    check_counts(counts, None, pd.Index(slide_genes).astype(str), "slide")
    si, ri = match_genes(slide_genes, reference.genes, case_insensitive=case_insensitive)
    n_shared = si.size
    if genes is not None:  # fixed gene set (e.g. from a trained model)
        wanted = pd.Index([str(g).upper() if case_insensitive else str(g) for g in genes])
        shared_names = pd.Index(reference.genes[ri].astype(str))
        if case_insensitive:
            shared_names = shared_names.str.upper()
        pos = shared_names.get_indexer(wanted)
        pos = pos[pos >= 0]
        si, ri = si[pos], ri[pos]
    else:
        sub = reference.subset_genes(reference.genes[ri])
        expressed = np.asarray((counts[:, si] > 0).sum(0)).ravel() > 0
        sel = select_marker_genes(sub, n_markers=n_markers, expressed=expressed)
        si, ri = si[sel], ri[sel]
    if si.size < MIN_SHARED_GENES:
        raise GeneMismatchError(
            f"only {si.size} usable genes remain after selection (need {MIN_SHARED_GENES}); "
            "check that slide and reference are from the same species and gene naming"
        )
    x_raw = counts[:, si]
    lib = np.asarray(x_raw.sum(1)).ravel()
    spot_mask = lib > 0
    if not spot_mask.any():
        raise InvalidCountsError("no spot has counts on the genes shared with the reference")
    n_empty = int((~spot_mask).sum())
    if n_empty:
        warnings.warn(
            f"{n_empty} spot(s) have no counts on the selected genes; they get no estimate "
            "(NaN, flagged 'no counts')",
            stacklevel=2,
        )
    x_raw = x_raw[np.flatnonzero(spot_mask)]
    lib = lib[spot_mask]
    X = (sp.diags((1.0 / lib).astype(np.float32)) @ x_raw).tocsr()  # stays sparse: 10^6 bins
    prof = reference.profiles.to_numpy()[ri]
    share = prof.sum(0)
    if (share <= 0).any():
        bad = [t for t, s in zip(reference.cell_types, share) if s <= 0]
        raise EmptyCellTypeError(f"cell type(s) {bad} express none of the selected genes")
    B = (prof / share).astype(np.float32)
    scale = gene_weights_for(B, gene_weighting)
    genes_used = pd.Index(reference.genes[ri].astype(str))
    return Prepared(
        X=X,
        B=B,
        gene_weights=scale,
        genes=genes_used,
        cell_types=reference.cell_types,
        mrna_content=(reference.mrna_content.to_numpy() * share).astype(np.float64),
        gene_share=share,
        spot_mask=spot_mask,
        library_size=lib,
        info={
            "n_shared_genes": int(n_shared),
            "n_genes_used": int(si.size),
            "n_spots_used": int(spot_mask.sum()),
            "n_spots_empty": n_empty,
        },
        profile_variance=profile_sampling_variance(reference, ri),
    )
