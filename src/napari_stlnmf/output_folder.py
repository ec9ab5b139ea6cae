"""The CLI's output folder: checked before the computation (a file, under a file, not writable,
holding another run's results), results staged under temporary names and renamed into place
(an interrupted run leaves no half-written file), and only our own old results removed."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputFolderError

# written last, listing every file of the run: what a later --overwrite removes
MANIFEST = "stlnmf_run.json"
# what runs wrote before the manifest existed (and what a run writes), relative to the folder
RESULT_PATTERNS = (
    MANIFEST,
    "proportions.csv",
    "mrna_fractions.csv",
    "spot_qc.csv",
    "unexplained_regions.csv",
    "proportions_lower.csv",
    "proportions_upper.csv",
    "result.h5ad",
    "map_*.png",
    "maps_*/map_*.png",
    "truth_vs_estimate.png",
    "demo_scores.json",
)
_STAGING_PREFIX = ".stlnmf-partial-"


def previous_results(out: Path) -> list[Path]:
    """The files of earlier runs in ``out``: those its manifest lists, and the known names."""
    found: set[Path] = set()
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            listed = json.loads(manifest.read_text()).get("files", [])
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            listed = []
        found.update(out / name for name in listed if (out / name).is_file())
    for pattern in RESULT_PATTERNS:
        found.update(p for p in out.glob(pattern) if p.is_file())
    return sorted(found)


def check_output_folder(out: Path, *, overwrite: bool) -> list[Path]:
    """Fail before any computation if ``out`` cannot take the results; return the previous
    run's files (to remove once the new ones are in place, with ``overwrite``)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputFolderError(
            f"--out {str(out)!r} is a file, not a folder: give a folder for the results "
            "(it is created if missing)"
        )
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputFolderError(
            f"--out {str(out)!r} lies under {str(existing)!r}, which is a file: give a folder "
            "path whose parents are folders"
        )
    if not _can_write_in(existing):
        raise OutputFolderError(
            f"cannot write in {str(existing)!r} (permission denied): give an --out folder "
            "you can write to"
        )
    previous = previous_results(out) if out.is_dir() else []
    if previous and not overwrite:
        names = ", ".join(str(p.relative_to(out)) for p in previous[:5])
        more = ", ..." if len(previous) > 5 else ""
        raise OutputFolderError(
            f"--out {str(out)!r} already holds the results of another run ({names}{more}): "
            "give a new folder, or pass --overwrite to replace them (only those files are "
            "removed)"
        )
    return previous


def _can_write_in(folder: Path) -> bool:
    """Try it: permission bits say nothing for root, read-only mounts or ACLs."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


@contextmanager
def staged_results(out: Path, previous: list[Path] = ()) -> Iterator[tuple[Path, list[Path]]]:
    """A hidden staging folder inside ``out`` to write the results into; on success each file
    is renamed into place (an atomic replace on one file system), the manifest written and
    ``previous`` files the new run did not replace removed. On failure the staging folder is
    removed and ``out`` is left as it was. Yields ``(staging folder, final paths)``, the list
    filled in after the move."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=out))
    final: list[Path] = []
    try:
        yield staging, final
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        for path in files:
            target = out / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            final.append(target)
        names = [str(p.relative_to(out)) for p in final]
        manifest = staging / MANIFEST
        manifest.write_text(json.dumps({"files": names}, indent=1))
        os.replace(manifest, out / MANIFEST)
        for old in previous:
            if old not in final and old.name != MANIFEST and old.is_file():
                old.unlink()
                _remove_if_empty(old.parent, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_if_empty(folder: Path, out: Path) -> None:
    if folder != out and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
