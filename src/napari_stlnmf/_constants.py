"""Key names used in AnnData objects (kept in one place, as squidpy does), and defaults shared
with modules that must not import torch (the CLI)."""

SPATIAL_KEY = "spatial"  # obsm key of (x, y) spot centres in full-resolution pixels
PROPORTIONS_KEY = "stlnmf_proportions"  # obsm: cell fractions (spots x types DataFrame)
MRNA_FRACTIONS_KEY = "stlnmf_mrna_fractions"  # obsm: mRNA fractions (spots x types DataFrame)
LOWER_KEY = "stlnmf_lower"  # obsm: lower ends of the proportions' intervals (uncertainty=True)
UPPER_KEY = "stlnmf_upper"  # obsm: upper ends
FIT_ERROR_KEY = "stlnmf_fit_error"  # obs: per-spot relative reconstruction error
QC_KEY = "stlnmf_qc"  # obs: "ok" or why a spot got no estimate (e.g. "no counts")
UNS_KEY = "stlnmf"  # uns: parameters, genes used, version
# cells kept per type of a single-cell reference: type means are stable long before, and an
# atlas of 10^6 cells would otherwise be copied whole into float32 CSR
MAX_CELLS_PER_TYPE = 10_000
# uncertainty=True: resampled fits and the intervals' stated coverage
UNCERTAINTY_DRAWS = 30
UNCERTAINTY_LEVEL = 0.9

# deconvolve_tiled: tile side in spot spacings (~0.5 M bins, ~3.5 GB per task with the halo),
# halo in graph hops (docs/bench_tiled.md), seeded sample the calibration is measured on
TILE_SIZE = 700
TILE_HALO = 16
CALIBRATION_SPOTS = 200_000

# result.h5ad's compression: gzip level 1 writes a 4,992-spot x 18,000-gene slide in 1.06 s
# against level 4's (h5py's default) 1.69 s, for 29.6 MB instead of 29.2 (lzf: 0.54 s, 65 MB)
H5AD_COMPRESSION = {"compression": "gzip", "compression_opts": 1}
