"""A check of the reference before the fit (issue 20): what makes a map untrustworthy whatever
the solver does, found up front and said with what to do.

- **collinear types**: a type's profile on the selected genes is (nearly) a non-negative mix of
  other types' profiles — NNLS of the others leaves a relative residual below
  :data:`COLLINEAR_RESIDUAL`, so the slide cannot tell the type from that mix (the paper's
  circle grid is unidentifiable for exactly that reason). The types that explain it are named.
- **few cells**: a single-cell reference's type with fewer than :data:`MIN_CELLS` cells: its
  profile is the mean of a handful of cells and its markers are noise.
- **placeholder labels**: "Unknown", "NA", "nan", "unassigned", "other", "" … as a type.
- **gene-name case**: slide and reference genes written in different cases (all-caps human
  symbols against capitalised mouse ones): another species, or names to convert.
- **few shared genes**: fewer than :data:`MIN_SHARED_FRACTION` of the reference's genes are in
  the slide.

:func:`check_reference` returns a :class:`ReferenceReport`; :func:`warn_findings` emits each
finding as a :class:`~napari_stlnmf.errors.ReferenceWarning` (the deconvolve pipeline does so
before the fit and stores :meth:`ReferenceReport.as_info` in ``info['reference_check']``).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.optimize import nnls

from .errors import ReferenceWarning

__all__ = [
    "COLLINEAR_RESIDUAL",
    "MIN_CELLS",
    "MIN_SHARED_FRACTION",
    "PLACEHOLDER_LABELS",
    "ReferenceFinding",
    "ReferenceReport",
    "check_reference",
    "gene_name_case",
    "warn_findings",
]

COLLINEAR_RESIDUAL = 0.3  # relative NNLS residual of a type's profile from the other types'
MIN_CELLS = 25
MIN_SHARED_FRACTION = 0.5
# a type explaining less than this share of the NNLS mix is not named as explaining it
_NAMED_WEIGHT_SHARE = 0.1
PLACEHOLDER_LABELS = frozenset(
    {
        "",
        "na",
        "n/a",
        "nan",
        "none",
        "null",
        "unknown",
        "unknowns",
        "unassigned",
        "not assigned",
        "unannotated",
        "unlabeled",
        "unlabelled",
        "unclassified",
        "undetermined",
        "undefined",
        "other",
        "others",
        "misc",
        "doublet",
        "doublets",
        "low quality",
        "?",
        "-",
    }
)
_LETTERS = re.compile(r"[A-Za-z]")


@dataclass(frozen=True)
class ReferenceFinding:
    """One problem of the reference: ``kind`` (``'collinear_types'``, ``'few_cells'``,
    ``'placeholder_label'``, ``'gene_name_case'``, ``'few_shared_genes'``), the ``types``
    concerned (empty for gene-level findings) and a ``message`` saying what to do."""

    kind: str
    types: tuple[str, ...]
    message: str


@dataclass
class ReferenceReport:
    """What :func:`check_reference` found (``findings`` empty: nothing to warn about)."""

    findings: list[ReferenceFinding] = field(default_factory=list)
    # per type: relative residual of its profile from the others' (NaN if not computed)
    collinearity_residual: dict[str, float] = field(default_factory=dict)

    def kinds(self) -> list[str]:
        return [f.kind for f in self.findings]

    def __bool__(self) -> bool:
        return bool(self.findings)

    def as_info(self) -> dict:
        """Plain lists of strings and numbers (``.h5ad`` stores them in ``uns``)."""
        return {
            "n_findings": len(self.findings),
            "kinds": [f.kind for f in self.findings],
            "types": ["; ".join(f.types) for f in self.findings],
            "messages": [f.message for f in self.findings],
            # two aligned lists, not a dict: type names may hold '/' (no .h5ad key)
            "collinearity_types": list(self.collinearity_residual),
            "collinearity_residual": [float(v) for v in self.collinearity_residual.values()],
        }


def _as_reference(reference, cell_type_key):
    from .preprocess import Prepared, Reference, build_reference

    if isinstance(reference, (Reference, Prepared)):
        return reference
    return build_reference(reference, cell_type_key=cell_type_key)


def check_reference(
    reference,
    slide=None,
    *,
    cell_type_key: str | None = None,
    genes=None,
    n_markers: int = 100,
    n_shared_genes: int | None = None,
    case_insensitive: bool = False,
) -> ReferenceReport:
    """Check a reference, alone or against a slide, before fitting.

    Parameters
    ----------
    reference
        A :class:`~napari_stlnmf.preprocess.Reference`, a prepared reference
        (:class:`~napari_stlnmf.preprocess.Prepared`: only the collinearity and label checks on
        its ``B``), a single-cell AnnData (with ``cell_type_key``) or a signature DataFrame.
    slide
        The slide (an AnnData) or its gene names: enables the gene-name case and shared-gene
        checks.
    genes
        The genes the fit uses (the reference's names); default: the reference's markers
        (:func:`~napari_stlnmf.preprocess.select_marker_genes`, ``n_markers`` per type) among
        the genes shared with the slide.
    n_shared_genes
        How many of the reference's genes the slide has, when the caller matched them already
        (the pipeline passes ``info['gene_matching']['n_shared_genes']``); else counted here on
        the names (ignoring case with ``case_insensitive``).
    """
    from .preprocess import Prepared, select_marker_genes

    ref = _as_reference(reference, cell_type_key)
    report = ReferenceReport()
    types = [str(t) for t in ref.cell_types]
    _check_labels(types, report)
    if isinstance(ref, Prepared):
        B = np.asarray(ref.B, dtype=np.float64)
    else:
        _check_cell_counts(ref, types, report)
        slide_genes = _slide_genes(slide)
        shared = None
        if slide_genes is not None:
            _check_gene_case(slide_genes, ref.genes, report)
            key = (lambda i: i.str.upper()) if case_insensitive else (lambda i: i)
            shared = pd.Index(key(pd.Index(ref.genes).astype(str))).isin(key(slide_genes))
            if n_shared_genes is None:
                n_shared_genes = int(shared.sum())
        if n_shared_genes is not None:
            _check_shared_genes(n_shared_genes, len(ref.genes), report)
        if genes is not None:
            pos = pd.Index(ref.genes).astype(str).get_indexer(pd.Index(genes).astype(str))
            pos = pos[pos >= 0]
        else:
            sub = ref if shared is None or not shared.any() else ref.subset_genes(ref.genes[shared])
            pos = select_marker_genes(sub, n_markers=n_markers)
            if shared is not None and shared.any():
                pos = np.flatnonzero(shared)[pos]
        prof = ref.profiles.to_numpy(dtype=np.float64)[pos]
        B = prof / np.maximum(prof.sum(0, keepdims=True), 1e-300)
    _check_collinear(B, types, report)
    return report


def _slide_genes(slide) -> pd.Index | None:
    if slide is None:
        return None
    names = getattr(slide, "var_names", slide)
    return pd.Index(names).astype(str)


def _check_labels(types: list[str], report: ReferenceReport) -> None:
    bad = [t for t in types if t.strip().lower() in PLACEHOLDER_LABELS]
    if bad:
        report.findings.append(
            ReferenceFinding(
                "placeholder_label",
                tuple(bad),
                f"cell type(s) {bad} look like placeholder labels, not cell types: their "
                "cells are usually a mix of types, which the fit then spreads over the slide. "
                "Drop those cells from the reference (or annotate them) before the run",
            )
        )


def _check_cell_counts(ref, types: list[str], report: ReferenceReport) -> None:
    if ref.cell_labels is None:
        return
    n = np.bincount(np.asarray(ref.cell_labels), minlength=len(types))
    few = [(t, int(c)) for t, c in zip(types, n) if c < MIN_CELLS]
    if few:
        listed = ", ".join(f"{t!r} ({c})" for t, c in few)
        report.findings.append(
            ReferenceFinding(
                "few_cells",
                tuple(t for t, _ in few),
                f"cell type(s) with fewer than {MIN_CELLS} cells: {listed}. Their profiles "
                "are the mean of a few cells and their marker genes partly noise, so their "
                "proportions are less reliable: add cells of these types, merge them into a "
                "related type, or leave them out if they are not expected in the tissue",
            )
        )


def gene_name_case(names) -> str | None:
    """``'upper'`` (most names all capitals: human symbols, GAPDH), ``'title'`` (most one capital
    then lower case: mouse symbols, Gapdh) or None (mixed, lower case, or Ensembl ids)."""
    names = pd.Index(names).astype(str)
    names = names[[bool(_LETTERS.search(n)) and not n.startswith("ENS") for n in names]]
    if len(names) < 20:
        return None
    letters = names.str.replace(r"[^A-Za-z]", "", regex=True)
    letters = letters[letters.str.len() >= 2]
    if len(letters) == 0:
        return None
    upper = float(letters.str.isupper().mean())
    title = float((letters.str[0].str.isupper() & letters.str[1:].str.islower()).mean())
    if upper >= 0.6:
        return "upper"
    if title >= 0.6:
        return "title"
    return None


def _check_gene_case(slide_genes: pd.Index, reference_genes, report: ReferenceReport) -> None:
    slide_case, ref_case = gene_name_case(slide_genes), gene_name_case(reference_genes)
    if slide_case is None or ref_case is None or slide_case == ref_case:
        return
    spelled = {"upper": "all capitals (human symbols?)", "title": "capitalised (mouse symbols?)"}
    report.findings.append(
        ReferenceFinding(
            "gene_name_case",
            (),
            f"the slide's gene names are {spelled[slide_case]} and the reference's "
            f"{spelled[ref_case]}: slide and reference may be from different species. Use a "
            "reference of the slide's species, or map the genes to orthologues (matching "
            "names with case ignored is not a species conversion)",
        )
    )


def _check_shared_genes(n_shared: int, n_reference: int, report: ReferenceReport) -> None:
    if n_reference == 0 or n_shared / n_reference >= MIN_SHARED_FRACTION:
        return
    report.findings.append(
        ReferenceFinding(
            "few_shared_genes",
            (),
            f"only {n_shared} of the reference's {n_reference} genes "
            f"({100 * n_shared / n_reference:.0f} %) are in the slide. Expected for a targeted "
            "gene panel; otherwise check that both use the same gene naming (symbols or "
            "Ensembl ids, genome version) and species",
        )
    )


def _check_collinear(B: np.ndarray, types: list[str], report: ReferenceReport) -> None:
    """Each column of B (genes x types, columns summing to one) by NNLS of the other columns,
    in the Poisson-standardised space of the data term (genes weighted by 1/sqrt(mean))."""
    p = B.shape[1]
    if p < 2 or B.shape[0] < 2:
        return
    mean = B.mean(1)
    floor = max(np.quantile(mean[mean > 0], 0.01), 1e-12) if (mean > 0).any() else 1.0
    Bw = B / np.sqrt(np.maximum(mean, floor))[:, None]
    for t in range(p):
        others = [j for j in range(p) if j != t]
        w, res = nnls(Bw[:, others], Bw[:, t], maxiter=50 * p)
        relative = res / max(np.linalg.norm(Bw[:, t]), 1e-300)
        report.collinearity_residual[types[t]] = float(relative)
        if relative >= COLLINEAR_RESIDUAL:
            continue
        share = w / max(w.sum(), 1e-300)
        order = np.argsort(-share, kind="stable")
        named = [types[others[j]] for j in order if share[j] >= _NAMED_WEIGHT_SHARE]
        report.findings.append(
            ReferenceFinding(
                "collinear_types",
                (types[t], *named),
                f"cell type {types[t]!r} is nearly a mix of {named} on the selected genes "
                f"(relative residual {relative:.2f} < {COLLINEAR_RESIDUAL}): the slide cannot "
                "tell it from that mix, so their proportions trade off against each other. "
                "Merge these types, or add genes that separate them (a larger n_markers, a "
                "slide panel with their markers)",
            )
        )


def warn_findings(report: ReferenceReport, *, stacklevel: int = 2) -> ReferenceReport:
    """Emit each finding as a :class:`~napari_stlnmf.errors.ReferenceWarning`."""
    for finding in report.findings:
        warnings.warn(finding.message, ReferenceWarning, stacklevel=stacklevel + 1)
    return report


def check_before_fit(reference, slide_genes, prepared, *, case_insensitive: bool = False) -> dict:
    """The pipeline's call: check the reference as read (before any sub-type split) on the genes
    the fit uses, warn each finding, and return :meth:`ReferenceReport.as_info`."""
    matching = prepared.info.get("gene_matching") or {}
    report = check_reference(
        reference,
        slide_genes,
        genes=prepared.genes,
        n_shared_genes=matching.get("n_shared_genes"),
        case_insensitive=case_insensitive,
    )
    return warn_findings(report, stacklevel=4).as_info()
