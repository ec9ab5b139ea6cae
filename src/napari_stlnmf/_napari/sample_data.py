"""napari sample data: the synthetic demo slide, and a real H&E image with synthetic
expression and cell types (the demo reference's brain types, not the imaged tissue's).

Each sample opens the tissue image and the spots; the spots layer remembers the bundled
demo reference so the widget can deconvolve right away.
"""

from __future__ import annotations

from ..layers import slide_layers


def make_demo_sample() -> list[tuple]:
    """Synthetic demo slide (H&E-like image, 8 cell types, known truth)."""
    from ..datasets import DEMO_CELL_TYPE_KEY, DEMO_REFERENCE, load_demo

    slide, _ = load_demo()
    return slide_layers(
        slide, name="demo (synthetic)", reference=DEMO_REFERENCE, cell_type_key=DEMO_CELL_TYPE_KEY
    )


def make_histology_sample() -> list[tuple]:
    """Real Visium H&E and spot layout (scanpy test data, BSD-3) with SYNTHETIC expression:
    the demo reference's cell types laid out along the image's regions, whatever the tissue."""
    from ..datasets import DEMO_CELL_TYPE_KEY, DEMO_REFERENCE
    from ..histology import make_histology_slide

    slide, _ = make_histology_slide(seed=0)
    return slide_layers(
        slide,
        name="H&E (synthetic)",  # short: result layers are "<slide> · <type>"
        reference=DEMO_REFERENCE,
        cell_type_key=DEMO_CELL_TYPE_KEY,
    )
