"""Shared fixtures: the bundled demo, a small simulated slide, and the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# ../shared/data beside the repository (developers and CI); STLNMF_SHARED_DATA overrides
SHARED_DATA = Path(os.environ.get("STLNMF_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


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
    return deconvolve(slide, reference, cell_type_key="cell_type", train=True, seed=0, save_params=path), path


@pytest.fixture(scope="session")
def trained_demo_result(trained_demo):
    return trained_demo[0]


@pytest.fixture
def rng():
    return np.random.default_rng(0)
