"""The stages of a run and the progress / cancellation callbacks, shared by the core, the CLI's
progress bars and the napari widget."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

__all__ = ["Cancelled", "ProgressCallback", "Stage", "check_stop", "report", "stage_label"]

ProgressCallback = Callable[[str, int, int], None]


class Stage(str, Enum):
    """One step of :func:`napari_stlnmf.deconvolve`, as passed to ``progress(stage, i, n)``.

    A ``str`` enum: callbacks written against the plain names (``stage == "training"``) work."""

    READING = "reading"
    PREPARING = "preparing"
    GRAPH = "graph"
    PLATFORM = "platform"
    SIMULATING = "simulating"
    TRAINING = "training"
    DECONVOLVING = "deconvolving"
    UNCERTAINTY = "uncertainty"
    DONE = "done"

    @property
    def label(self) -> str:
        """What a person is told the run is doing."""
        return _LABELS[self]

    def __str__(self) -> str:
        return self.value


_LABELS = {
    Stage.READING: "Reading slide and reference",
    Stage.PREPARING: "Selecting genes",
    Stage.GRAPH: "Building the spot graph",
    Stage.PLATFORM: "Measuring the platform effect and noise",
    Stage.SIMULATING: "Simulating training slides",
    Stage.TRAINING: "Training on simulated slides",
    Stage.DECONVOLVING: "Deconvolving",
    Stage.UNCERTAINTY: "Resampling counts for the uncertainty intervals",
    Stage.DONE: "Done",
}


def stage_label(stage: str) -> str:
    """The label of a stage given as a :class:`Stage` or its name (as Qt signals pass it)."""
    try:
        return Stage(stage).label
    except ValueError:  # a stage of somebody else's callback chain: show it as it is
        return str(stage)


class Cancelled(Exception):
    """Raised when ``should_stop()`` returned True."""


def report(progress: ProgressCallback | None, stage: Stage, i: int, n: int) -> None:
    if progress is not None:
        progress(stage, i, n)


def check_stop(should_stop: Callable[[], bool] | None, what: str = "deconvolution") -> None:
    if should_stop is not None and should_stop():
        raise Cancelled(f"{what} cancelled")
