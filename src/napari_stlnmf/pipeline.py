"""The steps of :func:`napari_stlnmf.deconvolve`, each a public function with typed inputs and
outputs, in the order the driver calls them:

settings -> :func:`load_slide` / :func:`load_reference` -> :func:`~.preprocess.prepare` ->
:func:`choose_gene_weighting` -> :func:`build_spot_graph` -> :func:`~.calibration.calibrate` ->
:func:`build_model` -> :func:`fine_tune` (optional) -> :func:`fit` -> :func:`finish`.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import io
from ._constants import MAX_CELLS_PER_TYPE, SPATIAL_KEY
from .calibration import (
    NOISE_SAMPLE_SPOTS,
    Calibration,
    FixedCalibration,
    estimate_noise,
    platform_effect_identifiable,
    quick_platform_effect,
    refinement_model,
    sample_rows,
)
from .checks import check_settings_values
from .diagnostics import check_gene_sets
from .errors import StlnmfError
from .graph import (
    SpatialGraph,
    build_graph,
    region_features,
    spot_image_features,
    spot_spacing,
)
from .model import (
    DEFAULTS,
    REFRESH_LAYERS,
    EntryNoise,
    UnrolledNMF,
    finalize_proportions,
    gram_bytes,
    pick_device,
)
from .preprocess import Prepared, Reference, build_reference, match_gene_identifiers, prepare
from .progress import Stage, check_stop, report
from .solvers import CLASSIC_MAX_ITER, ClassicSolver, FitInputs, Solver, UnrolledSolver
from .solvers import Fit as SolverFit
from .subtypes import Subtypes, choose_subtypes, merge_subtypes
from .train import TrainReport, calibrated_noise_ranges, make_training_slides, train_unrolled
from .uncertainty import DEFAULT_DRAWS, DEFAULT_LEVEL, check_uncertainty_options

__all__ = [
    "MAX_CELLS_PER_TYPE",
    "MAX_GRAM_BYTES",
    "DeconvolutionSettings",
    "FixedCalibration",
    "Fractions",
    "PreparedInputs",
    "SlideLibrary",
    "SpotGraph",
    "build_model",
    "build_spot_graph",
    "choose_gene_weighting",
    "default_gene_weighting",
    "default_params_path",
    "entry_noise_for",
    "fine_tune",
    "finish",
    "fit",
    "in_tissue",
    "load_reference",
    "load_slide",
    "make_solver",
    "platform_effect_wanted",
    "prepare_inputs",
    "select_subtypes",
    "shipped_refinement_model",
    "slide_features",
    "slide_libraries",
]

MAX_GRAM_BYTES = 4 * 2**30  # per-spot Gram matrices (float32, else compact bfloat16)


def default_params_path() -> Path:
    """Parameters shipped with the package (λ's and σ's learned on simulated slides)."""
    return Path(__file__).parent / "data" / "default_params.pt"


@dataclass(frozen=True)
class DeconvolutionSettings:
    """Every option of :func:`napari_stlnmf.deconvolve` (documented there), checked once.

    ``max_gram_bytes`` (memory allowed for per-spot Gram matrices),
    ``platform_refine_passes`` and ``cell_subtypes`` are advanced settings that
    :func:`deconvolve` does not take. ``cell_subtypes``: ``'auto'`` fits k-means sub-profiles of
    a single-cell reference's types when they predict the slide's held-out genes better
    (:func:`napari_stlnmf.subtypes.choose_subtypes`), ``True`` always, ``False`` never; the
    output always has the reference's types."""

    library_id: str | None = None
    library_key: str | None = None
    obs_prefix: str = "stlnmf_"
    method: str = "unrolled"
    train: bool = False
    params: str | Path | None = None
    n_layers: int | None = None
    tied: bool = False
    train_epochs: int = 60
    n_train_slides: int = 10
    use_image: bool = True
    region_key: str | None = None
    n_neighbors: int = 6
    n_markers: int = 100
    case_insensitive: bool = False
    gene_weighting: str | None = None
    fractions: str = "cell"
    min_proportion: float | str = "auto"
    save_params: str | Path | None = None
    seed: int = 0
    train_options: dict | None = None
    calibrate_noise: bool = True
    fit_platform_effect: bool = True
    device: str = "auto"
    max_gram_bytes: int = MAX_GRAM_BYTES
    platform_refine_passes: int = 3
    cell_subtypes: bool | str = "auto"
    reference_is_means: bool = False
    allow_non_integer_slide: bool = False
    max_cells_per_type: int | None = MAX_CELLS_PER_TYPE
    diagnose: bool = False
    marker_gene_sets: dict | None = None
    uncertainty: bool = False
    uncertainty_draws: int = DEFAULT_DRAWS
    uncertainty_level: float = DEFAULT_LEVEL

    def __post_init__(self):
        check_settings_values(self)  # types and ranges of the numbers, the device
        check_uncertainty_options(self.uncertainty, self.uncertainty_draws, self.uncertainty_level)
        object.__setattr__(self, "marker_gene_sets", check_gene_sets(self.marker_gene_sets))
        if self.method not in ("unrolled", "classic"):
            raise StlnmfError(f"method must be 'unrolled' or 'classic', not {self.method!r}")
        if self.fractions not in ("cell", "mrna"):
            raise StlnmfError(f"fractions must be 'cell' or 'mrna', not {self.fractions!r}")
        if self.cell_subtypes not in ("auto", True, False):
            raise StlnmfError(
                f"cell_subtypes must be 'auto', True or False, not {self.cell_subtypes!r}"
            )
        cap = self.max_cells_per_type
        if cap is not None and not (isinstance(cap, (int, np.integer)) and cap >= 1):
            raise StlnmfError(f"max_cells_per_type must be None or at least 1, not {cap!r}")
        if self.library_key is not None and self.library_id is not None:
            raise StlnmfError(
                "give library_key (one fit per library of a multi-sample slide) or library_id "
                "(the one library of uns['spatial'] to use), not both"
            )
        if self.library_key is not None and self.save_params is not None:
            raise StlnmfError(
                "save_params with library_key would save one model per library: "
                "fine-tune and save on one library at a time"
            )
        if self.gene_weighting == "nb" and self.method != "unrolled":
            raise StlnmfError("gene_weighting='nb' (per-entry weights) needs method='unrolled'")


