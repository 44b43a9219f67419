"""`show`'s pictures: each view is a PNG of the documented pixel size, drawn from arrays."""
import numpy as np
from PIL import Image

from m2skd.dataset_spec import load_spec
from m2skd.render import bev_figure, class_colours, figure_px, fusion_figure

SPEC = load_spec()


def test_class_colours_are_the_official_ones_in_rgb():
    colours = class_colours(SPEC)
    assert colours.shape == (20, 3)
    # car: raw 10, BGR [245, 150, 100] in semantic-kitti.yaml -> RGB (100, 150, 245)
    assert np.allclose(colours[1] * 255, [100, 150, 245])
    # person: raw 30, BGR [30, 30, 255] -> RGB (255, 30, 30)
    assert np.allclose(colours[6] * 255, [255, 30, 30])


def test_bev_and_fusion_pngs_have_the_expected_size(tmp_path):
    rng = np.random.default_rng(0)
    xyz = rng.uniform(-20, 20, (500, 3))
    gt = rng.integers(0, 20, 500)
    pred = np.where(rng.random(500) < 0.8, gt, 9)
    path = bev_figure(xyz, gt, {"a": pred, "b": gt}, class_colours(SPEC), SPEC.hard_mask, SPEC.class_names,
                      tmp_path / "bev.png", title="t")
    assert Image.open(path).size == figure_px(3) == (1440, 580)
    path = fusion_figure(xyz[:10], xyz[10:60], rng.integers(1, 5, 50), 4, tmp_path / "fusion.png", title="t")
    assert Image.open(path).size == figure_px(2, 2) == (960, 1060)
