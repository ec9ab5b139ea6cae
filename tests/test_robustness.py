"""Awkward inputs a new user tries through the API and the CLI (issue 17): each gets one clear
error of our own type (the CLI: one line, a non-zero exit, no traceback) or is handled
correctly. The table in docs/robustness.md lists them with their messages."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from napari_stlnmf import deconvolve
from napari_stlnmf.cli import main, write_results
from napari_stlnmf.datasets import DEMO_CELL_TYPE_KEY as KEY
from napari_stlnmf.errors import (
    CellTypeKeyError,
    FileFormatError,
    OutputFolderError,
    StlnmfError,
)
from napari_stlnmf.output_folder import MANIFEST, check_output_folder
from napari_stlnmf.pipeline import DeconvolutionSettings

FAST = {"n_layers": 5, "fit_platform_effect": False}

# --------------------------------------------------------------------------- #
# every numeric option, up front, with its range
# --------------------------------------------------------------------------- #

BAD_SETTINGS = [
    ({"n_layers": 0}, "n_layers must be an integer from 1 to 100000 or None"),
    ({"n_layers": -3}, "n_layers must be an integer from 1"),
    ({"n_layers": 0, "method": "classic"}, "n_layers must be an integer from 1"),
    ({"n_layers": True}, r"n_layers must be .*not True \(bool\)"),
    ({"n_layers": 2.5}, r"n_layers must be .*not 2.5 \(float\)"),
    ({"n_layers": "10"}, r"n_layers must be .*\(str\)"),
    ({"n_neighbors": 0}, "n_neighbors must be an integer from 1 to 100, not 0"),
    ({"n_neighbors": False}, "n_neighbors must be an integer"),
    ({"n_markers": 0}, "n_markers must be an integer from 1"),
    ({"train_epochs": 0}, "train_epochs must be an integer from 1"),
    ({"n_train_slides": 0}, "n_train_slides must be an integer from 1"),
    ({"seed": 1.5}, r"seed must be an integer from 0 to 4294967295, not 1.5 \(float\)"),
    ({"seed": -1}, "seed must be an integer from 0"),
    ({"seed": "42"}, "seed must be an integer"),
    ({"platform_refine_passes": -1}, "platform_refine_passes must be an integer from 0"),
    ({"max_gram_bytes": 0}, "max_gram_bytes must be an integer >= 1"),
    ({"min_proportion": True}, r"min_proportion must be 'auto' or a number in \[0, 1\)"),
    ({"min_proportion": float("nan")}, "min_proportion must be 'auto' or a number"),
    ({"min_proportion": 1.0}, "min_proportion must be 'auto' or a number"),
    ({"min_proportion": "0.1"}, "min_proportion must be 'auto' or a number"),
    ({"train": "yes"}, "train must be True or False"),
    ({"use_image": None}, "use_image must be True or False"),
    ({"device": "tpu"}, "unknown device 'tpu'"),
    ({"device": "gpu"}, "unknown device 'gpu'"),
    ({"device": 0}, "device must be 'auto', 'cpu'"),
]


@pytest.mark.parametrize(("options", "message"), BAD_SETTINGS)
def test_bad_option_is_refused_with_its_range(options, message):
    with pytest.raises(StlnmfError, match=message):
        DeconvolutionSettings(**options)


def test_cuda_without_cuda_is_refused_up_front():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(StlnmfError, match="sees no CUDA GPU"):
        DeconvolutionSettings(device="cuda")


@pytest.mark.parametrize(
    "options",
    [
        {"n_layers": np.int64(20), "seed": np.int32(3), "n_neighbors": np.int16(6)},
        {"min_proportion": np.float32(0.1), "n_markers": np.uint16(50)},
        {"use_image": np.bool_(False), "min_proportion": 0},
    ],
)
def test_numpy_scalars_are_accepted(options):
    DeconvolutionSettings(**options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"progress": 5}, "progress must be a function progress"),
        ({"progress": "tqdm"}, "progress must be a function"),
        ({"should_stop": True}, r"should_stop must be a function should_stop\(\) -> bool"),
    ],
)
def test_callbacks_must_be_callable(demo, options, message):
    slide, reference = demo
    with pytest.raises(StlnmfError, match=message):
        deconvolve(slide, reference, cell_type_key=KEY, **FAST, **options)


def test_coords_with_an_anndata_slide_is_refused_not_ignored(demo):
    slide, reference = demo
    with pytest.raises(StlnmfError, match="coords= gives spot positions to a slide read"):
        deconvolve(slide, reference, cell_type_key=KEY, coords=slide.obsm["spatial"], **FAST)


# --------------------------------------------------------------------------- #
# the wrong reference
# --------------------------------------------------------------------------- #


def test_unique_id_column_as_cell_type_is_refused(demo, tmp_path):
    slide, reference = demo
    ids = reference.copy()
    ids.obs["cell_id"] = ids.obs_names.astype(str)
    with pytest.raises(CellTypeKeyError, match=r"have fewer than 3 cells.*cell id"):
        deconvolve(slide, ids, cell_type_key="cell_id", **FAST)
    path = tmp_path / "ids.h5ad"
    ids.write_h5ad(path)
    with pytest.raises(CellTypeKeyError, match="looks like a cell id"):
        deconvolve(slide, path, cell_type_key="cell_id", **FAST)


def test_slide_itself_as_reference_is_refused(demo, tmp_path):
    slide, _ = demo
    as_ref = slide.copy()
    as_ref.obs["spot"] = as_ref.obs_names.astype(str)
    with (
        pytest.warns(UserWarning, match="looks like the slide itself"),
        pytest.raises(CellTypeKeyError, match="fewer than 3 cells"),
    ):
        deconvolve(slide, as_ref, cell_type_key="spot", **FAST)


def test_transposed_signature_says_transpose_it(demo, tmp_path):
    slide, reference = demo
    counts = pd.DataFrame(
        np.asarray(reference.X.todense() if hasattr(reference.X, "todense") else reference.X),
        columns=reference.var_names,
    )
    signature = counts.groupby(reference.obs[KEY].to_numpy(), observed=True).mean().T
    with pytest.raises(StlnmfError, match="genes look like columns.*transpose it"):
        deconvolve(slide, signature.T, **FAST)
    path = tmp_path / "signature.csv"
    signature.T.to_csv(path)
    with pytest.raises(StlnmfError, match="transpose it"):
        deconvolve(slide, path, **FAST)


def test_reference_folder_is_named_a_folder(demo, tmp_path):
    slide, _ = demo
    with pytest.raises(FileFormatError, match="is a folder"):
        deconvolve(slide, tmp_path, cell_type_key=KEY, **FAST)


def test_truncated_reference_h5ad_through_the_api(demo, tmp_path):
    slide, reference = demo
    reference.write_h5ad(tmp_path / "full.h5ad")
    data = (tmp_path / "full.h5ad").read_bytes()
    (tmp_path / "cut.h5ad").write_bytes(data[: len(data) // 3])
    with pytest.raises(FileFormatError, match="truncated"):
        deconvolve(slide, tmp_path / "cut.h5ad", cell_type_key=KEY, **FAST)


# --------------------------------------------------------------------------- #
# one run, its results written (cell-type names with "/")
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def slashed_result(demo):
    """The demo with a type renamed 'T/NK', numpy scalars as options: one real run."""
    slide, reference = demo
    reference = reference.copy()
    first = reference.obs[KEY].cat.categories[0]
    reference.obs[KEY] = reference.obs[KEY].cat.rename_categories({first: "T/NK"})
    return deconvolve(
        slide,
        reference,
        cell_type_key=KEY,
        n_layers=np.int64(10),
        seed=np.int32(0),
        **{k: v for k, v in FAST.items() if k != "n_layers"},
    )


def test_slash_in_type_names_is_stored_without_anndatas_deprecation(slashed_result, tmp_path):
    result = slashed_result
    assert "T/NK" in result.proportions.columns  # the user's names in the tables
    adata = result.adata
    assert "stlnmf_T_NK" in adata.obs and "T_NK" in adata.obsm["stlnmf_proportions"].columns
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*[Ss]lash.*")
        adata.write_h5ad(tmp_path / "r.h5ad")
    back = ad.read_h5ad(tmp_path / "r.h5ad").uns["stlnmf"]
    mapping = dict(zip(back["cell_types"], back["stored_type_names"], strict=True))
    assert mapping["T/NK"] == "T_NK"


def test_interrupted_write_leaves_no_half_written_file(slashed_result, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def fail(*args, **kwargs):
        raise KeyboardInterrupt  # the user's Ctrl-C in the middle of writing

    monkeypatch.setattr(ad.AnnData, "write_h5ad", fail)
    with pytest.raises(KeyboardInterrupt):
        write_results(slashed_result, out, plots=False)
    assert sorted(p.name for p in out.iterdir()) == []  # no CSV, no staging folder


def test_overwrite_replaces_our_files_only(slashed_result, tmp_path):
    out = tmp_path / "out"
    write_results(slashed_result, out, plots=False)
    (out / "map_OldType.png").write_bytes(b"png")  # a map of a type the new run lacks
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputFolderError, match="already holds the results of another run"):
        check_output_folder(out, overwrite=False)
    previous = check_output_folder(out, overwrite=True)
    written = write_results(slashed_result, out, plots=False, previous=previous)
    names = sorted(p.name for p in out.iterdir())
    assert "map_OldType.png" not in names and "notes.txt" in names and MANIFEST in names
    assert all(p.is_file() for p in written)
    assert not [n for n in names if n.startswith(".stlnmf-partial")]


def test_unwritable_output_folder_is_refused(tmp_path, monkeypatch):
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", denied)
    with pytest.raises(OutputFolderError, match="permission denied"):
        check_output_folder(tmp_path / "out", overwrite=False)


# --------------------------------------------------------------------------- #
# the CLI: one message, a non-zero exit, never a traceback
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def demo_files(demo, tmp_path_factory):
    slide, reference = demo
    folder = tmp_path_factory.mktemp("cli")
    slide.write_h5ad(folder / "slide.h5ad")
    reference.write_h5ad(folder / "ref.h5ad")
    return folder


def _run(folder, out, *extra):
    argv = ["run", "--slide", str(folder / "slide.h5ad"), "--reference", str(folder / "ref.h5ad")]
    return main([*argv, "--cell-type-key", KEY, "--out", str(out), "--quiet", *extra])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ")
    return err


def test_cli_layers_zero(demo_files, tmp_path, capsys):
    assert _run(demo_files, tmp_path / "o", "--layers", "0") == 2
    assert "n_layers must be an integer from 1" in _one_error_line(capsys)


def test_cli_method_classic_layers_zero(demo_files, tmp_path, capsys):
    assert _run(demo_files, tmp_path / "o", "--method", "classic", "--layers", "0") == 2
    assert "n_layers must be" in _one_error_line(capsys)


def test_cli_neighbors_zero(demo_files, tmp_path, capsys):
    assert _run(demo_files, tmp_path / "o", "--neighbors", "0") == 2
    assert "n_neighbors must be an integer from 1 to 100" in _one_error_line(capsys)


@pytest.mark.parametrize("device", ["tpu", "cuda:7"])
def test_cli_unknown_or_missing_device(demo_files, tmp_path, capsys, device):
    assert _run(demo_files, tmp_path / "o", "--device", device) == 2
    assert f"{device!r}" in _one_error_line(capsys)


def test_cli_image_with_h5ad_slide(demo_files, tmp_path, capsys):
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "he.png")
    assert _run(demo_files, tmp_path / "o", "--image", str(tmp_path / "he.png")) == 2
    assert "image= gives a tissue image to a counts table" in _one_error_line(capsys)


def test_cli_out_is_a_file(demo_files, tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    assert _run(demo_files, tmp_path / "taken") == 2
    assert "is a file, not a folder" in _one_error_line(capsys)


def test_cli_out_under_a_file(demo_files, tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    assert _run(demo_files, tmp_path / "taken" / "out") == 2
    assert "which is a file" in _one_error_line(capsys)


def test_cli_truncated_slide(demo_files, tmp_path, capsys):
    data = (demo_files / "slide.h5ad").read_bytes()
    (tmp_path / "slide.h5ad").write_bytes(data[: len(data) // 2])
    (tmp_path / "ref.h5ad").write_bytes((demo_files / "ref.h5ad").read_bytes())
    assert _run(tmp_path, tmp_path / "o") == 2
    assert "not a readable .h5ad" in _one_error_line(capsys)


def test_cli_unexpected_error_is_one_line(demo_files, tmp_path, capsys, monkeypatch):
    import napari_stlnmf

    def broken(*args, **kwargs):
        raise RuntimeError("something deep inside")

    monkeypatch.setattr(napari_stlnmf, "deconvolve", broken)
    assert _run(demo_files, tmp_path / "o") == 1
    err = _one_error_line(capsys)
    assert "RuntimeError: something deep inside" in err and "STLNMF_TRACEBACK=1" in err


def test_cli_refuses_another_runs_folder_then_overwrites(demo_files, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(demo_files, out, "--layers", "5") == 0
    (out / "map_Gone.png").write_bytes(b"old map of a type no longer there")
    capsys.readouterr()
    assert _run(demo_files, out, "--layers", "5") == 2
    assert "already holds the results of another run" in _one_error_line(capsys)
    assert _run(demo_files, out, "--layers", "5", "--overwrite") == 0
    assert not (out / "map_Gone.png").exists() and (out / "proportions.csv").is_file()
    assert pd.read_csv(out / "proportions.csv", index_col=0).shape[0] > 0


@pytest.mark.parametrize(
    ("option", "value"),
    [("--scalefactor", "2"), ("--spot-diameter", "50"), ("--bin-size", "8")],
)
def test_cli_table_and_hd_options_with_h5ad_slide_are_refused(
    demo_files, tmp_path, capsys, option, value
):
    # an .h5ad slide carries its own scale, spot size and bins: these would be dropped silently
    assert _run(demo_files, tmp_path / "o", option, value) == 2
    name = option.lstrip("-").replace("-", "_")
    assert f"{name}= gives" in _one_error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_cli_ctrl_c_exits_130_without_a_result(demo_files, tmp_path, capsys, monkeypatch):
    import napari_stlnmf

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # the user's Ctrl-C in the middle of the fit

    monkeypatch.setattr(napari_stlnmf, "deconvolve", interrupted)
    out = tmp_path / "o"
    assert _run(demo_files, out) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("interrupted")
    assert not out.exists() or not any(out.iterdir())
