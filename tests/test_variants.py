"""Tests of cellbg.variants: properties, hand-computed tiling and pairing, fills, transforms."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from skimage.morphology import disk

import cellbg.variants as V
from cellbg._checks import CellbgError
from cellbg.variants import (
    ApplyVariant,
    ApplyVariantd,
    apply_variant,
    list_variants,
    pair_cells,
    parse_variant,
)

IMAGE_VARIANTS = [
    "original",
    "only_fg",
    "no_fg",
    "only_bg_b",
    "only_bg_t",
    "mixed_same",
    "mixed_rand",
    "mixed_next",
    "bg_color(0,0.5,1)",
    "bg_blur(1.5)",
    "bg_ring(2)",
    "mask_erode(1)+only_fg",
    "mask_dilate(2)+mixed_next",
]


def make_batch(n=12, c=3, h=16, w=20, seed=0):
    """Random crops with one elliptical cell each (varied sizes and places), boxes, labels."""
    rng = np.random.default_rng(seed)
    images = rng.random((n, c, h, w), dtype=np.float32)
    rr, cc = np.mgrid[:h, :w]
    cr = rng.integers(3, h - 3, n)[:, None, None]
    ccen = rng.integers(3, w - 3, n)[:, None, None]
    ar = rng.integers(2, 5, n)[:, None, None]
    ac = rng.integers(2, 6, n)[:, None, None]
    masks = ((rr - cr) / ar) ** 2 + ((cc - ccen) / ac) ** 2 <= 1
    rows, cols = masks.any(2), masks.any(1)
    bboxes = np.stack(
        [rows.argmax(1), cols.argmax(1), h - rows[:, ::-1].argmax(1), w - cols[:, ::-1].argmax(1)], 1
    ).astype(np.int64)
    labels = np.arange(n) % 3
    return images, masks, bboxes, labels


def box_of(bboxes, h, w):
    rr, cc = np.mgrid[:h, :w]
    r0, c0, r1, c1 = (bboxes[:, i, None, None] for i in range(4))
    return (rr >= r0) & (rr < r1) & (cc >= c0) & (cc < c1)


# --------------------------------------------------------------------------- parsing / registry
def test_list_variants_has_every_design_name():
    names = set(list_variants())
    for want in [
        "original",
        "only_fg",
        "no_fg",
        "only_bg_b",
        "only_bg_t",
        "mixed_same",
        "mixed_rand",
        "mixed_next",
        "bg_color",
        "bg_blur",
        "bg_ring",
        "mask_erode",
        "mask_dilate",
    ]:
        assert want in names


def test_parse_normalises_and_composes():
    v = parse_variant(" mask_erode(2) + mask_dilate( 1 ) +bg_ring(3)")
    assert v.spec == "mask_erode(2)+mask_dilate(1)+bg_ring(3)"
    assert v.name == "bg_ring" and v.args == (3.0,)
    assert v.perturbations == (("mask_erode", (2.0,)), ("mask_dilate", (1.0,)))
    assert parse_variant("bg_color(0, 0, 1)").args == (0.0, 0.0, 1.0)
    assert parse_variant("mixed_same").random and not parse_variant("only_fg").random


@pytest.mark.parametrize(
    "spec, match",
    [
        ("only_fgg", "did you mean 'only_fg'"),
        ("onyl_bg_t", "did you mean 'only_bg_t'"),
        ("bg_blur", r"takes \(sigma\)"),
        ("only_fg(2)", "takes no arguments"),
        ("bg_ring(-1)", "whole number >= 0"),
        ("mask_erode(1.5)+only_fg", "whole number"),
        ("bg_color(2,0,0)", r"in \[0, 1\]"),
        ("bg_blur(abc)", "not a number"),
        ("only_fg+mask_erode(1)", "only mask perturbations"),
        ("mask_erode(1)", "put a variant after it"),
        ("", "non-empty"),
    ],
)
def test_parse_errors_are_one_clear_line(spec, match):
    with pytest.raises(CellbgError, match=match) as info:
        parse_variant(spec)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- properties
@pytest.mark.parametrize("spec", IMAGE_VARIANTS)
@pytest.mark.parametrize(
    "kind, dtype", [("numpy", "float32"), ("numpy", "uint8"), ("torch", "float32"), ("torch", "float64")]
)
def test_type_dtype_shape_kept(spec, kind, dtype):
    x, m, b, y = make_batch(n=6)
    x = (x * 255).astype(np.uint8) if dtype == "uint8" else x.astype(dtype)
    if kind == "torch":
        x, m, b, y = map(torch.from_numpy, (x, m, b, y))
    r = apply_variant(spec, x, m, bboxes=b, labels=y, seed=3)
    assert type(r.images) is type(x) and r.images.dtype == x.dtype and tuple(r.images.shape) == tuple(x.shape)
    assert type(r.masks) is type(m) and tuple(r.masks.shape) == tuple(m.shape)
    assert r.partner.shape == (6,)


def test_numpy_and_torch_give_the_same_numbers():
    x, m, b, y = make_batch()
    for spec in IMAGE_VARIANTS + ["only_fg"]:
        a = apply_variant(spec, x, m, bboxes=b, labels=y, seed=1, fill="noise")
        t = apply_variant(
            spec,
            *map(torch.from_numpy, (x, m)),
            bboxes=torch.from_numpy(b),
            labels=torch.from_numpy(y),
            seed=1,
            fill="noise",
        )
        np.testing.assert_array_equal(a.images, t.images.numpy(), err_msg=spec)
        np.testing.assert_array_equal(a.partner, t.partner)


@pytest.mark.parametrize("fill", ["black", "0.2,0.4,0.6", "noise"])
def test_numpy_and_torch_agree_on_integers_strides_and_boxes_without_margin(fill):
    # uint8 images (rounded fills), non-contiguous views, 0/1 integer masks and some boxes that
    # cover the whole crop (no margin: the fill) or nothing; numpy and torch work natively
    # and must give the same numbers, equal to those of contiguous copies.
    x, m, b, y = make_batch(n=9, seed=7)
    x = (x * 255).astype(np.uint8)
    b[0] = [0, 0, 16, 20]
    b[1] = [4, 4, 4, 9]
    x_view = np.ascontiguousarray(x.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)  # W-major strides
    m_int = m.astype(np.int16)
    assert not x_view.flags.c_contiguous
    for spec in IMAGE_VARIANTS:
        a = apply_variant(spec, x_view, m_int, bboxes=b, labels=y, fill=fill, seed=4)
        c = apply_variant(spec, x, m, bboxes=b, labels=y, fill=fill, seed=4)
        t = apply_variant(
            spec,
            torch.from_numpy(x_view),
            torch.from_numpy(m_int),
            bboxes=torch.from_numpy(b),
            labels=y,
            fill=fill,
            seed=4,
        )
        np.testing.assert_array_equal(a.images, c.images, err_msg=spec)
        np.testing.assert_array_equal(a.images, t.images.numpy(), err_msg=spec)
        np.testing.assert_array_equal(a.masks, t.masks.numpy(), err_msg=spec)
        assert a.images.dtype == np.uint8 and t.images.dtype == torch.uint8


def test_mixed_background_of_a_partner_without_margin_is_the_fill():
    # Cell 1's box is its whole crop: as a partner it lends the fill as background.
    x = np.stack([np.full((1, 4, 4), 0.3), np.full((1, 4, 4), 0.8)]).astype(np.float32)
    m = np.zeros((2, 4, 4), bool)
    m[0, 1, 1] = m[1, 2, 2] = True
    b = np.array([[1, 1, 2, 2], [0, 0, 4, 4]])
    for kind in (np.asarray, torch.from_numpy):
        r = apply_variant("mixed_next", kind(x), kind(m), bboxes=kind(b), labels=np.array([0, 1]), fill="0.5")
        out = np.asarray(r.images)
        assert r.partner.tolist() == [1, 0]
        want0 = np.full((4, 4), 0.5, np.float32)
        want0[1, 1] = 0.3
        np.testing.assert_array_equal(out[0, 0], want0)
        want1 = np.full((4, 4), 0.3, np.float32)  # partner 0's only_bg_t: its box tiled from 0.3
        want1[2, 2] = 0.8
        np.testing.assert_array_equal(out[1, 0], want1)


def test_ring_and_perturbations_on_tensors_match_numpy():
    _, m, _, _ = make_batch(n=10, h=15, w=17, seed=4)
    tm = torch.from_numpy(m)
    for width in (0, 1, 3, 40):
        ring = V.ring_mask(tm, width)
        assert isinstance(ring, torch.Tensor) and ring.dtype == torch.bool
        np.testing.assert_array_equal(ring.numpy(), V.ring_mask(m, width))
        np.testing.assert_array_equal(V.mask_erode(tm, width).numpy(), V.mask_erode(m, width))
    np.testing.assert_array_equal(V.ring_mask(m, 40), np.broadcast_to(m.any((1, 2))[:, None, None], m.shape))


@pytest.mark.parametrize(
    "spec",
    [
        "only_fg",
        "mixed_same",
        "mixed_rand",
        "mixed_next",
        "bg_color(1,0,0)",
        "bg_blur(2)",
        "bg_ring(1)",
        "bg_ring(3)",
        "mask_erode(1)+mixed_rand",
    ],
)
@pytest.mark.parametrize("fill", ["black", "mean", "noise", "0.2,0.4,0.6"])
def test_foreground_pixels_identical(spec, fill):
    x, m, b, y = make_batch()
    r = apply_variant(spec, x, m, bboxes=b, labels=y, fill=fill, seed=2)
    fg = np.broadcast_to(r.masks[:, None], x.shape)
    assert r.masks.any()
    np.testing.assert_array_equal(r.images[fg], x[fg])
    if spec not in ("bg_blur(2)",):  # background is changed somewhere
        assert not np.array_equal(r.images[~fg], x[~fg])


@pytest.mark.parametrize("fill", ["black", "mean", "noise"])
def test_no_fg_keeps_background_and_replaces_cell(fill):
    x, m, b, y = make_batch()
    r = apply_variant("no_fg", x, m, bboxes=b, fill=fill)
    bg = np.broadcast_to(~m[:, None], x.shape)
    np.testing.assert_array_equal(r.images[bg], x[bg])
    assert not np.array_equal(r.images[~bg], x[~bg])


def test_black_fill_is_image_times_mask():
    x, m, _, _ = make_batch()
    np.testing.assert_array_equal(V.only_fg(x, m), x * m[:, None])
    np.testing.assert_array_equal(V.no_fg(x, m), x * (1 - m[:, None]))


def test_bg_ring_zero_is_only_fg_and_wide_ring_is_original():
    x, m, b, y = make_batch()
    np.testing.assert_array_equal(V.bg_ring(x, m, 0), V.only_fg(x, m))
    np.testing.assert_array_equal(V.bg_ring(x, m, 0, fill="mean"), V.only_fg(x, m, fill="mean"))
    np.testing.assert_array_equal(V.bg_ring(x, m, x.shape[2] + x.shape[3]), x)


def test_bg_ring_grows_monotonically():
    x, m, _, _ = make_batch()
    kept = [int((V.bg_ring(np.ones_like(x), m, k) > 0).sum()) for k in range(6)]
    assert all(a < b for a, b in zip(kept, kept[1:], strict=False))


@pytest.mark.parametrize("width", [0, 1, 2, 3, 5, 9])
def test_ring_is_exact_euclidean(width):
    _, m, _, _ = make_batch(n=10, h=15, w=17, seed=4)
    want = np.stack([ndi.distance_transform_edt(~mi) <= width for mi in m])
    np.testing.assert_array_equal(V.ring_mask(m, width), want)


def test_only_bg_t_changes_only_box_pixels():
    x, m, b, y = make_batch()
    out = V.only_bg_t(x, b)
    box = np.broadcast_to(box_of(b, *x.shape[2:])[:, None], x.shape)
    np.testing.assert_array_equal(out[~box], x[~box])
    assert not np.array_equal(out[box], x[box])


def test_only_bg_b_sets_box_to_zero():
    x, m, b, _ = make_batch()
    out = V.only_bg_b(x, b)
    box = np.broadcast_to(box_of(b, *x.shape[2:])[:, None], x.shape)
    assert (out[box] == 0).all()
    np.testing.assert_array_equal(out[~box], x[~box])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_mask_perturbations_match_skimage_disk_and_are_monotone(k):
    _, m, _, _ = make_batch(seed=5)
    dil, ero = V.mask_dilate(m, k), V.mask_erode(m, k)
    np.testing.assert_array_equal(dil, np.stack([ndi.binary_dilation(mi, structure=disk(k)) for mi in m]))
    np.testing.assert_array_equal(
        ero, np.stack([ndi.binary_erosion(mi, structure=disk(k), border_value=1) for mi in m])
    )
    areas = [V.mask_erode(m, k + 1).sum(), ero.sum(), m.sum(), dil.sum(), V.mask_dilate(m, k + 1).sum()]
    assert all(a < b for a, b in zip(areas, areas[1:], strict=False))
    assert (ero <= m).all() and (m <= dil).all()


def test_perturbed_mask_is_returned_and_used():
    x, m, b, _ = make_batch()
    r = apply_variant("mask_dilate(2)+only_fg", x, m, bboxes=b)
    np.testing.assert_array_equal(r.masks, V.mask_dilate(m, 2))
    np.testing.assert_array_equal(r.images, x * r.masks[:, None])
    assert r.spec == "mask_dilate(2)+only_fg"


def test_perturbed_mask_box_is_recomputed_for_only_bg_b():
    x = np.ones((1, 1, 9, 9), np.float32)
    m = np.zeros((1, 9, 9), bool)
    m[0, 4, 4] = True
    r = apply_variant("mask_dilate(2)+only_bg_b", x, m, bboxes=np.array([[4, 4, 5, 5]]))
    assert (r.images[0, 0] == 0).sum() == 25  # the 5x5 box of the dilated mask


# --------------------------------------------------------------------------- only_bg_t, hand-computed
def row_image(values):
    return np.asarray(values, np.float32)[None, None]


def test_tiling_left_strip_columns_from_origin():
    # 2x6 image, box covers columns 2..5 on both rows: left margin 2 (area 2*2=4) beats the
    # top/bottom margins (0). Box pixel at column x takes strip column x mod 2.
    x = row_image([[0, 1, 2, 3, 4, 5], [10, 11, 12, 13, 14, 15]])
    out = V.only_bg_t(x, [[0, 2, 2, 6]])[0, 0]
    np.testing.assert_array_equal(out, [[0, 1, 0, 1, 0, 1], [10, 11, 10, 11, 10, 11]])


def test_tiling_right_strip_uses_x_mod_width_not_box_offset():
    # 1x7, box columns 0..3, right margin 3 (cols 4,5,6). Column x takes strip column
    # x mod 3: x=0 -> col 4, x=1 -> col 5, x=2 -> col 6, x=3 -> col 4.
    x = row_image([[0, 1, 2, 3, 40, 50, 60]])
    out = V.only_bg_t(x, [[0, 0, 1, 4]])[0, 0]
    np.testing.assert_array_equal(out, [[40, 50, 60, 40, 40, 50, 60]])


def test_tiling_vertical_strips_top_and_bottom():
    # 5x2 image (column vector pairs); box rows 1..4 -> top margin 1, bottom 1 (tie -> top).
    x = np.arange(10, dtype=np.float32).reshape(1, 1, 5, 2)
    out = V.only_bg_t(x, [[1, 0, 4, 2]])[0, 0]
    np.testing.assert_array_equal(out, [[0, 1], [0, 1], [0, 1], [0, 1], [8, 9]])
    # box rows 0..2 -> bottom margin 3 (rows 2,3,4); row y takes strip row y mod 3.
    out = V.only_bg_t(x, [[0, 0, 2, 2]])[0, 0]
    np.testing.assert_array_equal(out, [[4, 5], [6, 7], [4, 5], [6, 7], [8, 9]])


def test_tiling_orientation_by_area_not_margin():
    # 2x8 image, box (0,2)-(1,8): left margin 2 -> area 2*H = 4; bottom margin 1 -> area 1*W = 8.
    # The bottom strip (row 1) wins although the column margin is wider.
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 2, 8)
    out = V.only_bg_t(x, [[0, 2, 1, 8]])[0, 0]
    np.testing.assert_array_equal(out[0], [0, 1, 10, 11, 12, 13, 14, 15])
    np.testing.assert_array_equal(out[1], x[0, 0, 1])


def test_tiling_ties_take_left_right_strip_then_the_origin_side():
    # 4x4 image, box (1,1)-(3,3): every margin is 1 -> areas tie (1*4 = 1*4): the full-height
    # left strip (column 0) is used; left/right tie -> left.
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    out = V.only_bg_t(x, [[1, 1, 3, 3]])[0, 0]
    np.testing.assert_array_equal(out, [[0, 1, 2, 3], [4, 4, 4, 7], [8, 8, 8, 11], [12, 13, 14, 15]])


def test_tiling_without_margin_falls_back_to_fill():
    x = np.full((2, 2, 3, 3), 0.7, np.float32)
    full = np.array([[0, 0, 3, 3], [0, 0, 3, 3]])
    np.testing.assert_array_equal(V.only_bg_t(x, full), np.zeros_like(x))
    np.testing.assert_allclose(
        V.only_bg_t(x, full, fill="0.1,0.9"), np.broadcast_to(np.array([0.1, 0.9], np.float32)[:, None, None], x.shape)
    )


def test_empty_box_changes_nothing():
    x, _, _, _ = make_batch(n=2)
    np.testing.assert_array_equal(V.only_bg_t(x, [[3, 3, 3, 3], [0, 5, 16, 5]]), x)


# --------------------------------------------------------------------------- pairing
def test_pairing_hand_computed_next_and_same():
    labels = np.array([0, 0, 1, 1, 2])
    for seed in range(5):
        nxt = pair_cells(labels, "next", seed=seed)
        assert list(labels[nxt]) == [1, 1, 2, 2, 0]
        same = pair_cells(labels, "same", seed=seed)
        assert list(same) == [1, 0, 3, 2, 4]  # the only cell of class 2 pairs with itself


def test_pairing_next_skips_classes_absent_from_the_batch():
    labels = np.array([0, 0, 3, 3])
    assert list(labels[pair_cells(labels, "next", seed=0, num_classes=5)]) == [3, 3, 0, 0]
    # class 4 absent: (3 + 1) mod 5 = 4 -> next present class after it, cyclically, is 0
    assert list(labels[pair_cells(labels, "next", seed=0, num_classes=4)]) == [3, 3, 0, 0]


def test_pairing_is_seeded_and_never_self_in_a_shared_class():
    labels = np.repeat(np.arange(4), 25)
    for rule in ["same", "rand", "next"]:
        a, b, c = (pair_cells(labels, rule, seed=s) for s in (7, 7, 8))
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)
        assert (a != np.arange(100)).all()
    same = pair_cells(labels, "same", seed=0)
    assert (labels[same] == labels).all()
    rand = pair_cells(labels, "rand", seed=0)
    assert len(np.unique(labels[rand])) == 4 and (labels[rand] != labels).any()


def test_pairing_draws_uniformly_within_the_class():
    labels = np.zeros(4, np.int64)
    counts = np.zeros((4, 4))
    for s in range(400):
        p = pair_cells(labels, "same", seed=s)
        counts[np.arange(4), p] += 1
    assert (np.diag(counts) == 0).all()
    off = counts[~np.eye(4, dtype=bool)]
    assert off.min() > 100 and off.max() < 170  # each of 3 partners about 133 times


@pytest.mark.parametrize("spec", ["mixed_same", "mixed_rand", "mixed_next"])
def test_mixed_is_cell_on_partner_only_bg_t(spec):
    x, m, b, y = make_batch(n=15)
    r = apply_variant(spec, x, m, bboxes=b, labels=y, seed=11)
    p = r.partner
    expected = np.where(m[:, None], x, V.only_bg_t(x, b)[p])
    np.testing.assert_array_equal(r.images, expected)
    r2 = apply_variant(spec, x, m, bboxes=b, labels=y, seed=11)
    np.testing.assert_array_equal(r2.partner, p)
    assert not np.array_equal(apply_variant(spec, x, m, bboxes=b, labels=y, seed=12).partner, p)


def test_non_mixed_partner_is_minus_one():
    x, m, b, y = make_batch()
    assert (apply_variant("only_bg_t", x, m, bboxes=b, labels=y).partner == -1).all()


# --------------------------------------------------------------------------- fills and blur
def test_fill_modes():
    x, m, b, _ = make_batch()
    mean = x.mean(axis=(0, 2, 3))
    out = V.only_fg(x, m, fill="mean")
    bg = ~m
    np.testing.assert_allclose(
        out.transpose(1, 0, 2, 3)[:, bg], np.broadcast_to(mean[:, None], (3, bg.sum())), rtol=1e-6
    )
    out = V.only_fg(x, m, fill=[0.1, 0.2, 0.3])
    np.testing.assert_allclose(
        out[0, :, ~m[0]].T if False else out[:, :, 0, 0][~m[:, 0, 0]],
        np.tile([0.1, 0.2, 0.3], ((~m[:, 0, 0]).sum(), 1)),
        rtol=1e-6,
    )
    np.testing.assert_array_equal(V.only_fg(x, m, fill=0.5)[np.broadcast_to(~m[:, None], x.shape)], 0.5)
    with pytest.raises(CellbgError, match="1 or 3 values"):
        V.only_fg(x, m, fill=[0.1, 0.2])
    with pytest.raises(CellbgError, match="'black', 'mean', 'noise'"):
        V.only_fg(x, m, fill="blakc")


def test_noise_fill_matches_background_statistics_and_is_seeded():
    rng = np.random.default_rng(0)
    n, h, w = 4, 64, 64
    x = np.clip(rng.normal([0.3, 0.6], [0.05, 0.1], (n, h, w, 2)), 0, 1).astype(np.float32).transpose(0, 3, 1, 2)
    m = np.zeros((n, h, w), bool)
    m[:, 20:40, 20:40] = True
    x[:, :, 20:40, 20:40] = 1.0  # the cell is bright; it must not leak into the statistics
    a = V.only_fg(x, m, fill="noise", seed=1)
    bgpix = a.transpose(1, 0, 2, 3)[:, ~m]
    np.testing.assert_allclose(bgpix.mean(1), [0.3, 0.6], atol=0.01)
    np.testing.assert_allclose(bgpix.std(1), [0.05, 0.1], rtol=0.1)
    assert not np.array_equal(bgpix, x.transpose(1, 0, 2, 3)[:, ~m])
    np.testing.assert_array_equal(a, V.only_fg(x, m, fill="noise", seed=1))
    assert not np.array_equal(a, V.only_fg(x, m, fill="noise", seed=2))


@pytest.mark.parametrize("sigma", [0.7, 2.0, 5.0])
def test_bg_blur_is_a_gaussian_of_the_background(sigma):
    x, m, _, _ = make_batch(n=4, seed=6)
    out = V.bg_blur(x.astype(np.float64), m, sigma)
    want = ndi.gaussian_filter(x.astype(np.float64), (0, 0, sigma, sigma), mode="nearest", truncate=4.0)
    want = np.where(m[:, None], x, want)
    np.testing.assert_allclose(out, want, atol=1e-10)
    np.testing.assert_array_equal(V.bg_blur(x, m, 0), x)


def test_bg_color_grey_and_rgb():
    x, m, _, _ = make_batch(c=1)
    out = V.bg_color(x, m, 0.25)
    assert (out[:, 0][~m] == 0.25).all()
    with pytest.raises(CellbgError, match="1 or 1 values"):
        apply_variant("bg_color(0,0,1)", x, m)


# --------------------------------------------------------------------------- input checks
def test_bad_inputs_raise_one_line_naming_the_argument():
    x, m, b, y = make_batch(n=4)
    cases = [
        (lambda: apply_variant("only_fg", x[0], m), "images must be 4-D"),
        (lambda: apply_variant("only_fg", x, m[:2]), "masks must have shape"),
        (lambda: apply_variant("only_fg", x, m.astype(float)), "masks must be bool"),
        (lambda: apply_variant("only_bg_b", x, m, bboxes=b[:, :3]), "bboxes must have shape"),
        (lambda: apply_variant("only_bg_b", x, m, bboxes=b + 100), r"bboxes\[0\]"),
        (lambda: apply_variant("only_bg_b", x, m, bboxes=b.astype(float)), "must be integers"),
        (lambda: apply_variant("mixed_same", x, m, bboxes=b), "needs labels"),
        (lambda: apply_variant("mixed_same", x, m, bboxes=b, labels=y[:2]), "labels must be 4"),
        (lambda: apply_variant("mixed_next", x, m, bboxes=b, labels=y, num_classes=2), "num_classes=2"),
    ]
    for call, match in cases:
        with pytest.raises(CellbgError, match=match) as info:
            call()
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("fill", ["black", "mean", "noise"])
def test_empty_batch_gives_empty_output(fill):
    x, m = np.zeros((0, 3, 8, 8), np.float32), np.zeros((0, 8, 8), bool)
    b, y = np.zeros((0, 4), np.int64), np.zeros(0, np.int64)
    for spec in IMAGE_VARIANTS:
        r = apply_variant(spec, x, m, bboxes=b, labels=y, fill=fill)
        assert r.images.shape == x.shape and r.images.dtype == x.dtype and r.partner.shape == (0,)


def test_bboxes_default_to_the_mask_boxes():
    x, m, b, _ = make_batch()
    np.testing.assert_array_equal(apply_variant("only_bg_t", x, m).images, V.only_bg_t(x, b))


def test_input_arrays_are_not_modified():
    x, m, b, y = make_batch()
    x0 = x.copy()
    tx = torch.from_numpy(x.copy())
    for spec in IMAGE_VARIANTS:
        apply_variant(spec, x, m, bboxes=b, labels=y)
        apply_variant(spec, tx, torch.from_numpy(m), bboxes=b, labels=y)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(tx.numpy(), x0)


# --------------------------------------------------------------------------- MONAI-style transforms
def test_array_transform_rebuilds_from_its_seed():
    x, m, b, y = make_batch(n=15)
    t = ApplyVariant("mixed_rand").set_random_state(42)
    got = t(x, m, b, y)
    seed = np.random.RandomState(42).randint(0, 2**31 - 1)
    want = apply_variant("mixed_rand", x, m, bboxes=b, labels=y, seed=seed)
    np.testing.assert_array_equal(got.images, want.images)
    np.testing.assert_array_equal(got.partner, want.partner)
    # the next call draws a new pairing; a re-seeded transform repeats the sequence
    second = t(x, m, b, y)
    assert not np.array_equal(second.partner, got.partner)
    again = ApplyVariant("mixed_rand").set_random_state(42)
    np.testing.assert_array_equal(again(x, m, b, y).partner, got.partner)


def test_array_transform_accepts_a_single_crop():
    x, m, b, y = make_batch(n=1)
    r = ApplyVariant("only_bg_t")(torch.from_numpy(x[0]), torch.from_numpy(m[0]), b[0], y[0])
    assert tuple(r.images.shape) == x.shape[1:]
    np.testing.assert_array_equal(r.images.numpy(), V.only_bg_t(x, b)[0])


def test_dictionary_transform_matches_array_transform():
    import monai.transforms as mt

    x, m, b, y = make_batch(n=15)
    d = {"image": torch.from_numpy(x), "mask": torch.from_numpy(m), "bbox": b, "label": y}
    td = ApplyVariantd("image", spec="mask_erode(1)+mixed_next").set_random_state(3)
    assert isinstance(td, mt.MapTransform) and isinstance(td, mt.Randomizable)
    out = td(d)
    ref = ApplyVariant("mask_erode(1)+mixed_next").set_random_state(3)(x, m, b, y)
    np.testing.assert_array_equal(out["image"].numpy(), ref.images)
    np.testing.assert_array_equal(out["mask"].numpy(), ref.masks)
    np.testing.assert_array_equal(out["partner"], ref.partner)
    assert d["image"] is not out["image"]
    # inside a MONAI Compose, seeds flow through Compose.set_random_state
    c1 = mt.Compose([ApplyVariantd("image", spec="mixed_same")]).set_random_state(9)
    c2 = mt.Compose([ApplyVariantd("image", spec="mixed_same")]).set_random_state(9)
    np.testing.assert_array_equal(c1(d)["partner"], c2(d)["partner"])


def test_dictionary_transform_needs_the_mask():
    with pytest.raises(CellbgError, match="needs the mask under key 'mask'"):
        ApplyVariantd("image", spec="only_fg")({"image": np.zeros((1, 1, 2, 2))})


# --------------------------------------------------------------------------- gallery / export
def test_gallery_png_has_one_panel_per_cell_and_variant(tmp_path):
    import matplotlib.image as mpimg

    x, m, b, y = make_batch(n=5)
    specs = ["original", "only_fg", "only_bg_t", "mixed_rand"]
    out = V.make_gallery(x, m, b, y, specs, tmp_path / "g" / "gallery.png", cells=[0, 2, 4])
    png = mpimg.imread(out)
    # figsize 1.4 in per panel at 100 dpi -> 140 px per row / column
    assert png.shape[:2] == (3 * 140, 4 * 140)
    assert not list((tmp_path / "g").glob("*.tmp*"))


def test_export_writes_tiffs_equal_to_the_variant(tmp_path):
    import pandas as pd
    import tifffile

    x, m, b, y = make_batch(n=6)
    cells = pd.DataFrame(
        {
            "cell_id": [f"img{i // 3}-{i:04d}" for i in range(6)],
            "label": np.array(["healthy", "sezary", "other"])[y],
            "label_index": y,
            "bbox_r0": b[:, 0],
            "bbox_c0": b[:, 1],
            "bbox_r1": b[:, 2],
            "bbox_c1": b[:, 3],
        }
    )
    table = V.export_variants(x, m, cells, ["only_fg", "mixed_next"], tmp_path / "exp", seed=4)
    assert len(table) == 12
    ref = apply_variant("mixed_next", x, m, bboxes=b, labels=y, seed=4)
    man = pd.read_csv(tmp_path / "exp" / "mixed_next" / "manifest.csv", keep_default_na=False)
    for i, row in man.iterrows():
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "exp" / "mixed_next" / row.path), ref.images[i])
        assert row.partner_cell_id == cells.cell_id[ref.partner[i]]
    assert (
        pd.read_csv(tmp_path / "exp" / "only_fg" / "manifest.csv", keep_default_na=False).partner_cell_id == ""
    ).all()
    with pytest.raises(CellbgError, match="lacks columns"):
        V.export_variants(x, m, cells.drop(columns="bbox_r0"), ["only_fg"], tmp_path / "exp2")


def test_docstring_examples_run():
    import cellbg._variant_spec as spec_module

    result = doctest.testmod(V, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 10 and result.failed == 0
    result = doctest.testmod(spec_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 2 and result.failed == 0


# --------------------------------------------------------------------------- CLI on a contract run folder
def test_cli_variants_gallery_and_export(tmp_path):
    import pandas as pd
    import tifffile
    import zarr
    from typer.testing import CliRunner

    from cellbg.cli import app

    run = tmp_path / "run"
    run.mkdir()
    x, m, b, y = make_batch(n=6, h=16, w=16)
    group = zarr.open_group(str(run / "crops.zarr"), mode="w")
    group.create_array("images", data=x)
    group.create_array("masks", data=m)
    group.attrs["classes"] = ["a", "b", "c"]
    cells = pd.DataFrame(
        {
            "cell_id": [f"im-{i:04d}" for i in range(6)],
            "label": np.array(["a", "b", "c"])[y],
            "label_index": y,
            "bbox_r0": b[:, 0],
            "bbox_c0": b[:, 1],
            "bbox_r1": b[:, 2],
            "bbox_c1": b[:, 3],
        }
    )
    cells.to_parquet(run / "cells.parquet")
    proto = tmp_path / "p.yaml"
    proto.write_text(
        f"name: t\noutput: {run}\nvariants:\n  train: [original]\n  test: [only_fg, 'mask_erode(1)+mixed_same']\n"
        "  seed: 5\n"
    )
    r = CliRunner().invoke(
        app, ["variants", str(proto), "--gallery", str(tmp_path / "g.png"), "--export", str(tmp_path / "exp")]
    )
    assert r.exit_code == 0, r.output
    assert "3 variants on 6 cells" in r.stdout
    assert (tmp_path / "g.png").stat().st_size > 0
    ref = apply_variant("mask_erode(1)+mixed_same", x, m, bboxes=b, labels=y, seed=5)
    got = tifffile.imread(tmp_path / "exp" / "mask_erode_1_+mixed_same" / "b" / "im-0001.tif")
    np.testing.assert_array_equal(got, ref.images[1])
    # a missing crop store is one red line and exit 2
    proto.write_text(f"name: t\noutput: {tmp_path / 'empty'}\n")
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(app, ["variants", str(proto)])
    assert r.exit_code == 2 and "cellbg crops" in r.output


# --------------------------------------------------------------------------- bg_image, context, no_others
def test_new_variants_parse_and_reject_bad_arguments():
    assert parse_variant("bg_image( synthetic )").spec == "bg_image(synthetic)"
    assert parse_variant("bg_image(my-folder_2)").args == ("my-folder_2",)
    assert parse_variant("context(0.5)").args == (0.5,) and parse_variant("no_others").args == ()
    assert parse_variant("bg_image(synthetic)").random
    for spec, match in [
        ("bg_image()", "source name"),
        ("bg_image(1x)", "source name"),
        ("context(0)", r"\(0, 4\]"),
        ("context(5)", r"\(0, 4\]"),
        ("no_others(1)", "takes no arguments"),
    ]:
        with pytest.raises(CellbgError, match=match):
            parse_variant(spec)


def test_bg_image_keeps_foreground_bit_identical_and_draws_reproducibly():
    from cellbg.backgrounds import background_pool

    x, m, b, y = make_batch(n=40, h=64, w=64)
    pool = background_pool("synthetic", {"kind": "synthetic", "count": 8}, size=64, channels=3, seed=3)
    again = background_pool("synthetic", {"kind": "synthetic", "count": 8}, size=64, channels=3, seed=3)
    np.testing.assert_array_equal(pool.images, again.images)
    assert not np.array_equal(pool.images[0], pool.images[1])  # every field has its own slide
    r = apply_variant("bg_image(synthetic)", x, m, backgrounds={"synthetic": pool}, seed=5)
    assert (r.images[np.broadcast_to(m[:, None], x.shape)] == x[np.broadcast_to(m[:, None], x.shape)]).all()
    expected = np.where(m[:, None], x, pool.images[r.background])
    np.testing.assert_array_equal(r.images, expected)
    assert r.background.min() >= 0 and len(np.unique(r.background)) > 4 and (r.partner == -1).all()
    np.testing.assert_array_equal(
        apply_variant("bg_image(synthetic)", x, m, backgrounds={"synthetic": pool}, seed=5).background, r.background
    )
    assert not np.array_equal(
        apply_variant("bg_image(synthetic)", x, m, backgrounds={"synthetic": pool}, seed=6).background, r.background
    )
    # torch gives the same numbers
    rt = apply_variant(
        "bg_image(synthetic)", torch.from_numpy(x), torch.from_numpy(m), backgrounds={"synthetic": pool}, seed=5
    )
    np.testing.assert_array_equal(rt.images.numpy(), r.images)
    with pytest.raises(CellbgError, match="background pool 'other'"):
        apply_variant("bg_image(other)", x, m, backgrounds={"synthetic": pool})


def test_background_pools_from_a_folder_and_a_constant(tmp_path):
    import tifffile

    from cellbg.backgrounds import background_pool

    rng = np.random.default_rng(0)
    (tmp_path / "bg").mkdir()
    tifffile.imwrite(tmp_path / "bg" / "a.tif", rng.integers(0, 256, (80, 90, 3), dtype=np.uint8))
    tifffile.imwrite(tmp_path / "bg" / "small.tif", np.full((20, 30), 60000, np.uint16))  # gray, 16-bit, small
    cfg = {"kind": "folder", "path": str(tmp_path / "bg"), "count": 12}
    p = background_pool("bg", cfg, size=32, channels=3, seed=1)
    assert p.images.shape == (12, 3, 32, 32) and p.images.dtype == np.float32
    assert 0 <= p.images.min() and p.images.max() <= 1
    np.testing.assert_array_equal(p.images, background_pool("bg", cfg, size=32, channels=3, seed=1).images)
    assert {i.split("@")[0] for i in p.ids} == {"a.tif", "small.tif"}
    small = [k for k, i in enumerate(p.ids) if i.startswith("small")]
    np.testing.assert_allclose(p.images[small], 60000 / 65535, rtol=1e-6)  # enlarged, gray repeated
    k = next(k for k, i in enumerate(p.ids) if i.startswith("a.tif"))
    r0, c0 = map(int, p.ids[k].split("@")[1].split(","))
    window = tifffile.imread(tmp_path / "bg" / "a.tif")[r0 : r0 + 32, c0 : c0 + 32]
    np.testing.assert_array_equal(p.images[k], np.moveaxis(window, -1, 0) / np.float32(255))
    const = background_pool("grey", {"kind": "constant", "color": [0.2, 0.4, 0.6]}, size=8, channels=3)
    assert const.ids == ["constant"] and const.images[0, :, 3, 3].tolist() == pytest.approx([0.2, 0.4, 0.6])
    with pytest.raises(CellbgError, match="holds no images"):
        (tmp_path / "empty").mkdir()
        background_pool("e", {"kind": "folder", "path": str(tmp_path / "empty")}, size=8, channels=3)
    with pytest.raises(CellbgError, match="unknown background source 'nope'"):
        background_pool("nope", size=8, channels=3)


@pytest.mark.parametrize("kind, dtype", [("numpy", "float32"), ("numpy", "uint8"), ("torch", "float32")])
def test_context_one_equals_the_crop(kind, dtype):
    x, m, b, y = make_batch(n=5, h=16, w=16)
    x = (x * 255).astype(np.uint8) if dtype == "uint8" else x
    if kind == "torch":
        x, m = torch.from_numpy(x), torch.from_numpy(m)
    r = apply_variant("context(1)", x, m, fill="mean")
    assert type(r.images) is type(x) and r.images.dtype == x.dtype
    assert (r.images == x).all() and (r.masks == m).all()


def test_context_resamples_the_centre_bilinearly_and_fills_beyond_the_crop():
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)  # value = 4 row + col
    m = np.zeros((1, 4, 4), bool)
    m[0, 1:3, 1:3] = True
    r = apply_variant("context(0.5)", x, m)
    # output i samples 1.5 + (i - 1.5) / 2 = 0.75, 1.25, 1.75, 2.25 along each axis
    t = np.array([0.75, 1.25, 1.75, 2.25])
    np.testing.assert_allclose(r.images[0, 0], 4 * t[:, None] + t[None, :], rtol=1e-6)
    # the mask by nearest neighbour: rows/cols 1, 1, 2, 2 (round half up)
    assert r.masks[0].all()
    big = apply_variant("context(2)", x, m, fill="0.5")
    # output i samples 2 (i - 1.5) + 1.5 = -1.5, 0.5, 2.5, 4.5: the ends are beyond the crop
    assert (big.images[0, 0, 0] == 0.5).all() and (big.images[0, 0, :, 3] == 0.5).all()
    np.testing.assert_allclose(big.images[0, 0, 1:3, 1:3], [[2.5, 4.5], [10.5, 12.5]])
    assert big.masks[0].sum() == 1 and big.masks[0, 1, 1]  # the window's centre pixel (1.5 -> 2)


def test_context_on_real_cells_keeps_the_cell_centred_and_scales_its_area():
    x, m, b, y = make_batch(n=20, h=32, w=32)
    area = m.sum((1, 2))
    half = apply_variant("context(0.5)", x, m).masks.sum((1, 2))
    central = (np.abs(b[:, 0] + b[:, 2] - 32) <= 10) & (np.abs(b[:, 1] + b[:, 3] - 32) <= 10)
    ratio = half[central] / area[central]
    assert 3.0 < ratio.mean() < 5.0  # about 1 / 0.5^2


def test_no_others_changes_only_other_objects_pixels():
    x, m, b, y = make_batch(n=10)
    rng = np.random.default_rng(1)
    others = rng.random(m.shape) < 0.2
    for fill in ["black", "0.3,0.3,0.3", "noise", "inpaint"]:
        out = apply_variant("no_others", x, m, others=others, others_fill=fill, seed=2).images
        changed = (out != x).any(1)
        target = others & ~m
        assert not changed[~target].any()
        assert changed[target].mean() > 0.99
    torch_out = apply_variant(
        "no_others", torch.from_numpy(x), torch.from_numpy(m), others=torch.from_numpy(others)
    ).images
    np.testing.assert_allclose(torch_out.numpy(), V.no_others(x, m, others), rtol=0, atol=1e-6)
    with pytest.raises(CellbgError, match="others="):
        apply_variant("no_others", x, m)


def test_no_others_inpaints_from_the_true_background_only():
    # left half of the crop dark background, right half bright; a bright object sits in the dark half
    x = np.zeros((1, 1, 12, 12), np.float32)
    x[..., 6:] = 1.0
    m = np.zeros((1, 12, 12), bool)
    m[0, 8:11, 8:11] = True  # the cell, in the bright half
    others = np.zeros_like(m)
    others[0, 4:7, 1:4] = True  # an object in the dark half
    x[0, 0][others[0]] = 1.0
    x[0, 0][m[0]] = 0.7
    out = V.no_others(x, m, others)
    assert (out[0, 0][others[0]] < 0.25).all()  # the dark surround, not the object's brightness
    np.testing.assert_array_equal(out[0, 0][~others[0]], x[0, 0][~others[0]])
    # the cell's own pixels never feed the inpainting: a cell-coloured neighbour changes nothing
    x2 = x.copy()
    x2[0, 0][m[0]] = 0.0
    np.testing.assert_allclose(V.no_others(x2, m, others)[0, 0][others[0]], out[0, 0][others[0]])
    u8 = (x * 255).astype(np.uint8)
    assert V.no_others(u8, m, others).dtype == np.uint8


# --------------------------------------------------------------------------- reference: xiao (their main.py)
# Hand-derived from rabbit-abacus/roleofimagebackgrounds main.py: the box (r0, c0, r1, c1) is
# their XML box xmin=c0, ymin=r0, xmax=c1, ymax=r1, painted by ImageDraw.rectangle inclusive
# of xmax/ymax; get_bg_tiled takes the left/right strip only if its area is strictly larger,
# the left (top) side only if strictly wider, and pastes the tile from the origin; combine()
# gives the backdrop to every pure-black pixel of the cell-on-black image.
def grid(h, w):
    return (10 * np.arange(h)[:, None] + np.arange(w)[None, :]).astype(np.float32)[None, None]


def test_xiao_box_is_inclusive_and_the_right_strip_starts_at_a_painted_column():
    x = grid(2, 7)  # rows 0..6 and 10..16
    b = np.array([[0, 1, 2, 3]])
    m = np.zeros((1, 2, 7), bool)
    xiao = apply_variant("only_bg_t", x, m, bboxes=b, reference="xiao").images[0, 0]
    # margins left 1, right 7 - 3 = 4: right strip, columns [3, 7), tiled from the origin;
    # painted columns 1..3 read 3 + c mod 4 = 4, 5, 6
    np.testing.assert_array_equal(xiao, [[0, 4, 5, 6, 4, 5, 6], [10, 14, 15, 16, 14, 15, 16]])
    clean = apply_variant("only_bg_t", x, m, bboxes=b).images[0, 0]
    np.testing.assert_array_equal(clean, [[0, 4, 5, 3, 4, 5, 6], [10, 14, 15, 13, 14, 15, 16]])
    black = apply_variant("only_bg_b", x, m, bboxes=b, reference="xiao", fill="0.5").images[0, 0]
    np.testing.assert_array_equal(black, [[0, 0, 0, 0, 4, 5, 6], [10, 0, 0, 0, 14, 15, 16]])  # always 0


def test_xiao_ties_take_rows_then_the_far_side():
    x = grid(4, 4)
    m = np.zeros((1, 4, 4), bool)
    b = np.array([[1, 1, 3, 3]])  # every margin 1: areas tie
    xiao = apply_variant("only_bg_t", x, m, bboxes=b, reference="xiao").images[0, 0]
    # a tie of areas takes the rows; a tie of top/bottom takes the bottom strip [3, 4);
    # painted rows and columns 1..3 read row 3
    np.testing.assert_array_equal(xiao, [[0, 1, 2, 3], [10, 31, 32, 33], [20, 31, 32, 33], [30, 31, 32, 33]])
    clean = apply_variant("only_bg_t", x, m, bboxes=b).images[0, 0]
    np.testing.assert_array_equal(clean, [[0, 1, 2, 3], [10, 10, 10, 13], [20, 20, 20, 23], [30, 31, 32, 33]])
    # left/right tie with the columns chosen: the right strip [4, 6), read from the origin
    x = grid(2, 6)
    b = np.array([[0, 2, 2, 4]])
    xiao = apply_variant("only_bg_t", x, np.zeros((1, 2, 6), bool), bboxes=b, reference="xiao").images[0, 0]
    np.testing.assert_array_equal(xiao, [[0, 1, 4, 5, 4, 5], [10, 11, 14, 15, 14, 15]])
    clean = apply_variant("only_bg_t", x, np.zeros((1, 2, 6), bool), bboxes=b).images[0, 0]
    np.testing.assert_array_equal(clean, [[0, 1, 0, 1, 4, 5], [10, 11, 10, 11, 14, 15]])


def test_xiao_mixed_gives_pure_black_foreground_pixels_the_backdrop():
    x = np.array(
        [
            [[[0.5, 0.0, 0.0, 0.2]], [[0.5, 0.0, 0.3, 0.2]]],  # cell 0: column 1 is pure black
            [[[0.1, 0.2, 0.3, 0.4]], [[0.6, 0.7, 0.8, 0.9]]],  # cell 1
        ],
        np.float32,
    )
    m = np.array([[[False, True, True, False]], [[False, False, False, True]]])
    b = np.array([[0, 1, 1, 3], [0, 3, 1, 4]])
    y = np.array([0, 1])
    r = apply_variant("mixed_next", x, m, bboxes=b, labels=y, reference="xiao")
    assert r.partner.tolist() == [1, 0]
    # cell 1's backdrop: left strip [0, 3) (left 3 > right 0), painted column 3 reads column 0
    np.testing.assert_allclose(r.images[0], [[[0.1, 0.2, 0.0, 0.1]], [[0.6, 0.7, 0.3, 0.6]]])
    # cell 0's backdrop: left 1 = right 1, so the right strip [3, 4); painted columns 1..3
    np.testing.assert_allclose(r.images[1], [[[0.5, 0.2, 0.2, 0.4]], [[0.5, 0.2, 0.2, 0.9]]])
    clean = apply_variant("mixed_next", x, m, bboxes=b, labels=y)
    np.testing.assert_allclose(clean.images[0], [[[0.1, 0.0, 0.0, 0.1]], [[0.6, 0.0, 0.3, 0.6]]])
    np.testing.assert_allclose(clean.images[1], [[[0.5, 0.5, 0.5, 0.4]], [[0.5, 0.5, 0.5, 0.9]]])


def test_xiao_pairing_may_draw_the_cell_itself():
    labels = np.zeros(3, np.int64)
    counts = np.zeros((3, 3))
    for s in range(600):
        counts[np.arange(3), pair_cells(labels, "same", seed=s, exclude_self=False)] += 1
    assert counts.min() > 150 and counts.max() < 250  # each of the 3 (self included) about 200 times
    x, m, b, y = make_batch(n=30)
    r = apply_variant("mixed_same", x, m, bboxes=b, labels=y % 2, reference="xiao", seed=4)
    np.testing.assert_array_equal(r.partner, pair_cells(y % 2, "same", seed=4, exclude_self=False))


def test_xiao_without_margin_takes_the_fill():
    x = grid(2, 2)
    r = apply_variant(
        "only_bg_t", x, np.zeros((1, 2, 2), bool), bboxes=np.array([[0, 0, 2, 2]]), reference="xiao", fill="0.5"
    )
    assert (r.images == 0.5).all()  # their code raises "No background rectangles left"


def _pil_reference(img: np.ndarray, box) -> tuple[np.ndarray, np.ndarray]:
    """only_bg_b and only_bg_t of one (H, W, 3) uint8 image, by the PIL steps of their main.py."""
    from PIL import Image, ImageDraw

    pil = Image.fromarray(img)
    width, height = pil.size
    r0, c0, r1, c1 = (int(v) for v in box)
    xmin, ymin, xmax, ymax = c0, r0, c1, r1
    mask = Image.new("RGB", (width, height), (0, 0, 0))
    ImageDraw.Draw(mask).rectangle([xmin, ymin, xmax, ymax], fill="white")
    np_mask = np.array(mask)
    only_b = np.array(pil)
    only_b[np_mask == 255] = 0
    left, top, right, bottom = xmin, ymin, width - xmax, height - ymax
    if max(left, right) * height > max(top, bottom) * width:
        crop = [0, 0, xmin, height] if left > right else [xmax, 0, width, height]
    else:
        crop = [0, 0, width, ymin] if top > bottom else [0, ymax, width, height]
    tile = pil.crop(crop)
    tiled = Image.new("RGB", (width, height))
    for i in range(0, width, tile.size[0]):
        for j in range(0, height, tile.size[1]):
            tiled.paste(tile, (i, j))
    only_t = np.array(pil)
    only_t[np_mask == 255] = np.array(tiled)[np_mask == 255]
    return only_b, only_t


def test_xiao_reference_matches_the_pil_steps_of_their_code_on_random_boxes():
    pytest.importorskip("PIL")
    rng = np.random.default_rng(0)
    n, h, w = 60, 9, 11
    x = rng.integers(1, 256, (n, 3, h, w), dtype=np.uint8)
    r0, c0 = rng.integers(0, h, n), rng.integers(0, w, n)
    r1 = np.minimum(r0 + rng.integers(1, h, n), h)
    c1 = np.minimum(c0 + rng.integers(1, w, n), w)
    b = np.stack([r0, c0, r1, c1], 1)
    ok = ~((r0 == 0) & (c0 == 0) & (r1 == h) & (c1 == w))
    m = np.zeros((n, h, w), bool)
    got_b = apply_variant("only_bg_b", x, m, bboxes=b, reference="xiao").images
    got_t = apply_variant("only_bg_t", x, m, bboxes=b, reference="xiao").images
    for i in np.flatnonzero(ok):
        want_b, want_t = _pil_reference(np.moveaxis(x[i], 0, -1), b[i])
        np.testing.assert_array_equal(np.moveaxis(got_b[i], 0, -1), want_b)
        np.testing.assert_array_equal(np.moveaxis(got_t[i], 0, -1), want_t)
    tt = apply_variant("only_bg_t", torch.from_numpy(x), torch.from_numpy(m), bboxes=b, reference="xiao").images
    np.testing.assert_array_equal(tt.numpy(), got_t)


def test_no_others_as_a_first_step_cleans_every_crop_before_mixing():
    x, m, b, y = make_batch(n=16)
    others = np.random.default_rng(2).random(m.shape) < 0.15
    v = parse_variant("no_others + mixed_rand")
    assert v.spec == "no_others+mixed_rand" and v.perturbations == (("no_others", ()),)
    r = apply_variant(v, x, m, bboxes=b, labels=y, others=others, fill="0.5", seed=3)
    cleaned = apply_variant("no_others", x, m, others=others, fill="0.5").images
    ref = apply_variant("mixed_rand", cleaned, m, bboxes=b, labels=y, fill="0.5", seed=3)
    np.testing.assert_array_equal(r.images, ref.images)
    np.testing.assert_array_equal(r.partner, ref.partner)
    with pytest.raises(CellbgError, match="no_others twice"):
        parse_variant("no_others+no_others+only_fg")
    with pytest.raises(CellbgError, match="others="):
        apply_variant("no_others+mixed_rand", x, m, bboxes=b, labels=y)
