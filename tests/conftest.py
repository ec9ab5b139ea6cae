"""Shared fixtures (the bundled demo, the shared data folder) and the display guard of the GUI
tests: Qt aborts the interpreter where it cannot open a display, so whether it can is found out
in a child process before anything in this session imports Qt, and the GUI tests skip if not."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# fixtures that open Qt windows; tests that start napari in a subprocess are marked `gui` by hand
GUI_FIXTURES = {"make_napari_viewer", "make_napari_viewer_proxy", "qtbot", "qapp"}
_QT_PROBE = (
    "from qtpy.QtWidgets import QApplication, QWidget; app = QApplication([]); QWidget().show()"
)
_display_problem: str | None = None


def _install_hint() -> str:
    """The command that installs the GUI tests' system packages (the list lives in the script)."""
    script = ROOT / "scripts" / "install-gui-deps.sh"
    text = script.read_text() if script.is_file() else ""
    found = re.search(r'^packages="(.*?)"', text, flags=re.DOTALL | re.MULTILINE)
    packages = " ".join(found.group(1).replace("\\\n", " ").split()) if found else "xvfb"
    return f"sudo apt-get install -y --no-install-recommends {packages} (or: make test, as root)"


def _find_display_problem() -> str | None:
    """Why Qt cannot open a window in this session, or None; asked of a child process."""
    if not sys.platform.startswith("linux"):
        return None
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        return "no display: Xvfb is not installed (pytest-xvfb starts it when it is)"
    try:
        probe = subprocess.run(
            [sys.executable, "-c", _QT_PROBE],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "Qt did not open a window within 120 s"
    if probe.returncode != 0:
        lines = [line for line in probe.stderr.splitlines() if line.strip()]
        detail = next(
            (line for line in lines if "plugin" in line.lower()), lines[-1] if lines else ""
        )
        return f"Qt cannot open a window on display {os.environ.get('DISPLAY')!r}: {detail.strip()}"
    return None


@pytest.hookimpl(trylast=True)  # after pytest-xvfb has started Xvfb and set DISPLAY
def pytest_configure(config):
    global _display_problem
    config.addinivalue_line("markers", "gui: needs a display (Qt windows); skipped where none")
    _display_problem = _find_display_problem()
    if _display_problem and os.environ.get("STLNMF_REQUIRE_GUI"):
        raise pytest.UsageError(f"STLNMF_REQUIRE_GUI is set but {_display_problem}")


def pytest_report_header(config):
    if _display_problem:
        return (
            f"napari GUI tests will be SKIPPED: {_display_problem}. To run them: {_install_hint()}"
        )
    return None


def pytest_collection_modifyitems(config, items):
    skip = None
    if _display_problem:
        skip = pytest.mark.skip(reason=f"{_display_problem}; install with: {_install_hint()}")
    for item in items:
        if GUI_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.gui)
        if skip is not None and item.get_closest_marker("gui"):
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    if _display_problem:
        terminalreporter.write_line(
            f"napari GUI tests were skipped: {_display_problem}. To run them: {_install_hint()}",
            yellow=True,
        )


# ../shared/data beside the repository (developers and CI); STLNMF_SHARED_DATA overrides
SHARED_DATA = Path(
    os.environ.get("STLNMF_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)


def write_10x_h5(path, counts, barcodes, names, ids, feature_types, *, attrs=None) -> None:
    """Write a 10x feature-barcode HDF5 matrix; ``counts`` is genes x barcodes (Space Ranger
    stores it CSC over barcodes)."""
    import h5py
    from scipy import sparse

    csc = sparse.csc_matrix(counts)
    with h5py.File(path, "w") as f:
        for key, value in (attrs or {}).items():
            f.attrs[key] = np.bytes_(value)
        grp = f.create_group("matrix")
        grp["data"] = csc.data
        grp["indices"] = csc.indices.astype(np.int64)
        grp["indptr"] = csc.indptr.astype(np.int64)
        grp["shape"] = np.array(csc.shape, dtype=np.int32)
        grp["barcodes"] = np.array(barcodes, dtype="S")
        feats = grp.create_group("features")
        feats["name"] = np.array(names, dtype="S")
        feats["id"] = np.array(ids, dtype="S")
        feats["feature_type"] = np.array(feature_types, dtype="S")


def shared_dir(name: str) -> Path:
    folder = SHARED_DATA / name
    if not folder.is_dir():
        pytest.skip(f"shared data folder {folder} not available")
    return folder


@pytest.fixture(scope="session")
def demo():
    from napari_stlnmf.datasets import load_demo

    return load_demo()


@pytest.fixture(scope="session")
def demo_reference(demo):
    from napari_stlnmf.preprocess import build_reference

    return build_reference(demo[1], cell_type_key="cell_type")


@pytest.fixture(scope="session")
def trained_demo(demo, tmp_path_factory):
    """The full pipeline (training included) on the demo slide, computed once; with the path
    of the saved trained parameters."""
    from napari_stlnmf import deconvolve

    slide, reference = demo
    path = tmp_path_factory.mktemp("model") / "demo_model.pt"
    return deconvolve(
        slide, reference, cell_type_key="cell_type", train=True, seed=0, save_params=path
    ), path


@pytest.fixture(scope="session")
def trained_demo_result(trained_demo):
    return trained_demo[0]


@pytest.fixture
def rng():
    return np.random.default_rng(0)
