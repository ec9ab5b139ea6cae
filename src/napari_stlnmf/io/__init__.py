"""Read and check spatial slides and single-cell references.

Pure compute-core package: no Qt or napari import, and importing it imports neither
anndata nor torch (the napari reader asks it about every file napari opens). Slides come
back as :class:`~anndata.AnnData` objects following the scanpy/squidpy layout:

- ``X``: counts, spots x genes (float32 CSR for slides read from 10x or tables);
- ``obsm['spatial']``: (x, y) spot centres in full-resolution image pixels
  (or in the coordinate units of the input table);
- ``uns['spatial'][library_id]``: ``{'images': {'hires'|'lowres': uint8 HxWx3},
  'scalefactors': {...}, 'metadata': {...}}``, where image pixel =
  ``obsm['spatial'] * scalefactors['tissue_<key>_scalef']``.

Each slide format is one module (:mod:`.h5ad`, :mod:`.spaceranger`, :mod:`.table`)
registered below; :func:`read_slide` and the napari reader both go through the registry
(:mod:`.registry`). The user's objects and files are never modified: readers return new
objects and the ``validate_*`` / ``check_*`` functions only read.
"""

from . import h5ad, spaceranger, table
from .counts import FoundCounts, find_counts
from .library import (
    SPOT_DIAMETER_PER_SPACING,
    check_image_covers_spots,
    estimate_spot_diameter,
    get_image,
    get_library,
    spot_diameter,
)
from .reference import read_reference, reference_columns
from .registry import (
    SlideFormat,
    find_slide_format,
    register_slide_format,
    slide_formats,
    unregister_slide_format,
)
from .slide import read_slide
from .validate import slide_counts, validate_reference, validate_slide

__all__ = [
    "SPOT_DIAMETER_PER_SPACING",
    "FoundCounts",
    "SlideFormat",
    "check_image_covers_spots",
    "estimate_spot_diameter",
    "find_counts",
    "find_slide_format",
    "get_image",
    "get_library",
    "read_reference",
    "read_slide",
    "reference_columns",
    "register_slide_format",
    "slide_counts",
    "slide_formats",
    "spot_diameter",
    "unregister_slide_format",
    "validate_reference",
    "validate_slide",
]

# tried in this order; the descriptions make up the "supported inputs" of error messages
register_slide_format(h5ad.FORMAT)
register_slide_format(spaceranger.FORMAT)
register_slide_format(table.FORMAT)
