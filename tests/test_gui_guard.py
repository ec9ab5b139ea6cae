"""Without a usable display the GUI tests skip with the reason, instead of Qt aborting Python."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("display", [None, ":987"], ids=["no-display", "dead-display"])
def test_gui_module_skips_without_a_display(tmp_path, display):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DISPLAY", "WAYLAND_DISPLAY", "XAUTHORITY", "STLNMF_REQUIRE_GUI")
    }
    env["PATH"] = str(tmp_path)  # no Xvfb for pytest-xvfb to start
    if display is not None:
        env["DISPLAY"] = display  # a display nobody serves: Qt would abort in this process
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/napari/test_widget.py",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Fatal Python error" not in out and "Aborted" not in out
    assert (
        " skipped" in proc.stdout and " passed" not in proc.stdout and "failed" not in proc.stdout
    )
    assert "napari GUI tests were skipped" in proc.stdout
    assert "apt-get install" in proc.stdout and "xvfb" in proc.stdout
