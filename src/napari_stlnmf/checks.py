"""Up-front checks of the options and arguments of :func:`napari_stlnmf.deconvolve`, so that a
bad value fails at once with its allowed range instead of running on into a wrong result or a
traceback deep inside the fit."""

from __future__ import annotations

import math
import numbers
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .errors import CellTypeKeyError, StlnmfError

if TYPE_CHECKING:
    from .pipeline import DeconvolutionSettings

__all__ = [
    "check_callbacks",
    "check_cell_types_not_ids",
    "check_reference_is_not_slide",
    "check_settings_values",
    "check_signature_orientation",
    "check_slide_arguments",
]

# (name, kind, lowest, highest, may be None): integers accept numpy integer scalars, never bools
_INTEGER_OPTIONS = (
    ("n_layers", 1, 100_000, True),
    ("train_epochs", 1, 100_000, False),
    ("n_train_slides", 1, 10_000, False),
    ("n_neighbors", 1, 100, False),
    ("n_markers", 1, 100_000, False),
    ("seed", 0, 2**32 - 1, False),
    ("max_gram_bytes", 1, None, False),
    ("platform_refine_passes", 0, 100, False),
)
_BOOL_OPTIONS = (
    "train",
    "tied",
    "use_image",
    "case_insensitive",
    "calibrate_noise",
    "fit_platform_effect",
    "diagnose",
)
# types whose cells number fewer than this are "few"; a column with mostly such types is more
# likely an id, a barcode or a cluster number than a cell-type annotation
FEW_CELLS = 3


def is_integer(value: Any) -> bool:
    """Python or numpy integer, not a bool (``True`` is an int to Python, never a count here)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
    """Python or numpy real number, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _range_text(low, high) -> str:
    return f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"


def check_settings_values(settings: DeconvolutionSettings) -> None:
    """Type and range of every numeric and boolean option; the message gives the allowed range."""
    for name, low, high, optional in _INTEGER_OPTIONS:
        value = getattr(settings, name)
        if value is None and optional:
            continue
        allowed = _range_text(low, high) + (" or None (the default)" if optional else "")
        if not is_integer(value):
            raise StlnmfError(f"{name} must be {allowed}, not {value!r} ({type(value).__name__})")
        if value < low or (high is not None and value > high):
            raise StlnmfError(f"{name} must be {allowed}, not {value!r}")
    for name in _BOOL_OPTIONS:
        value = getattr(settings, name)
        if not isinstance(value, (bool, np.bool_)):
            raise StlnmfError(f"{name} must be True or False, not {value!r}")
    mp = settings.min_proportion
    if mp != "auto" and not (is_number(mp) and math.isfinite(mp) and 0 <= mp < 1):
        raise StlnmfError(f"min_proportion must be 'auto' or a number in [0, 1), not {mp!r}")
    if not isinstance(settings.device, str) and type(settings.device).__name__ != "device":
        raise StlnmfError(
            f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', not {settings.device!r}"
        )
    from .model import pick_device

    pick_device(settings.device)  # an unknown name or a missing GPU fails now, not mid-run


def check_callbacks(progress, should_stop) -> None:
    """``progress(stage, i, n)`` and ``should_stop()`` must be callables (or None)."""
    for name, value, shape in (
        ("progress", progress, "progress(stage, i, n)"),
        ("should_stop", should_stop, "should_stop() -> bool"),
    ):
        if value is not None and not callable(value):
            raise StlnmfError(
                f"{name} must be a function {shape} or None, not {type(value).__name__} "
                f"{value!r}; pass the function itself (no call brackets)"
            )


def check_slide_arguments(slide, coords) -> None:
    """``coords=`` only places the spots of a slide read from a path: refuse it with an object
    (it would be ignored; the user's object is not modified by us)."""
    from pathlib import Path

    if coords is None or isinstance(slide, (str, Path)):
        return
    raise StlnmfError(
        "coords= gives spot positions to a slide read from a file; this slide is already "
        f"an object ({type(slide).__name__}), so they would be ignored. Set them on it instead "
        "(`slide.obsm['spatial'] = xy`, one (x, y) row per spot) or pass the file's path"
    )


def check_signature_orientation(signature: pd.DataFrame, slide_genes: pd.Index) -> None:
    """A signature is genes x cell types: refuse one whose *columns* are the slide's genes."""
    genes = pd.Index(slide_genes.astype(str).str.lower())
    in_rows = pd.Index(signature.index.astype(str).str.lower()).isin(genes).sum()
    in_columns = pd.Index(signature.columns.astype(str).str.lower()).isin(genes).sum()
    if in_columns > max(in_rows, 1):
        raise StlnmfError(
            f"the signature's genes look like columns: {in_columns} of its "
            f"{signature.shape[1]} columns are slide genes, {in_rows} of its rows. A signature "
            "is genes x cell types (gene names in the first column): transpose it "
            "(`signature.T`, or save it transposed)"
        )


def check_cell_types_not_ids(labels: pd.Series, cell_type_key: str | None) -> None:
    """Refuse a cell-type column in which most "types" hold one or a few cells: it is more
    likely a cell id, barcode or cluster-number column (or the file is no single-cell
    reference, e.g. the slide itself), and fitting thousands of one-cell "types" runs for
    hours to a meaningless result."""
    sizes = labels.value_counts(dropna=True)
    sizes = sizes[sizes > 0]
    n_types = len(sizes)
    few = int((sizes < FEW_CELLS).sum())
    if n_types < 4 or few <= n_types / 2:
        return
    column = f"obs[{cell_type_key!r}]" if cell_type_key else "the cell-type column"
    raise CellTypeKeyError(
        f"{few} of the {n_types} cell types in {column} have fewer than {FEW_CELLS} cells "
        f"(median {int(np.median(sizes))}): this looks like a cell id or cluster-number column, "
        "or a file that is not a single-cell reference, not cell types. Choose the column of "
        "cell-type names (io.reference_columns(path) lists likely ones); if each row is one "
        "type's mean profile, pass it as a signature table (genes x types) instead"
    )


def check_reference_is_not_slide(cell_names: pd.Index, spot_names: pd.Index) -> None:
    """Warn when a reference's cells are mostly the slide's own spots (the slide file given as
    the reference by mistake; a warning, as a cell-resolution slide annotated by hand is a
    legitimate reference of itself)."""
    if len(cell_names) == 0:
        return
    shared = int(pd.Index(cell_names.astype(str)).isin(spot_names.astype(str)).sum())
    if shared > len(cell_names) / 2:
        warnings.warn(
            f"{shared} of the reference's {len(cell_names)} cell names are spot names of the "
            "slide: the reference looks like the slide itself. Unless these are the slide's "
            "own annotated cells, give a single-cell reference (cells x genes with a "
            "cell-type column) or a signature table (genes x types)",
            UserWarning,
            stacklevel=4,
        )
