"""napari_stlnmf.io.read_slide: inputs no registered format reads."""

from __future__ import annotations

import pytest

from napari_stlnmf import io
from napari_stlnmf.errors import FileFormatError


def test_unsupported_inputs(tmp_path):
    other = tmp_path / "slide.xlsx"
    other.write_text("x")
    with pytest.raises(FileFormatError, match=r"\.h5ad"):
        io.read_slide(other)
    with pytest.raises(FileFormatError, match=r"filtered_feature_bc_matrix\.h5"):
        io.read_slide(tmp_path)  # a folder without Space Ranger output
    with pytest.raises(FileNotFoundError):
        io.read_slide(tmp_path / "missing.h5ad")
