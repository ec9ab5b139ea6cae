"""The dock's legend of the result layers (napari draws none): HTML for a Qt label."""

from __future__ import annotations

from ..layers import (
    DOMINANT_LAYER,
    FIT_ERROR_COLORMAP,
    FIT_ERROR_LAYER,
    PROPORTION_COLORMAP,
    dominant_colors,
)

__all__ = ["legend_html"]


def _ramp_html(colormap: str, low: str, high: str) -> str:
    import matplotlib
    from matplotlib.colors import to_hex

    cmap = matplotlib.colormaps[colormap]
    cells = "".join(
        f'<td bgcolor="{to_hex(cmap(i / 15))}" width="9">&nbsp;</td>' for i in range(16)
    )
    return (
        f'<table cellspacing="0" cellpadding="0"><tr><td>{low}&nbsp;</td>{cells}'
        f"<td>&nbsp;{high}</td></tr></table>"
    )


def legend_html(cell_types, fit_error_max: float | None = None) -> str:
    """The maps' colour scales (napari has no legend): proportions, dominant type, fit error."""
    colors = dominant_colors(cell_types)
    # swatches flow several to a line: a tall dock would stretch napari's window
    swatches = " &nbsp; ".join(
        f'<span style="color:{colors[t]}; font-size:14px">&#9632;</span>&nbsp;{t}'
        for t in cell_types
    )
    fit_scale = (
        _ramp_html(FIT_ERROR_COLORMAP, "0", f"{fit_error_max:.2g}")
        if fit_error_max is not None
        else ""
    )
    return (
        "<b>Cell-type maps</b> (share of cells per spot; 0 = transparent)<br>"
        f"{_ramp_html(PROPORTION_COLORMAP, '0', '1')}"
        f"<b>{DOMINANT_LAYER}</b><br>{swatches}<br>"
        f"<b>{FIT_ERROR_LAYER}</b>: relative residual per spot, high where the reference misses "
        f"a type (brightest: the top 1% of spots){fit_scale}"
    )
