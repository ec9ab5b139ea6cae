"""How much acinar mRNA do the PDAC-A spots hold, read off acinar-specific genes alone?

The 30 genes of the signature's Acinar_cells profile that are >= 20x more specific to it than to
any other type (by share of each profile) carry most of the acinar profile and almost nothing of
the others; their share of a spot's counts divided by their share of the acinar profile is the
spot's acinar mRNA share if the genes are captured as in the signature's platform (inDrop). That
share is turned into a cell share with the signature's mRNA per cell (acinar against ~1,600 for
the rest). Run: ``python benchmarks/pdac_acinar_markers.py`` (seconds; docs/method.md, PDAC)."""

import sys

import pandas as pd

sys.path.insert(0, "benchmarks")
from real_tissue_diagnosis import load_set

d = load_set("pdac_a_card")
sig = d["reference"]
X = d["slide"]
reg = d["regions"]
cnt = pd.DataFrame(X.X.toarray(), index=X.obs_names, columns=X.var_names)
lib = cnt.sum(1)
top = sig["Acinar_cells"] / sig["Acinar_cells"].sum()
others = sig.drop(columns="Acinar_cells")
others = others / others.sum(0)
spec = top / (others.max(1) + 1e-12)
markers = [g for g in top[(spec > 20)].sort_values(ascending=False).index[:30] if g in cnt.columns]
share_prof = top[markers].sum()
print(
    "n markers",
    len(markers),
    f"share of acinar profile {share_prof:.3f}",
    f"max share in any other type {others.loc[markers].sum(0).max():.4f}",
)
content = sig.sum(0)
for r in ["Pancreatic", "Duct Epithelium", "Cancer", "Stroma"]:
    s = [x for x in reg.index[reg == r] if x in cnt.index]
    a = (cnt.loc[s, markers].sum(1) / lib[s] / share_prof).clip(0, 1)
    cell = (a / content["Acinar_cells"]) / ((a / content["Acinar_cells"]) + (1 - a) / 1600)
    print(
        f"{r}: implied acinar mRNA share median {a.median():.2f} q90 {a.quantile(0.9):.2f} "
        f"max {a.max():.2f}; cell share median {cell.median():.2f} "
        f"q90 {cell.quantile(0.9):.2f} max {cell.max():.2f}"
    )