def load_slide(slide, coords=None, bin_size: float | None = None):
    """The slide as an AnnData: a path is read with :func:`napari_stlnmf.io.read_slide`
    (``bin_size``: the Visium HD bins to read, µm), a SpatialData with
    :func:`napari_stlnmf.io.read_spatialdata`."""
    import anndata as ad

    if isinstance(slide, (str, Path)):
        options = {"coords": coords, "bin_size": bin_size}
        return io.read_slide(slide, **{k: v for k, v in options.items() if v is not None})
    if bin_size is not None:
        raise StlnmfError(
            "bin_size chooses the bins of a Visium HD folder read from disk; the slide is "
            "already an AnnData: read it with io.read_slide(path, bin_size=...) instead"
        )
    if isinstance(slide, ad.AnnData):
        return slide
    if io.spatialdata.is_spatialdata(slide):
        return io.read_spatialdata(slide)
    raise StlnmfError(
        "slide must be an AnnData, a SpatialData or a path (.h5ad, Space Ranger outs/ folder, "
        f"counts CSV, SpatialData .zarr), not {type(slide).__name__}"
    )


@dataclass(frozen=True)
class SlideLibrary:
    """The spots of one sample (library) of a slide, fitted on their own."""

    name: str | None  # the library's value in obs[library_key] (None: a single-sample slide)
    rows: np.ndarray  # bool per spot of the slide: fitted (in this library and in tissue)
    outside_tissue: np.ndarray  # bool per spot: in this library but obs['in_tissue'] == 0
    library_id: str | None  # its key in uns['spatial'] (images, scale factors), if any


def in_tissue(adata) -> np.ndarray:
    """Spots Space Ranger marks as under tissue (``obs['in_tissue'] != 0``); all without it."""
    if "in_tissue" not in adata.obs:
        return np.ones(adata.n_obs, dtype=bool)
    flag = pd.to_numeric(adata.obs["in_tissue"], errors="coerce").to_numpy()
    return ~(flag == 0)


