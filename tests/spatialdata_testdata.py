"""A SpatialData slide made from the bundled demo, as spatialdata-io lays out a Visium slide: an
H&E image (a two-level pyramid) whose pixels map to the 'global' frame by a scale and a
translation, circles with a radius in full-resolution pixels mapped by their own transformation,
and a table linked to them by region/instance keys whose rows are in another order than the
circles'. Also squares (polygons) and points over the same spots, for the other element kinds."""

from __future__ import annotations

import numpy as np
import pandas as pd

MICRONS_PER_FULLRES_PIXEL = 0.8
ORIGIN = (120.0, -40.0)  # where full-resolution pixel (0, 0) lies in 'global' (x, y)


def make_sdata(slide, *, seed: int = 0):
    """The store's SpatialData and the permutation taking the slide's spots to the table's rows."""
    import anndata as ad
    import spatialdata as sd
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Scale, Sequence, Translation

    library = slide.uns["spatial"]["demo"]
    hires = library["images"]["hires"]
    scalef = library["scalefactors"]["tissue_hires_scalef"]
    radius = library["scalefactors"]["spot_diameter_fullres"] / 2
    to_global = Translation(list(ORIGIN), axes=("x", "y"))
    # image pixel -> full-resolution pixel -> global; circles are in full-resolution pixels
    image_to_global = Sequence(
        [Scale([MICRONS_PER_FULLRES_PIXEL / scalef] * 2, axes=("x", "y")), to_global]
    )
    circles_to_global = Sequence(
        [Scale([MICRONS_PER_FULLRES_PIXEL] * 2, axes=("x", "y")), to_global]
    )
    image = Image2DModel.parse(
        np.moveaxis(hires, -1, 0),
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=[2],
        transformations={"global": image_to_global},
    )
    instance_ids = 1000 + np.arange(slide.n_obs)
    circles = ShapesModel.parse(
        np.asarray(slide.obsm["spatial"], dtype=np.float64),
        geometry=0,
        radius=np.full(slide.n_obs, radius),
        index=instance_ids,
        transformations={"global": circles_to_global},
    )
    order = np.random.default_rng(seed).permutation(slide.n_obs)  # table rows != circle order
    obs = pd.DataFrame(
        {
            "region": pd.Categorical(["spots"] * slide.n_obs),
            "spot_id": instance_ids[order],
            "barcode": slide.obs_names[order].to_numpy(),
        },
        index=[f"row{i}" for i in range(slide.n_obs)],
    )
    table = TableModel.parse(
        ad.AnnData(X=slide.X[order], obs=obs, var=slide.var.copy()),
        region="spots",
        region_key="region",
        instance_key="spot_id",
    )
    sdata = sd.SpatialData(
        images={"demo_hires_image": image}, shapes={"spots": circles}, tables={"table": table}
    )
    return sdata, order


def with_squares_and_points(sdata):
    """``sdata`` plus squares (polygons, one spot diameter wide) and points at the circles'
    centres, and a table 'multi' annotating all three elements (the circles' counts, repeated)."""
    import anndata as ad
    import geopandas as gpd
    import spatialdata as sd
    from shapely.geometry import box
    from spatialdata.models import PointsModel, ShapesModel, TableModel
    from spatialdata.transformations import get_transformation

    circles = sdata.shapes["spots"]
    transform = get_transformation(circles, "global")
    x, y, r = circles.geometry.x.to_numpy(), circles.geometry.y.to_numpy(), circles["radius"]
    squares = ShapesModel.parse(
        gpd.GeoDataFrame(
            geometry=[box(a - s, b - s, a + s, b + s) for a, b, s in zip(x, y, r)],
            index=circles.index,
        ),
        transformations={"global": transform},
    )
    points = PointsModel.parse(
        pd.DataFrame({"x": x, "y": y}, index=circles.index), transformations={"global": transform}
    )
    table = sdata.tables["table"]
    parts = []
    for region in ("spots", "squares", "spot_points"):
        part = table.copy()
        part.obs["region"] = region
        part.obs_names = [f"{region}-{i}" for i in part.obs_names]
        parts.append(part)
    multi = ad.concat(parts)
    multi.obs["region"] = pd.Categorical(multi.obs["region"])
    multi = TableModel.parse(
        multi,
        region=["spots", "squares", "spot_points"],
        region_key="region",
        instance_key="spot_id",
    )
    return sd.SpatialData(
        images=dict(sdata.images),
        shapes={"spots": circles, "squares": squares},
        points={"spot_points": points},
        tables={"multi": multi},
    )
