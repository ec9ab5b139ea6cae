"""napari_stlnmf.io.images: tissue images of any common kind become uint8 H x W x 3."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from napari_stlnmf.errors import FileFormatError
from napari_stlnmf.io.images import read_image, to_uint8_rgb


@pytest.mark.parametrize(
    ("image", "expected_top"),
    [
        (np.full((4, 5), 7, dtype=np.uint8), 7),  # grey
        (np.full((4, 5, 4), 9, dtype=np.uint8), 9),  # RGBA
        (np.full((3, 4, 5), 0.5, dtype=np.float32), 127),  # channel-first float in [0, 1]
        (np.full((4, 5, 3), 65535, dtype=np.uint16), 255),  # 16-bit
        (np.ones((4, 5), dtype=bool), 255),
    ],
    ids=["grey", "rgba", "channel_first_float", "uint16", "bool"],
)
def test_to_uint8_rgb(image, expected_top):
    out = to_uint8_rgb(image)
    assert out.dtype == np.uint8 and out.shape == (4, 5, 3)
    assert int(out.max()) == expected_top


def test_read_image_and_errors(tmp_path):
    pixels = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    Image.fromarray(pixels).save(tmp_path / "tissue.png")
    np.testing.assert_array_equal(read_image(tmp_path / "tissue.png"), pixels)
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "missing.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(FileFormatError, match="Cannot read image"):
        read_image(tmp_path / "broken.png")
    with pytest.raises(FileFormatError, match="H x W"):
        to_uint8_rgb(np.zeros((2, 2, 2, 2)))