def slide_libraries(adata, settings: DeconvolutionSettings) -> list[SlideLibrary]:
    """The slide's samples, each fitted alone (its own graph, image, platform effect and
    noise): one per value of ``obs[settings.library_key]``, or the whole slide. Spots with
    ``obs['in_tissue'] == 0`` are left out of every fit."""
    tissue = in_tissue(adata)
    if not tissue.any():
        raise StlnmfError(
            "every spot has obs['in_tissue'] == 0: there is no tissue to deconvolve "
            "(drop or fix the in_tissue column if it is wrong)"
        )
    key = settings.library_key
    if key is None:
        return [SlideLibrary(None, tissue, ~tissue, settings.library_id)]
    if key not in adata.obs:
        columns = [str(c) for c in adata.obs.columns]
        raise StlnmfError(
            f"library_key {key!r} is not a column of slide.obs (columns: {columns[:10]}); "
            "give the column that names each spot's sample"
        )
    labels = adata.obs[key]
    if labels.isna().any():
        raise StlnmfError(
            f"slide.obs[{key!r}] is missing for {int(labels.isna().sum())} spots: "
            "every spot needs its library"
        )
    labels = labels.astype(str).to_numpy()
    images = adata.uns.get("spatial", {}) if isinstance(adata.uns.get("spatial"), dict) else {}
    out = []
    for name in pd.unique(labels):
        member = labels == name
        if not (member & tissue).any():
            continue  # a library with no spot under tissue: its spots stay NaN
        library_id = name if name in images else None
        out.append(SlideLibrary(str(name), member & tissue, member & ~tissue, library_id))
    return out


def load_reference(
    reference,
    cell_type_key: str | None,
    *,
    is_means: bool = False,
    max_cells_per_type: int | None = None,
    seed: int = 0,
) -> Reference:
    """Per-type profiles (and single cells) from an AnnData, a signature table or a path.

    A single-cell reference keeps at most ``max_cells_per_type`` cells per type (seeded by
    ``seed``); an .h5ad path is read for those cells only. ``is_means``: its rows are mean
    expression, not raw counts (:func:`~.preprocess.build_reference`)."""
    import anndata as ad

    if isinstance(reference, Reference):
        return reference
    if isinstance(reference, (str, Path)):
        reference = io.read_reference(
            reference,
            cell_type_key=cell_type_key,
            max_cells_per_type=max_cells_per_type,
            seed=seed,
        )
    # a reference read for a sample of its cells records how many the file holds
    n_in_file = (
        reference.uns.get(io.reference.N_CELLS_IN_FILE)
        if isinstance(reference, ad.AnnData)
        else None
    )
    # the user's whole reference (unused categories are named here, build_reference drops
    # them); sparse values are scanned in place, not copied
    io.validate_reference(reference, cell_type_key=cell_type_key, is_means=is_means)
    built = build_reference(
        reference,
        cell_type_key=cell_type_key,
        is_means=is_means,
        max_cells_per_type=max_cells_per_type,
        seed=seed,
    )
    if n_in_file is not None:
        built.info["n_cells"] = int(n_in_file)
    return built


def select_subtypes(
    prepared: Prepared,
    reference: Reference,
    settings: DeconvolutionSettings,
    *,
    quick_platform: tuple[Prepared, np.ndarray] | None = None,
    device=None,
) -> Subtypes | None:
    """Sub-profiles of the reference's types to fit with (``settings.cell_subtypes``: 'auto'
    when the slide's held-out genes say so, True always), or None. With the platform effect on,
    the choice is made on profiles corrected by a quick estimate of it (no refinement;
    ``quick_platform``: :func:`~.calibration.quick_platform_effect` of ``prepared``, computed
    here when not given)."""
    if not settings.cell_subtypes or reference.cell_counts is None:
        return None
    kwargs = {"min_t": -np.inf, "max_ratio": np.inf} if settings.cell_subtypes is True else {}
    log_factor = None
    if platform_effect_wanted(prepared, settings):
        if quick_platform is None:
            quick_platform = quick_platform_effect(prepared, seed=int(settings.seed), device=device)
        log_factor = quick_platform[1]
    return choose_subtypes(
        prepared, reference, log_platform_factor=log_factor, seed=int(settings.seed), **kwargs
    )


def platform_effect_wanted(prepared: Prepared, settings: DeconvolutionSettings) -> bool:
    """The platform effect is fitted for the unrolled method when asked for and when the slide
    has enough genes per profile to tell it from composition
    (:func:`~.calibration.platform_effect_identifiable`)."""
    return (
        settings.method == "unrolled"
        and settings.fit_platform_effect
        and platform_effect_identifiable(len(prepared.genes), len(prepared.cell_types))
    )


