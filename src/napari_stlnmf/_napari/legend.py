"""The dock's legend of the result layers (napari draws none): HTML for a Qt label."""

from __future__ import annotations

from ..layers import (
    DOMINANT_LAYER,
    FIT_ERROR_COLORMAP,
    FIT_ERROR_LAYER,
    MISFIT_LAYER,
    MISFIT_MAX,
    OPAQUE_FROM,
    PROPORTION_COLORMAP,
    dominant_colors,
    misfit_colormap,
    ramp_alpha,
)

__all__ = ["legend_html"]


def _ramp_html(colormap: str, low: str, high: str, *, fade: bool = False) -> str:
    """16 cells of ``colormap``; ``fade``: with the proportion maps' opacity ramp, shown over
    a light H&E-like pink (what the maps do over the tissue)."""
    import matplotlib
    import numpy as np
    from matplotlib.colors import to_hex

    cmap = matplotlib.colormaps[colormap]
    steps = np.arange(16) / 15
    colors = np.asarray([cmap(v)[:3] for v in steps])
    if fade:
        alpha = ramp_alpha(steps)[:, None]
        colors = alpha * colors + (1 - alpha) * np.array([0.93, 0.80, 0.88])
    cells = "".join(f'<td bgcolor="{to_hex(c)}" width="9">&nbsp;</td>' for c in colors)
    return (
        f'<table cellspacing="0" cellpadding="0"><tr><td>{low}&nbsp;</td>{cells}'
        f"<td>&nbsp;{high}</td></tr></table>"
    )


def _misfit_html() -> str:
    """The misfit layer's scale in words: clear, unusual, poorly explained, far off."""
    import numpy as np
    from matplotlib.colors import to_hex

    cmap = misfit_colormap()
    z = np.arange(13) / 12 * MISFIT_MAX
    rgba = np.stack(
        [np.interp(z / MISFIT_MAX, cmap["controls"], cmap["colors"][:, i]) for i in range(4)], 1
    )
    tissue = np.array([0.93, 0.80, 0.88])
    colors = rgba[:, 3:] * rgba[:, :3] + (1 - rgba[:, 3:]) * tissue
    cells = "".join(f'<td bgcolor="{to_hex(c)}" width="9">&nbsp;</td>' for c in colors)
    return (
        f"<b>{MISFIT_LAYER}</b>: how unusual each spot's residual is for this slide (z): "
        "clear = as the slide's best explained spots; yellow = unusual; orange from 3 = "
        f"<b>poorly explained</b> (flagged); dark red = far off (≥ {MISFIT_MAX:g})"
        f'<table cellspacing="0" cellpadding="0"><tr><td>0&nbsp;</td>{cells}'
        f"<td>&nbsp;{MISFIT_MAX:g}+</td></tr></table>"
    )


def legend_html(cell_types, fit_error_max: float | None = None, *, misfit: bool = False) -> str:
    """The maps' colour scales (napari has no legend): proportions, dominant type, fit error,
    and with ``misfit`` the reference misfit's scale in words."""
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
        "<b>Cell-type map</b> (share of cells per spot; pick the type above): transparent at "
        f"0, fading in to opaque at {OPAQUE_FROM:g}, so the tissue shows through low shares<br>"
        f"{_ramp_html(PROPORTION_COLORMAP, '0', '1', fade=True)}"
        f"<b>{DOMINANT_LAYER}</b><br>{swatches}<br>"
        f"<b>{FIT_ERROR_LAYER}</b>: relative residual per spot, high where the reference misses "
        f"a type (brightest: the top 1% of spots){fit_scale}" + (_misfit_html() if misfit else "")
    )
