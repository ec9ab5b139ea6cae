"""Exception types raised on bad input.

Every message says what is wrong *and* what to do about it. All derive from
:class:`StlnmfError` (a ``ValueError``) so callers can catch one type.
"""

from __future__ import annotations


class StlnmfError(ValueError):
    """Base class of every input error raised by napari-stlnmf."""


class GeneMismatchError(StlnmfError):
    """Slide and reference share no or too few genes."""


class DuplicateNamesError(StlnmfError):
    """Duplicate barcodes (spot names) or gene names."""


class InvalidCountsError(StlnmfError):
    """Counts contain NaN, infinite or negative values, or no spot has counts."""


class NotRawCountsError(InvalidCountsError):
    """Values that are not raw counts (log-transformed, normalised to a fixed total, scaled or
    not whole numbers) where raw counts are needed, and none were found elsewhere in the
    AnnData (``layers['counts']``, ``.raw``)."""


class CoordinateError(StlnmfError):
    """Spot coordinates are missing, non-finite or do not match the spots."""


class CellTypeKeyError(StlnmfError):
    """The requested cell-type column does not exist in the reference."""


class EmptyCellTypeError(StlnmfError):
    """A reference cell type has no (or too few) cells or no expression."""


class ImageMismatchError(StlnmfError):
    """The tissue image does not cover the spots at the given scale factor."""


class FileFormatError(StlnmfError):
    """A file or folder cannot be read as a slide, reference or model."""


class SpatialDataError(FileFormatError):
    """A SpatialData object or store cannot be read or written as asked (or spatialdata is
    not installed)."""


class OutputFolderError(StlnmfError):
    """The output folder cannot take the results: it is a file, lies under a file, is not
    writable, or holds another run's results (the CLI's ``--overwrite`` replaces them)."""


class ReferenceWarning(UserWarning):
    """The reference may not support a trustworthy fit (nearly collinear types, types with few
    cells, placeholder labels, another species' gene names, most genes missing from the
    slide): found by :func:`napari_stlnmf.reference_check.check_reference` before the fit;
    the message says what to do. The run goes on."""


class MissingDependencyError(StlnmfError):
    """An optional dependency (an extra of napari-stlnmf) is not installed; the message names
    the ``pip install`` command."""


class BatchError(StlnmfError):
    """:func:`napari_stlnmf.deconvolve_many` cannot run as called (e.g. from a script without
    an ``if __name__ == '__main__':`` guard, which its worker processes re-run)."""
