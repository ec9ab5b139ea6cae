"""Awkward files a new user feeds the readers (issue 17): each gets one clear error of our own
type naming the problem and the fix, or is read correctly. Listed in docs/robustness.md."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from io_testdata import make_outs, small_slide

from napari_stlnmf import io
from napari_stlnmf.errors import CoordinateError, FileFormatError, ImageMismatchError

GENES = ["g1", "g2", "g3"]
SPOTS = ["s1", "s2", "s3", "s4"]


def _bad_h5ad(tmp_path, kind: str):
    path = tmp_path / f"{kind}.h5ad"
    if kind == "truncated":
        small_slide(dense=True).write_h5ad(tmp_path / "full.h5ad")
        data = (tmp_path / "full.h5ad").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        path.write_text("barcode,g1\ns1,1\n")
    else:
        path.write_bytes(b"")
    return path


@pytest.mark.parametrize("kind", ["truncated", "text", "empty"])
def test_unreadable_h5ad_slide_is_named(tmp_path, kind):
    with pytest.raises(FileFormatError, match="not a readable .h5ad"):
        io.read_slide(_bad_h5ad(tmp_path, kind))


@pytest.mark.parametrize("kind", ["truncated", "text", "empty"])
def test_unreadable_h5ad_reference_is_named(tmp_path, kind):
    path = _bad_h5ad(tmp_path, kind)
    with pytest.raises(FileFormatError, match="as the reference: it is not a readable"):
        io.read_reference(path, cell_type_key="cell_type")
    with pytest.raises(FileFormatError, match="not a readable"):
        io.reference_columns(path)


def test_reference_folder_is_named_a_folder(tmp_path):
    with pytest.raises(FileFormatError, match="is a folder; give the reference file itself"):
        io.read_reference(tmp_path)


def _coords_file(tmp_path, text=None):
    path = tmp_path / "coords.csv"
    path.write_text(
        text or "spot,x,y\n" + "".join(f"{s},{i},{i * 2}\n" for i, s in enumerate(SPOTS))
    )
    return path


def test_empty_counts_csv(tmp_path):
    (tmp_path / "counts.csv").write_text("")
    with pytest.raises(FileFormatError, match="is empty: a table needs a header"):
        io.read_slide(tmp_path / "counts.csv", coords=_coords_file(tmp_path))


def test_empty_coords_csv(tmp_path):
    counts = tmp_path / "counts.csv"
    counts.write_text("spot,g1\ns1,1\n")
    (tmp_path / "xy.csv").write_text("")
    with pytest.raises(FileFormatError, match="is empty"):
        io.read_slide(counts, coords=tmp_path / "xy.csv")


def test_empty_signature_csv(tmp_path):
    (tmp_path / "sig.csv").write_text("")
    with pytest.raises(FileFormatError, match="is empty"):
        io.read_reference(tmp_path / "sig.csv")


@pytest.mark.parametrize("sep", ["|", ":"])
def test_unknown_delimiter_is_refused_not_read_as_an_empty_transposed_slide(tmp_path, sep):
    """Before: one column of ids, zero genes, and a 'transposed' warning."""
    counts = tmp_path / "counts.csv"
    rows = [sep.join(["spot", *GENES])] + [sep.join([s, "1", "2", "3"]) for s in SPOTS]
    counts.write_text("\n".join(rows) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no misleading "transposed" warning either
        with pytest.raises(FileFormatError, match="reads as a single column"):
            io.read_slide(counts, coords=_coords_file(tmp_path))


def test_semicolon_table_with_decimal_commas_is_read_as_numbers(tmp_path):
    counts = tmp_path / "counts.csv"
    counts.write_text("spot;g1;g2;g3\n" + "".join(f"{s};1;0;2\n" for s in SPOTS))
    coords = _coords_file(
        tmp_path, "spot;x;y\n" + "".join(f"{s};{i},5;{i},25\n" for i, s in enumerate(SPOTS))
    )
    slide = io.read_slide(counts, coords=coords)
    np.testing.assert_allclose(slide.obsm["spatial"][:, 0], [0.5, 1.5, 2.5, 3.5])
    np.testing.assert_allclose(slide.obsm["spatial"][:, 1], [0.25, 1.25, 2.25, 3.25])


@pytest.mark.parametrize("columns", [("row", "col"), ("a", "b"), ("X_centroid", "Y_centroid")])
def test_coordinate_columns_not_named_x_y_are_not_guessed(tmp_path, columns):
    counts = tmp_path / "counts.csv"
    counts.write_text("spot,g1\n" + "".join(f"{s},1\n" for s in SPOTS))
    text = f"spot,{columns[0]},{columns[1]}\n" + "".join(
        f"{s},{i},{9 - i}\n" for i, s in enumerate(SPOTS)
    )
    with pytest.raises(CoordinateError, match=f"found '{columns[0]}', '{columns[1]}'.*Rename"):
        io.read_slide(counts, coords=_coords_file(tmp_path, text))
    frame = pd.DataFrame({columns[0]: [1.0, 2.0], columns[1]: [3.0, 4.0]}, index=["s1", "s2"])
    with pytest.raises(CoordinateError, match="Rename the two position columns to x"):
        io.coords.read_coords(frame, None)


def test_image_with_an_h5ad_slide_is_refused(tmp_path):
    path = tmp_path / "slide.h5ad"
    small_slide(dense=True).write_h5ad(path)
    with pytest.raises(FileFormatError, match="image= gives a tissue image to a counts table"):
        io.read_slide(path, image=np.zeros((10, 10, 3), np.uint8))


def test_missing_scalefactors_json_is_named_and_its_images_left_out(tmp_path):
    outs = make_outs(tmp_path, header=True)
    (outs / "spatial" / "scalefactors_json.json").unlink()
    with pytest.warns(UserWarning, match="scalefactors_json.json' is missing"):
        slide = io.read_slide(outs)
    # nothing downstream (graph features, PNG maps, napari layers) meets an unplaceable image
    assert io.get_image(slide) is None
    assert io.spot_diameter(slide) > 0


def test_hdf5_file_that_is_not_anndata_is_named(tmp_path):
    import h5py

    path = tmp_path / "matrix.h5ad"  # e.g. a 10x filtered_feature_bc_matrix.h5 renamed
    with h5py.File(path, "w") as f:
        f.create_group("matrix").create_dataset("data", data=np.arange(3))
    with pytest.raises(FileFormatError, match="HDF5 but not an AnnData"):
        io.read_slide(path)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"scalefactor": 0}, "scalefactor must be a positive number"),
        ({"scalefactor": "2"}, "scalefactor must be a positive number"),
        ({"spot_diameter": -3.0}, "spot_diameter must be a positive number"),
        ({"spot_diameter": float("inf")}, "spot_diameter must be a positive number"),
        ({"bin_size": 8}, "bin_size= gives the Visium HD bins to read"),
    ],
)
def test_counts_table_scale_options_are_checked(tmp_path, options, message):
    counts = tmp_path / "counts.csv"
    counts.write_text("spot,g1\n" + "".join(f"{s},1\n" for s in SPOTS))
    coords = _coords_file(
        tmp_path, "spot,x,y\n" + "".join(f"{s},{i},{i}\n" for i, s in enumerate(SPOTS))
    )
    with pytest.raises((FileFormatError, ImageMismatchError), match=message):
        io.read_slide(counts, coords=coords, **options)


@pytest.mark.parametrize("option", [{"coords": "xy"}, {"spot_diameter": 40.0}, {"sep": ";"}])
def test_options_a_space_ranger_folder_would_drop_are_refused(tmp_path, option):
    outs = make_outs(tmp_path, header=True)
    if "coords" in option:
        option = {"coords": np.zeros((4, 2))}
    with pytest.raises(FileFormatError, match="would ignore it"):
        io.read_slide(outs, **option)


def test_barcodes_without_a_position_are_named(tmp_path):
    outs = make_outs(tmp_path, header=True)
    positions = outs / "spatial" / "tissue_positions.csv"
    lines = positions.read_text().splitlines()
    positions.write_text("\n".join(lines[:-1]) + "\n")  # one barcode's position lost
    with pytest.raises(CoordinateError, match="1 of .* have no position in .*same Space Ranger"):
        io.read_slide(outs)