@dataclass
class PreparedInputs:
    """What :func:`prepare_inputs` returns: the model's inputs, the reference they were made
    from (the split one when sub-profiles were chosen), the sub-profiles or None, and the
    platform effect's quick estimate on these inputs when the sub-profile test made one (for
    :func:`~.calibration.calibrate`, which starts from it)."""

    prepared: Prepared
    reference: Reference
    subtypes: Subtypes | None
    quick_platform: tuple[Prepared, np.ndarray] | None = None


def prepare_inputs(
    adata,
    reference: Reference,
    settings: DeconvolutionSettings,
    *,
    gene_weighting: str,
    counts: io.FoundCounts | None = None,
    device=None,
) -> PreparedInputs:
    """The model's inputs (:func:`~.preprocess.prepare`), on the reference's sub-profiles when
    :func:`select_subtypes` chose them (then the reference returned is the split one, and
    :func:`finish` sums the sub-types back into the types).

    ``counts``: the slide's raw counts (:func:`~.io.validate.validate_slide` returns them;
    found again if not given). Genes are paired by :func:`~.preprocess.match_gene_identifiers`;
    ``Prepared.info`` records the pairing and where both sides' counts came from."""
    if counts is None:
        counts = io.slide_counts(adata, allow_non_integer=settings.allow_non_integer_slide)
    options = {
        "n_markers": settings.n_markers,
        "case_insensitive": settings.case_insensitive,
        "gene_weighting": gene_weighting,
    }
    genes, matching = match_gene_identifiers(
        counts.var, reference, case_insensitive=settings.case_insensitive
    )
    sources = {
        "slide_counts_source": counts.source,
        "reference_counts_source": reference.info.get("counts_source"),
        "reference_cells": {k: v for k, v in reference.info.items() if k != "counts_source"},
        "gene_matching": matching,
    }
    prepared = prepare(counts.matrix, genes, reference, **options)
    prepared.info.update(sources)
    quick = None
    testing_subtypes = settings.cell_subtypes and reference.cell_counts is not None
    if testing_subtypes and platform_effect_wanted(prepared, settings):
        quick = quick_platform_effect(prepared, seed=int(settings.seed), device=device)
    subtypes = select_subtypes(prepared, reference, settings, quick_platform=quick, device=device)
    if subtypes is None:
        return PreparedInputs(prepared, reference, None, quick)
    split = subtypes.reference
    prepared = prepare(counts.matrix, genes, split, **options)
    prepared.info.update(sources)
    return PreparedInputs(prepared, split, subtypes)


def default_gene_weighting(method: str, params, train: bool) -> str:
    """The weighting a saved model was trained with; 'nb' when training; else the shipped
    defaults' weighting; 'sqrt' for the classic method."""
    if method != "unrolled":
        return "sqrt"
    if params is None and train:
        return "nb"
    path = params if params is not None else default_params_path()
    if Path(path).exists():
        return UnrolledNMF.saved_extra(path).get("gene_weighting", "sqrt")
    return "sqrt"


def choose_gene_weighting(
    requested: str,
    *,
    explicit: bool,
    train: bool,
    n_spots: int,
    n_types: int,
    max_gram_bytes: int = MAX_GRAM_BYTES,
) -> tuple[str, bool]:
    """The gene weighting to use (``requested``; asked for by the user if ``explicit``) and
    whether per-spot Gram matrices are stored compactly (bfloat16 upper triangles, a quarter
    of float32's memory) to fit ``max_gram_bytes``.

    Past the limit even compactly, an explicit 'nb' fails with the way out; the default falls
    back to one weight per gene with a warning (:func:`~.preprocess.prepare` scales genes the
    same way for all three until they are fitted)."""
    weighting, limit = requested, max_gram_bytes
    compact = gram_bytes(n_spots, n_types) > limit
    needed = gram_bytes(n_spots, n_types, compact=True)
    if weighting != "nb" or needed <= limit:
        return weighting, compact
    message = (
        f"per-entry weights need {needed / 2**30:.1f} GiB of per-spot Gram matrices (bfloat16 "
        f"upper triangles) for {n_spots:,} spots x {n_types} cell types "
        f"(limit {limit / 2**30:.0f} GiB)"
    )
    if explicit:
        raise StlnmfError(message + "; use gene_weighting='fitted' (or 'sqrt') or fewer cell types")
    fallback = "fitted" if train else "sqrt"
    warnings.warn(
        f"{message}: using one weight per gene ('{fallback}') instead", RuntimeWarning, stacklevel=3
    )
    return fallback, compact


