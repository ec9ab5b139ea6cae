"""The result layers' Qt-free logic (napari_stlnmf.layers): hover text, names, the sample
column offered to the widget, the fine-tuning note. Headless: no napari, no Qt."""

from __future__ import annotations

import numpy as np
import pandas as pd

from napari_stlnmf.layers import (
    DOMINANT_LAYER,
    FIT_ERROR_LAYER,
    RESULT_TAG,
    TOP_TYPES_COLUMN,
    fine_tuning_note,
    result_layers,
    sample_columns,
    top_types,
)


def _proportions(slide, seed=0):
    rng = np.random.default_rng(seed)
    values = rng.dirichlet(np.ones(10), size=slide.n_obs)
    values[values < 0.05] = 0.0
    values /= values.sum(1, keepdims=True)
    values[0] = np.nan  # a spot without an estimate
    types = [f"type{i}" for i in range(10)]
    return pd.DataFrame(values, index=slide.obs_names.astype(str), columns=types)


def test_top_types_lists_the_largest_three_with_values():
    prop = pd.DataFrame(
        [[0.10, 0.52, 0.0, 0.31, 0.07], [0.0, 0.0, 1.0, 0.0, 0.0], [np.nan] * 5],
        columns=["Oligo", "Astro", "Micro", "Neuron", "Endo"],
    )
    assert list(top_types(prop)) == [
        "Astro 0.52 · Neuron 0.31 · Oligo 0.10",
        "Micro 1.00",  # zeros are not listed
        "no estimate",
    ]


def test_hover_shows_top_types_first_even_with_many_types(demo):
    slide, _ = demo
    prop = _proportions(slide)
    layers = result_layers(prop, None, None, slide)
    for _, kwargs, _ in layers:
        features = kwargs["features"]
        # napari's status bar joins the features in column order: the top types come first
        assert features.columns[0] == TOP_TYPES_COLUMN
        row = prop.iloc[1]
        best = row.sort_values(ascending=False).index[:3]
        assert features[TOP_TYPES_COLUMN].iloc[1].split(" · ")[0].startswith(best[0])
        assert all(t in features[TOP_TYPES_COLUMN].iloc[1] for t in best if row[t] > 0)


def test_result_layers_are_named_by_slide_and_tagged_by_source(demo):
    slide, _ = demo
    prop = _proportions(slide)
    first = result_layers(prop, None, None, slide, source="a", slide_name="slide A")
    second = result_layers(prop, None, None, slide, source="b", slide_name="slide B")
    names_a = {kw["name"] for _, kw, _ in first}
    names_b = {kw["name"] for _, kw, _ in second}
    assert "slide A · type0" in names_a and "slide B · type0" in names_b
    assert f"slide A · {DOMINANT_LAYER}" in names_a and f"slide B · {FIT_ERROR_LAYER}" in names_b
    assert not names_a & names_b  # a second slide never gives "type0 [1]"
    assert {kw["metadata"][RESULT_TAG]["source"] for _, kw, _ in first} == {"a"}
    # without a slide name: the plain type names (as before)
    plain = {kw["name"] for _, kw, _ in result_layers(prop, None, None, slide)}
    assert "type0" in plain and DOMINANT_LAYER in plain


def test_sample_columns_offers_section_columns_matching_libraries_first(demo):
    slide, _ = demo
    adata = slide.copy()
    lib = next(iter(adata.uns["spatial"].values()))
    adata.uns["spatial"] = {"sec1": lib, "sec2": lib}
    half = np.arange(adata.n_obs) < adata.n_obs // 2
    adata.obs["batch"] = pd.Categorical(np.where(half, "x", "y"))
    adata.obs["section"] = pd.Categorical(np.where(half, "sec1", "sec2"))
    adata.obs["constant"] = pd.Categorical(["only"] * adata.n_obs)
    adata.obs["depth"] = np.arange(adata.n_obs, dtype=float)
    columns = sample_columns(adata)
    assert columns[0] == "section"
    assert "batch" in columns
    assert "constant" not in columns and "depth" not in columns


def test_fine_tuning_note_says_when_and_why_it_stopped_early():
    early = {"epochs": 24, "best_epoch": 9, "val_rmse_initial": 0.05, "val_rmse": 0.04}
    note = fine_tuning_note(early, 60)
    assert "stopped early" in note and "24 of 60" in note and "epoch 9" in note
    kept = fine_tuning_note({"epochs": 16, "best_epoch": 0}, 60)
    assert "shipped parameters were kept" in kept
    full = fine_tuning_note({"epochs": 60, "best_epoch": 58}, 60)
    assert "stopped" not in full and "60 epochs" in full
    assert fine_tuning_note(None, 60) == "" and fine_tuning_note({}, 60) == ""
