"""The ``if __name__ == '__main__':`` check before :func:`~napari_stlnmf.deconvolve_many`
starts a LocalCluster (its 'spawn' workers re-run the caller's script)."""

from __future__ import annotations

import ast
import inspect
import sys
from pathlib import Path

from .errors import BatchError


def check_main_guard() -> None:
    """Refuse to start a LocalCluster from a line of the ``__main__`` script outside an
    ``if __name__ == '__main__':`` block: dask starts its workers with 'spawn', which re-runs
    the script in each of them, so each worker would start a batch of its own and the call
    would wait for ever."""
    import dask

    if dask.config.get("distributed.worker.multiprocessing-method", "spawn") == "fork":
        return  # forked workers do not re-run the script
    line, path = _unguarded_main_line()
    if line is not None:
        raise BatchError(
            f"deconvolve_many is called from line {line} of {path} outside an "
            "`if __name__ == '__main__':` block. Its worker processes start by re-running the "
            "script, so each would start a batch of its own and none would finish. Put the "
            "call (and what uses its result) under `if __name__ == '__main__':`"
        )


def _unguarded_main_line() -> tuple[int | None, str | None]:
    """The line of the ``__main__`` script whose statement led to this call, and the script,
    when that statement is not the body of an ``if __name__ == '__main__':``; else None (also
    in a notebook or an interactive session, which 'spawn' does not re-run)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None or not str(path).endswith(".py"):
        return None, None
    line, frame = None, inspect.currentframe()
    while frame is not None:
        if frame.f_globals is main.__dict__ and frame.f_code.co_name == "<module>":
            line = frame.f_lineno
        frame = frame.f_back
    if line is None:
        return None, None
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None, None  # the source is not at hand: nothing to go on
    for node in tree.body:
        if node.lineno <= line <= (node.end_lineno or node.lineno):
            guarded = (
                _is_main_guard(node) and node.body[0].lineno <= line <= node.body[-1].end_lineno
            )
            return (None, None) if guarded else (line, str(path))
    return None, None


def _is_main_guard(node) -> bool:
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
        return False
    test = node.test
    if len(test.ops) != 1 or not isinstance(test.ops[0], ast.Eq):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s.id for s in sides if isinstance(s, ast.Name)]
    values = [s.value for s in sides if isinstance(s, ast.Constant)]
    return names == ["__name__"] and values == ["__main__"]