def slide_features(adata, mask, *, library_id=None, use_image=True, region_key=None):
    """Per-spot features for the graph: region labels, else the image under each spot."""
    if region_key is not None:
        if region_key not in adata.obs:
            raise StlnmfError(f"region_key {region_key!r} is not a column of slide.obs")
        return region_features(adata.obs[region_key].astype(str).to_numpy()[mask]), "regions"
    if not use_image:
        return None, "none"
    found = io.get_image(adata, library_id=library_id)
    if found is None:
        return None, "none"
    io.check_image_covers_spots(adata, library_id=library_id)
    image, scalef, _ = found
    xy = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)[mask, :2] * scalef
    # Window radius in image pixels: half the stored spot diameter; without one (or under a
    # pixel) half the spot spacing of these spots, not io.spot_diameter's 0.55 estimate:
    # the shipped parameters were learned on features taken this way.
    diameter = io.spot_diameter(adata, library_id, estimate=False)
    radius = 0.5 * diameter * scalef if diameter else None
    if not radius or radius < 1:
        radius = max(0.5 * spot_spacing(xy), 1.0)
    return spot_image_features(image, xy, radius), "image"


def entry_noise_for(
    calibration: Calibration,
    gene_weighting: str,
    *,
    compact_gram: bool,
    device=None,
    gram_scales: tuple[float, ...] | None = None,
    scale_log: list | None = None,
) -> EntryNoise | None:
    """What per-entry weights need (``gene_weighting='nb'``): the spots' library sizes and the
    measured φ; None for per-gene weights. ``gram_scales``: the Gram matrices' scales fixed
    (:class:`FixedCalibration`); ``scale_log``: a list that collects the scales used."""
    if gene_weighting != "nb":
        return None
    library = torch.as_tensor(calibration.prepared.library_size, device=device)
    phi = calibration.noise.overdispersion
    return EntryNoise(
        library, phi, compact_gram=compact_gram, gram_scales=gram_scales, scale_log=scale_log
    )


@dataclass(frozen=True)
class SpotGraph:
    """The graph over the kept spots and what its feature edges were built from."""

    graph: SpatialGraph
    coords: np.ndarray  # (x, y) of the kept spots
    features: np.ndarray | None  # per-spot image/region features, if any
    feature_source: str  # "image", "regions" or "none"


def build_spot_graph(
    adata,
    prepared: Prepared,
    settings: DeconvolutionSettings,
    *,
    feature_scale: tuple[np.ndarray, np.ndarray] | None = None,
) -> SpotGraph:
    """k-nearest-neighbour graph of the kept spots, with image or region features
    (standardised by ``feature_scale`` when given, else by their own mean and sd)."""
    mask = prepared.spot_mask
    features, source = slide_features(
        adata,
        mask,
        library_id=settings.library_id,
        use_image=settings.use_image,
        region_key=settings.region_key,
    )
    xy = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)[mask, :2]
    bin_side = _square_bin_side(adata, settings.library_id)
    # Visium HD bins: a square lattice of known pitch, whose tied diagonals are all kept
    graph = build_graph(
        xy,
        n_neighbors=settings.n_neighbors,
        features=features,
        spacing=bin_side,
        keep_ties=bin_side is not None,
        feature_scale=feature_scale,
    )
    return SpotGraph(graph, xy, features, source)


def _square_bin_side(adata, library_id) -> float | None:
    """The side of Visium HD bins in pixels (:func:`~.io.square_bin_size`), None otherwise
    (round spots, cells, or several libraries and none chosen)."""
    try:
        return io.square_bin_size(adata, library_id)
    except StlnmfError:
        return None


def shipped_refinement_model(prepared: Prepared) -> UnrolledNMF | None:
    """The shipped parameters as the platform-effect refinement uses them (None if missing)."""
    return refinement_model(default_params_path(), prepared)


