"""napari-stlnmf: cell-type deconvolution of spatial transcriptomics by unrolled STL NMF.

The compute core (``io``, ``graph``, ``model``, ``simulate``, ``train``, ``metrics``,
``deconvolve``, ``layers``) imports neither Qt nor napari; everything that does lives in the
``_napari`` subpackage (dock widget, reader, writer, sample data).
"""

__version__ = "0.1.0"

from . import io
from .errors import ReferenceWarning, StlnmfError

__all__ = [
    "BatchResult",
    "Cancelled",
    "DeconvolutionResult",
    "ReferenceWarning",
    "StlnmfError",
    "__version__",
    "deconvolve",
    "deconvolve_many",
    "deconvolve_tiled",
    "io",
]

# Imported on first use (PEP 562): the api pulls in torch, which `import napari_stlnmf.io`
# (and the napari reader, asked about every file napari opens) must not pay for.
_FROM_API = {"Cancelled", "DeconvolutionResult", "deconvolve"}
_FROM_TILING = {"deconvolve_tiled"}
# dask is imported by deconvolve_many's call only (the [distributed] extra)
_FROM_DISTRIBUTED = {"BatchResult", "deconvolve_many"}


def __getattr__(name):
    if name in _FROM_API:
        from . import api

        return getattr(api, name)
    if name in _FROM_DISTRIBUTED:
        from . import distributed

        return getattr(distributed, name)
    if name in _FROM_TILING:
        from . import tiling

        return getattr(tiling, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _FROM_API | _FROM_DISTRIBUTED | _FROM_TILING)
