"""napari-stlnmf: cell-type deconvolution of spatial transcriptomics by unrolled STL NMF.

The compute core (``io``, ``graph``, ``model``, ``simulate``, ``train``, ``metrics``,
``deconvolve``) imports neither Qt nor napari; the napari layer lives in ``_widget``,
``_reader``, ``_writer`` and ``_sample_data``.
"""

__version__ = "0.1.0"

from . import io  # noqa: E402
from .api import Cancelled, DeconvolutionResult, deconvolve  # noqa: E402
from .errors import StlnmfError  # noqa: E402

__all__ = ["io", "deconvolve", "DeconvolutionResult", "Cancelled", "StlnmfError", "__version__"]