def build_model(
    prepared: Prepared, settings: DeconvolutionSettings, *, entry_weights: bool
) -> UnrolledNMF:
    """The unrolled network: ``settings.params``, else the shipped parameters, else defaults;
    with per-entry weights (``entry_weights``) or one weight per gene; on the chosen device."""
    m, p = prepared.B.shape
    param_file = settings.params if settings.params is not None else default_params_path()
    if Path(param_file).exists():
        model, _ = UnrolledNMF.load(param_file, genes=list(prepared.genes), n_types=p)
    elif settings.params is not None:
        raise StlnmfError(f"parameter file {settings.params} does not exist")
    else:
        model = UnrolledNMF(m, p, omega=DEFAULTS.omega_start)
    if settings.n_layers is not None and settings.n_layers != model.n_layers:
        model.n_layers = int(settings.n_layers)
        if not model.tied:
            raise StlnmfError("n_layers cannot be changed for an untied (per-layer) model")
    if not entry_weights:
        model.refresh_layers = None
    elif model.refresh_layers is None:
        model.refresh_layers = REFRESH_LAYERS
    if settings.train and not settings.tied and model.tied:  # one set of λ's per layer
        model.log_lambda = torch.nn.Parameter(model.log_lambda.detach().repeat(model.n_layers, 1))
        model.tied = False
    return model.to(pick_device(settings.device))


def _split_train_options(options: dict | None) -> tuple[dict, dict]:
    """Route ``train_options`` to make_training_slides / train_unrolled by parameter name."""
    sim_names = set(inspect.signature(make_training_slides).parameters)
    fit_names = set(inspect.signature(train_unrolled).parameters)
    sim_kw, fit_kw = {}, {}
    for k, v in (options or {}).items():
        if k in sim_names:
            sim_kw[k] = v
        elif k in fit_names:
            fit_kw[k] = v
        else:
            raise StlnmfError(f"unknown train option {k!r}")
    return sim_kw, fit_kw


def _release_freed_memory() -> None:
    """Hand memory freed by training back to the OS before the full-slide inference: glibc keeps
    training's many mid-sized tensors in its heap."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to do
        pass


def fine_tune(
    model: UnrolledNMF,
    prepared: Prepared,
    reference: Reference,
    calibration: Calibration,
    spots: SpotGraph,
    settings: DeconvolutionSettings,
    *,
    entry_noise: EntryNoise | None,
    progress=None,
    should_stop=None,
) -> TrainReport:
    """Train ``model`` in place on slides simulated on this slide's layout from ``reference``
    (genes rescaled by the measured platform effect), with noise around the measured levels."""
    device = pick_device(settings.device)
    n_train = settings.n_train_slides
    total = n_train + max(2, n_train // 4)
    report(progress, Stage.SIMULATING, 0, total)
    sim_kw, fit_kw = _split_train_options(settings.train_options)
    selected = reference.subset_genes(prepared.genes)
    if calibration.log_platform_factor is not None:
        selected = selected.scale_genes(np.exp(calibration.log_platform_factor))
    noise = None
    if settings.calibrate_noise:
        # per-entry weights measured the noise on the quick first fit; else a fit of the slide
        # with the model's parameters measures it
        noise = calibration.noise if entry_noise is not None else None
        noise = noise or _model_fit_noise(model, prepared, spots, settings)
        signature_only = selected.cell_counts is None
        for k, v in calibrated_noise_ranges(noise, signature_only=signature_only).items():
            sim_kw.setdefault(k, v)
    slides = make_training_slides(
        spots.coords,
        spots.graph,
        selected,
        n_slides=total,
        features=spots.features,
        library_sizes=prepared.library_size,
        seed=settings.seed,
        device=device,
        **sim_kw,
    )
    check_stop(should_stop)
    result = train_unrolled(
        model,
        prepared.B,
        prepared.gene_weights,
        prepared.mrna_content,
        slides[:n_train],
        slides[n_train:],
        epochs=settings.train_epochs,
        progress=progress,
        should_stop=should_stop,
        seed=settings.seed,
        overdispersion=0.0 if entry_noise is None else entry_noise.overdispersion,
        **fit_kw,
    )
    result.noise = noise
    _release_freed_memory()
    return result


def _model_fit_noise(model, prepared: Prepared, spots: SpotGraph, settings):
    """The slide's noise after a fit of the whole slide with the model's parameters, measured on
    a seeded sample of spots (the estimate densifies its rows: 10^6 bins would not fit)."""
    device = pick_device(settings.device)
    B = torch.as_tensor(prepared.B, device=device)
    scale = torch.as_tensor(prepared.gene_weights, device=device)
    V = model.infer(prepared.X, B, scale, spots.graph).cpu().numpy().astype(np.float64)
    V /= np.maximum(V.sum(1, keepdims=True), 1e-12)
    rows = sample_rows(prepared.X.shape[0], NOISE_SAMPLE_SPOTS, settings.seed)
    return estimate_noise(prepared.X[rows], prepared.library_size[rows], prepared.B, V[rows])


def make_solver(settings: DeconvolutionSettings, model: UnrolledNMF | None) -> Solver:
    """The unrolled ``model``'s inference, or (``model=None``) the classic update with fixed
    λ's iterated to convergence (at most ``settings.n_layers`` updates)."""
    if model is not None:
        return UnrolledSolver(model)
    return ClassicSolver(max_iter=settings.n_layers or CLASSIC_MAX_ITER)


