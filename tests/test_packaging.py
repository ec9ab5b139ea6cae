"""The wheel ships the napari manifest and the sample data, and npe2 finds the plugin.

Builds the wheel from a copy of the sources (so the repo gets no build/ or egg-info),
checks it with twine, installs it with ``--no-deps`` into a fresh venv whose dependencies
come from this venv's site-packages (minus the editable napari-stlnmf install), and asks
npe2 there for the plugin, its widget and its sample data. Also checks that the editable
install resolves the manifest through the ``napari.manifest`` entry point.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = "napari_stlnmf"
DATA_FILES = [
    "demo_slide.h5ad",
    "demo_reference.h5ad",
    "histology_tissue_lowres_image.png",
    "histology_tissue_positions.csv",
    "histology_scalefactors_json.json",
    "histology_README.md",
    "LICENSE_scanpy.txt",
]
WIDGET = "Deconvolve cell types"


def _run(cmd, **kwargs):
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _clean_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PYTHONNOUSERSITE"] = "1"
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("build")
    src = tmp / "src_copy"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "napari.yaml"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", symlinks=True, ignore=ignore)
    out = tmp / "dist"
    _run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(src)],
        env=_clean_env(),
        timeout=600,
    )
    wheels = list(out.glob("napari_stlnmf-*.whl"))
    assert len(wheels) == 1
    return wheels[0]


def test_manifest_symlink_in_source_tree():
    link = ROOT / "src" / PKG / "napari.yaml"
    assert link.is_symlink() and link.resolve() == (ROOT / "napari.yaml").resolve()


def test_wheel_contains_manifest_and_data(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert f"{PKG}/napari.yaml" in names
        assert zf.read(f"{PKG}/napari.yaml") == (ROOT / "napari.yaml").read_bytes()
        for name in DATA_FILES:
            assert f"{PKG}/data/{name}" in names, name
        for module in (
            "_napari/widget",
            "_napari/reader",
            "_napari/writer",
            "_napari/sample_data",
            "layers",
            "histology",
        ):
            assert f"{PKG}/{module}.py" in names
        ep = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        entry_points = zf.read(ep).decode()
    assert "[napari.manifest]" in entry_points
    assert f"napari-stlnmf = {PKG}:napari.yaml" in entry_points


def test_twine_check(wheel):
    proc = _run([sys.executable, "-m", "twine", "check", "--strict", str(wheel)])
    assert "PASSED" in proc.stdout


def _deps_view(target: Path) -> Path:
    """This venv's site-packages without napari-stlnmf (symlinks), for a .pth file."""
    site = Path(sysconfig.get_paths()["purelib"])
    target.mkdir()
    for entry in site.iterdir():
        low = entry.name.lower()
        if "napari_stlnmf" in low or "napari-stlnmf" in low or low.endswith(".pth"):
            continue
        (target / entry.name).symlink_to(entry)
    return target


def _site_packages(py: Path) -> Path:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return Path(_run([str(py), "-c", code]).stdout.strip())


@pytest.fixture(scope="module")
def wheel_python(wheel, tmp_path_factory) -> Path:
    """A fresh venv with only the wheel installed (dependencies linked from this one)."""
    tmp_path = tmp_path_factory.mktemp("wheel_venv")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    site = _site_packages(py)
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "--no-deps",
            "--no-index",
            "--quiet",
            str(wheel),
        ],
        env=_clean_env(),
    )
    (site / "_stlnmf_test_deps.pth").write_text(str(_deps_view(tmp_path / "deps")) + "\n")
    return py


def test_wheel_install_registers_plugin(wheel_python, tmp_path):
    py = wheel_python
    site = _site_packages(py)
    script = textwrap.dedent(f"""
        import importlib.metadata as md, json, sys
        import npe2
        import napari_stlnmf
        pm = npe2.PluginManager.instance()
        pm.discover()
        mf = pm.get_manifest("napari-stlnmf")
        dists = [d.metadata["Name"] for d in md.distributions()
                 if d.metadata["Name"] and d.metadata["Name"].lower() == "napari-stlnmf"]
        print(json.dumps({{
            "module": napari_stlnmf.__file__,
            "dists": dists,
            "widgets": [w.display_name for w in mf.contributions.widgets],
            "samples": [s.key for s in mf.contributions.sample_data],
            "readers": [r.command for r in mf.contributions.readers],
            "writers": [w.command for w in mf.contributions.writers],
        }}))
        wc = next(w for w in pm.iter_widgets() if w.display_name == "{WIDGET}")
        cls = wc.get_callable()  # imports the widget module (napari, Qt) from the wheel
        print("WIDGET_OK", cls.__name__, sys.modules[cls.__module__].__file__)
    """)
    proc = _run([str(py), "-c", script], env=_clean_env(), cwd=tmp_path)
    import json

    info = json.loads(proc.stdout.splitlines()[0])
    assert info["module"].startswith(str(site)), info["module"]  # the wheel, not src/
    assert info["dists"] == ["napari-stlnmf"]
    assert WIDGET in info["widgets"]
    assert set(info["samples"]) == {"demo", "histology"}
    assert info["readers"] and info["writers"]
    ok = next(line for line in proc.stdout.splitlines() if line.startswith("WIDGET_OK"))
    assert "DeconvolveWidget" in ok and str(site) in ok
    # the npe2 command line sees it too
    listed = _run([str(py), "-m", "npe2", "list"], env=_clean_env(), cwd=tmp_path).stdout
    assert "napari-stlnmf" in listed
    _run([str(py), "-m", "npe2", "validate", "napari-stlnmf"], env=_clean_env(), cwd=tmp_path)


@pytest.mark.gui
def test_wheel_install_docks_widget(wheel_python, tmp_path):
    """napari, started from the wheel install, docks the widget as the Plugins menu does."""
    py = wheel_python
    site = _site_packages(py)
    dock = textwrap.dedent(f"""
        import napari, napari_stlnmf
        viewer = napari.Viewer(show=False)
        dw, widget = viewer.window.add_plugin_dock_widget("napari-stlnmf", "{WIDGET}")
        print("DOCKED", type(widget).__name__, napari_stlnmf.__file__)
        viewer.close()
    """)
    docked = _run([str(py), "-c", dock], env=_clean_env(), cwd=tmp_path, timeout=300).stdout
    assert "DOCKED DeconvolveWidget" in docked and str(site) in docked


def test_editable_install_resolves_manifest(tmp_path):
    script = textwrap.dedent("""
        import npe2, napari_stlnmf
        from pathlib import Path
        pm = npe2.PluginManager.instance()
        pm.discover()
        mf = pm.get_manifest("napari-stlnmf")
        print(napari_stlnmf.__file__)
        print([w.display_name for w in mf.contributions.widgets])
    """)
    proc = _run([sys.executable, "-c", script], env=_clean_env(), cwd=tmp_path)
    module, widgets = proc.stdout.splitlines()[:2]
    assert Path(module).resolve().is_relative_to((ROOT / "src").resolve())
    assert WIDGET in widgets
