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

Visium HD (:mod:`.visium_hd`): the sample folder, ``outs/``, ``binned_outputs/`` or one
``square_XXXum/`` folder; ``read_slide(path, bin_size=16)`` picks the bins (µm, default 8;
an absent size is an error listing those present). The matrix is the ``.h5`` file or the
MEX folder, positions come from ``tissue_positions.parquet``, and the scale factors keep
``bin_size_um`` and ``microns_per_pixel``, so the graph and the napari layers know the bins'
side in pixels (:func:`square_bin_size`; layers draw squares of it). Space Ranger 4's
``segmented_outputs/`` reads as a slide of cells at their outlines' centroids
(``obs['cell_area']``, ``obs['cell_diameter']`` in full-resolution pixels).

Each slide format is one module (:mod:`.h5ad`, :mod:`.visium_hd`, :mod:`.spaceranger`,
:mod:`.table`, :mod:`.spatialdata` for SpatialData ``.zarr`` stores with the optional extra)
registered below; :func:`read_slide` and the napari reader both go through
the registry (:mod:`.registry`). The user's objects and files are never modified: readers
return new objects and the ``validate_*`` / ``check_*`` functions only read.
"""

from . import h5ad, spaceranger, spatialdata, table, visium_hd
from .counts import FoundCounts, find_counts
from .library import (
    SPOT_DIAMETER_PER_SPACING,
    check_image_covers_spots,
    estimate_spot_diameter,
    get_image,
    get_library,
    spot_diameter,
    square_bin_size,
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
from .spatialdata import read_spatialdata, write_spatialdata_results
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
    "read_spatialdata",
    "reference_columns",
    "register_slide_format",
    "slide_counts",
    "slide_formats",
    "spot_diameter",
    "square_bin_size",
    "unregister_slide_format",
    "validate_reference",
    "validate_slide",
    "write_spatialdata_results",
]

# tried in this order; the descriptions make up the "supported inputs" of error messages
register_slide_format(h5ad.FORMAT)
# before spaceranger: a square_XXXum/ folder also holds a filtered_feature_bc_matrix.h5
register_slide_format(visium_hd.FORMAT)
register_slide_format(spaceranger.FORMAT)
register_slide_format(table.FORMAT)
register_slide_format(spatialdata.FORMAT)