def fit(
    prepared: Prepared,
    spots: SpotGraph,
    solver: Solver,
    *,
    entry_noise: EntryNoise | None = None,
    device=None,
    progress=None,
    should_stop=None,
) -> SolverFit:
    """Solve for the mRNA fractions of the selected genes (rows summing to one)."""
    B = torch.as_tensor(prepared.B, device=device)
    scale = torch.as_tensor(prepared.gene_weights, device=device)
    report(progress, Stage.DECONVOLVING, 0, solver.n_layers)

    def callback(i, n):
        report(progress, Stage.DECONVOLVING, i, n)
        check_stop(should_stop)

    inputs = FitInputs(prepared.X, B, scale, spots.graph, entry_noise)
    result = solver.run(inputs, callback=callback)
    with torch.no_grad():
        V = result.V / result.V.sum(1, keepdim=True).clamp_min(1e-12)
    return replace(result, V=V)


@dataclass(frozen=True)
class Fractions:
    """Per kept spot: cell and mRNA fractions (over the whole transcriptome) and fit error."""

    cell: np.ndarray
    mrna: np.ndarray
    fit_error: np.ndarray


def fit_error(X, gene_weights: torch.Tensor, V, BtX, BtB) -> np.ndarray:
    """Relative weighted residual ``||g⊙(x − B v)|| / ||g⊙x||`` per spot, without forming the
    dense residual matrix."""
    g2 = (gene_weights**2).cpu().numpy().astype(np.float64)
    xsq = np.asarray(X.multiply(X) @ g2).ravel()
    cross = (V * BtX).sum(1).cpu().numpy()
    quad = ((V @ BtB) * V).sum(1).cpu().numpy()
    res = np.maximum(xsq - 2 * cross + quad, 0.0)
    return np.sqrt(res / np.maximum(xsq, 1e-30))


def finish(
    result: SolverFit,
    prepared: Prepared,
    spots: SpotGraph,
    solver: Solver,
    *,
    min_proportion: float,
    subtypes: Subtypes | None = None,
) -> Fractions:
    """Cell fractions (mRNA shares divided by each type's mRNA per cell, then the model's
    learned smoothing head), mRNA fractions of the whole transcriptome, both with proportions
    below ``min_proportion`` zeroed; and the fit error. With ``subtypes`` the sub-types'
    fractions are summed into their types before the zeroing."""
    with torch.no_grad():
        V = result.V
        error = fit_error(prepared.X, result.gene_weights, V, result.BtX, result.BtB)
        mrna_selected = V.cpu().numpy().astype(np.float64)
    cells = solver.cell_fractions(mrna_selected, prepared.mrna_content, spots.graph)
    # transcripts of the whole transcriptome, not only the selected genes
    mrna = mrna_selected / prepared.gene_share[None, :]
    if subtypes is not None:
        n_types = len(subtypes.cell_types)
        cells = merge_subtypes(cells, subtypes.parent, n_types)
        mrna = merge_subtypes(mrna, subtypes.parent, n_types)
    return Fractions(
        cell=finalize_proportions(cells, min_proportion),
        mrna=finalize_proportions(mrna, min_proportion),
        fit_error=error,
    )
