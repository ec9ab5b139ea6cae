"""The slide formats :func:`~napari_stlnmf.io.read_slide` and the napari reader know.

A format is a cheap ``detect(path)`` (looks at names, folder listings or an HDF5 key; never
reads the data) and a ``read(path, **options)``. Adding a format means one module defining
a :class:`SlideFormat` and one :func:`register_slide_format` call; both ``read_slide`` and
the napari reader then use it. Importing this module imports neither anndata nor torch
(napari asks the reader about every file it opens), so readers import them inside ``read``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "SlideFormat",
    "find_slide_format",
    "register_slide_format",
    "slide_formats",
    "supported_slides",
    "unregister_slide_format",
]


def _always(path: Path) -> bool:
    return True


@dataclass(frozen=True)
class SlideFormat:
    """One way of storing a slide on disk.

    Attributes
    ----------
    name
        Short unique name, e.g. ``'spaceranger'``.
    detect
        ``detect(path) -> bool``: whether ``path`` is in this format. Must be cheap and
        must not raise for paths that are not (missing files included).
    read
        ``read(path, **options) -> AnnData``. ``options`` are every keyword of
        :func:`~napari_stlnmf.io.read_slide` (``coords``, ``image``, ``scalefactor``,
        ``spot_diameter``, ``library_id``, ``sep``, ``bin_size``); a reader uses those that
        apply.
    description
        What the format looks like, for error messages listing the supported inputs.
    has_positions
        ``has_positions(path) -> bool``: whether the file itself places the spots, so that
        it can be read without ``coords=``. The napari reader opens only such files.
        Cheap like ``detect``; default: always.
    options
        The keywords of ``read_slide`` besides ``library_id`` that this format honours;
        :func:`~napari_stlnmf.io.read_slide` refuses the others when they are given instead of
        letting the reader drop them. ``None`` (the default): every keyword.
    """

    name: str
    detect: Callable[[Path], bool]
    read: Callable[..., AnnData]
    description: str
    has_positions: Callable[[Path], bool] = _always
    options: frozenset[str] | None = None


_FORMATS: dict[str, SlideFormat] = {}


def register_slide_format(fmt: SlideFormat) -> None:
    """Add ``fmt`` (after the formats already known), or replace the format of that name."""
    if not isinstance(fmt, SlideFormat):
        raise TypeError(f"expected a SlideFormat, got {type(fmt).__name__}")
    _FORMATS[fmt.name] = fmt


def unregister_slide_format(name: str) -> SlideFormat | None:
    """Remove the format called ``name``; return it (None if it was not registered)."""
    return _FORMATS.pop(name, None)


def slide_formats() -> tuple[SlideFormat, ...]:
    """The registered formats, in the order they are tried."""
    return tuple(_FORMATS.values())


def find_slide_format(path: Any) -> SlideFormat | None:
    """The first registered format whose ``detect`` accepts ``path``, or None."""
    path = Path(path)
    return next((fmt for fmt in _FORMATS.values() if fmt.detect(path)), None)


def supported_slides() -> str:
    """The registered formats' descriptions as one sentence, for error messages."""
    descriptions = [fmt.description for fmt in _FORMATS.values()]
    if len(descriptions) < 2:
        return "".join(descriptions)
    return "; ".join(descriptions[:-1]) + "; or " + descriptions[-1]
