"""napari-stlnmf: cell-type deconvolution of spatial transcriptomics by unrolled STL NMF.

The compute core (``io``, ``graph``, ``model``, ``simulate``, ``train``, ``metrics``,
``deconvolve``, ``layers``) imports neither Qt nor napari; everything that does lives in the
``_napari`` subpackage (dock widget, reader, writer, sample data).
"""

__version__ = "0.1.0"

from . import io
from .api import Cancelled, DeconvolutionResult, deconvolve
from .errors import StlnmfError

__all__ = ["Cancelled", "DeconvolutionResult", "StlnmfError", "__version__", "deconvolve", "io"]
