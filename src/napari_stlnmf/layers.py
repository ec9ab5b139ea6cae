"""Public entry to napari layer-data tuples (pure: no Qt, no napari import).

``slide_layers(adata)`` gives the tissue image and the spots; ``result_layers_from_adata``
the per-type maps, dominant type and fit error of a deconvolved AnnData. Add them with
``getattr(viewer, f"add_{layer_type}")(data, **kwargs)``.
"""

from ._layers import result_layers, result_layers_from_adata, slide_layers

__all__ = ["result_layers", "result_layers_from_adata", "slide_layers"]
