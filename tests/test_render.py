"""`show`'s pictures, read back as pixels: each view has the documented size and shows what it
claims (classes in their official colours where their points are, wrong predictions marked,
fused points coloured by source scan beside the single scan in black), so a blank or wrong
picture fails."""
import matplotlib
import numpy as np
import pytest
from PIL import Image

from m2skd.dataset_spec import load_spec
from m2skd.render import bev_figure, class_colours, figure_px, fusion_figure

SPEC = load_spec()
CAR, PERSON = 1, 6  # car is drawn small, person (a hard class) large
# source scans t-1..t-4 as the fusion picture's legend shows them (viridis from dark to light),
# drawn at alpha 0.8 on white
SOURCE_RGB = [0.8 * np.array(matplotlib.colormaps["viridis"](s / 3 * 0.85 + 0.1)[:3]) * 255 + 0.2 * 255 for s in range(4)]


def test_class_colours_are_the_official_ones_in_rgb():
    colours = class_colours(SPEC)
    assert colours.shape == (20, 3)
    # car: raw 10, BGR [245, 150, 100] in semantic-kitti.yaml -> RGB (100, 150, 245)
    assert np.allclose(colours[1] * 255, [100, 150, 245])
    # person: raw 30, BGR [30, 30, 255] -> RGB (255, 30, 30)
    assert np.allclose(colours[6] * 255, [255, 30, 30])


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def kinds(img):
    """Masks of car-blue, person-red and near-black pixels (anti-aliased small points included)."""
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    return {"car": (b - r > 30) & (b > 150), "person": (r > 180) & (g < 120) & (b < 120), "dark": img.sum(-1) < 200}


def box(mask):
    ys, xs = np.nonzero(mask)
    return ys.min(), ys.max() + 1, xs.min(), xs.max() + 1


def bev_scene(tmp_path, colours=None):
    """Cars in the upper right, persons in the lower left; a right prediction and one that calls everything car."""
    rng = np.random.default_rng(0)
    xyz = np.r_[np.c_[rng.uniform(5, 15, (600, 2)), np.zeros(600)], np.c_[rng.uniform(-15, -5, (300, 2)), np.zeros(300)]]
    gt = np.r_[np.full(600, CAR), np.full(300, PERSON)]
    path = bev_figure(xyz, gt, {"right": gt, "wrong": np.full(900, CAR)}, class_colours(SPEC) if colours is None else colours,
                      SPEC.hard_mask, SPEC.class_names, tmp_path / "bev.png", title="t", extent=20)
    return pixels(path)


def check_bev(img):
    assert img.shape[1::-1] == figure_px(3) == (1440, 580)
    width = img.shape[1] // 3
    plot = img[: img.shape[0] - 100]  # above the legend footer
    panels = [kinds(plot[:, i * width:(i + 1) * width]) for i in range(3)]
    for i in (0, 1):  # ground truth and the right prediction: both classes, each where its points are
        car, person = panels[i]["car"], panels[i]["person"]
        assert car.sum() > 100 and person.sum() > 500, (i, car.sum(), person.sum())
        (cy, cx), (py, px) = np.argwhere(car).mean(0), np.argwhere(person).mean(0)
        assert cy < py - 100 and cx > px + 100, (i, (cy, cx), (py, px))  # car up and right of person
    y0, y1, x0, x1 = box(panels[1]["person"])
    assert panels[1]["dark"][y0:y1, x0:x1].sum() < 0.01 * panels[1]["person"].sum()  # nothing marked wrong
    shift = box(panels[1]["person"])[2] - box(panels[0]["person"])[2]  # same layout in every panel
    wrong = panels[2]
    assert wrong["person"].sum() == 0  # everything called car
    marks = wrong["dark"][y0:y1, max(0, x0 + shift - width):x1 + shift - width]
    assert marks.sum() > 0.5 * panels[1]["person"].sum(), marks.sum()  # the 300 persons marked wrong


def test_bev_shows_classes_where_they_are_and_marks_wrong_points(tmp_path):
    check_bev(bev_scene(tmp_path))


def test_bev_check_fails_on_a_blank_or_wrong_picture(tmp_path):
    img = bev_scene(tmp_path)
    with pytest.raises(AssertionError):
        check_bev(np.full_like(img, 255))
    swapped = class_colours(SPEC).copy()
    swapped[[CAR, PERSON]] = swapped[[PERSON, CAR]]
    with pytest.raises(AssertionError):
        check_bev(bev_scene(tmp_path, swapped))
    flipped = img.copy()
    flipped[:480] = flipped[:480][::-1]  # points in the wrong place
    with pytest.raises(AssertionError):
        check_bev(flipped)


def fusion_scene(tmp_path, fused_source=None):
    rng = np.random.default_rng(1)
    single = rng.normal(0, 0.3, (10, 3))
    fused = rng.normal(0, 0.3, (80, 3))
    source = rng.integers(1, 5, 80) if fused_source is None else fused_source
    return pixels(fusion_figure(single, fused, source, 4, tmp_path / "fusion.png", title="t"))


def check_fusion(img):
    assert img.shape[1::-1] == figure_px(2, 2) == (960, 1060)
    plot = img[60: img.shape[0] - 100]  # below the titles, above the legend
    colourful = (plot.max(-1) - plot.min(-1)) > 80  # the source colours (viridis); black and grey are not
    dark = plot.sum(-1) < 150
    half = img.shape[1] // 2
    for row in (slice(0, plot.shape[0] // 2), slice(plot.shape[0] // 2, None)):  # top and side views
        before, after = colourful[row, :half], colourful[row, half:]
        assert before.sum() == 0 and dark[row, :half].sum() > 50  # the single scan alone, in black
        assert after.sum() > 200, after.sum()  # with the fused points in their source colours
        for colour in SOURCE_RGB:  # each of the four source scans in its own colour
            assert (np.abs(plot[row, half:] - colour).sum(-1) < 60).sum() >= 3, colour


def test_fusion_shows_single_scan_then_fused_points_by_source(tmp_path):
    check_fusion(fusion_scene(tmp_path))


def test_fusion_check_fails_on_a_blank_or_wrong_picture(tmp_path):
    img = fusion_scene(tmp_path)
    with pytest.raises(AssertionError):
        check_fusion(np.full_like(img, 255))
    with pytest.raises(AssertionError):
        check_fusion(img[:, ::-1])  # fused panel first
    with pytest.raises(AssertionError):
        check_fusion(fusion_scene(tmp_path, np.zeros(80, dtype=int)))  # fused points drawn as if from scan t
    with pytest.raises(AssertionError):
        check_fusion(fusion_scene(tmp_path, np.ones(80, dtype=int)))  # every fused point from one scan
