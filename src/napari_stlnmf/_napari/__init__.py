"""Everything that imports napari or Qt: the dock widget, the reader, the writer and the sample
data. Each converts between napari layers and the compute core's arrays; the work is done by the
core (``napari_stlnmf.layers`` builds the layer data without Qt)."""
