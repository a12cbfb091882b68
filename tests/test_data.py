"""Dataset discovery (class folders, manifest), image readers and their errors."""

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pandas as pd
import pytest
import tifffile

from cellbg._checks import CellbgError
from cellbg.data import (
    assign_folds,
    check_masks,
    discover,
    discover_folders,
    discover_manifest,
    read_image,
    read_mask,
    summarize,
)
from cellbg.protocol import parse_protocol


def _rgb(seed=0, shape=(12, 10)):
    return np.random.default_rng(seed).integers(0, 255, size=(*shape, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- readers
def test_read_gray_tiff_adds_channel_axis(tmp_path):
    img = np.arange(30, dtype=np.uint16).reshape(5, 6)
    tifffile.imwrite(tmp_path / "a.tif", img)
    out = read_image(tmp_path / "a.tif")
    assert out.shape == (1, 5, 6) and out.dtype == np.uint16
    np.testing.assert_array_equal(out[0], img)


def test_read_rgb_tiff_is_channels_first(tmp_path):
    img = _rgb()
    tifffile.imwrite(tmp_path / "a.tif", img, photometric="rgb")
    out = read_image(tmp_path / "a.tif")
    assert out.shape == (3, 12, 10)
    np.testing.assert_array_equal(out, np.moveaxis(img, -1, 0))


def test_read_multipage_tiff_pages_are_channels(tmp_path):
    pages = np.stack([np.full((7, 8), i, np.uint8) for i in range(4)])
    tifffile.imwrite(tmp_path / "a.tif", pages)
    out = read_image(tmp_path / "a.tif", channels=[3, 1])
    assert out.shape == (2, 7, 8)
    assert out[0, 0, 0] == 3 and out[1, 0, 0] == 1


def test_read_ome_tiff_with_channel_axis(tmp_path):
    data = np.stack([np.full((9, 11), 10 * (i + 1), np.uint16) for i in range(2)])
    tifffile.imwrite(tmp_path / "a.ome.tif", data, metadata={"axes": "CYX"}, ome=True)
    out = read_image(tmp_path / "a.ome.tif")
    assert out.shape == (2, 9, 11)
    assert out[1, 4, 4] == 20


def test_read_zstack_is_refused_with_advice(tmp_path):
    data = np.zeros((3, 2, 9, 11), np.uint16)
    tifffile.imwrite(tmp_path / "z.ome.tif", data, metadata={"axes": "ZCYX"}, ome=True)
    with pytest.raises(CellbgError, match="one plane per file"):
        read_image(tmp_path / "z.ome.tif")


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_read_png_and_jpeg(tmp_path, ext):
    img = _rgb(shape=(16, 16))
    iio.imwrite(tmp_path / f"a{ext}", img)
    out = read_image(tmp_path / f"a{ext}")
    assert out.shape == (3, 16, 16) and out.dtype == np.uint8
    if ext == ".png":  # lossless
        np.testing.assert_array_equal(out, np.moveaxis(img, -1, 0))


def test_read_gray_png(tmp_path):
    iio.imwrite(tmp_path / "g.png", np.eye(8, dtype=np.uint8) * 200)
    assert read_image(tmp_path / "g.png").shape == (1, 8, 8)


def test_missing_and_corrupt_images(tmp_path):
    with pytest.raises(CellbgError, match=r"image not found: .*none\.tif"):
        read_image(tmp_path / "none.tif")
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"this is not a tiff")
    with pytest.raises(CellbgError, match=r"cannot read image .*bad\.tif"):
        read_image(bad)
    bad_png = tmp_path / "bad.png"
    bad_png.write_bytes(b"\x89PNG nope")
    with pytest.raises(CellbgError, match=r"cannot read image .*bad\.png"):
        read_image(bad_png)


def test_channel_out_of_range(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", _rgb(), photometric="rgb")
    with pytest.raises(CellbgError, match=r"channel\(s\) \[5\] out of range .* 3 channel"):
        read_image(tmp_path / "a.tif", channels=[0, 5])


def test_read_mask(tmp_path):
    m = np.zeros((6, 6), np.uint16)
    m[1:3, 1:3] = 7
    tifffile.imwrite(tmp_path / "m.tif", m)
    out = read_mask(tmp_path / "m.tif")
    assert out.dtype == np.int32 and out.shape == (6, 6) and set(np.unique(out)) == {0, 7}
    tifffile.imwrite(tmp_path / "rgb.tif", _rgb(), photometric="rgb")
    with pytest.raises(CellbgError, match="a mask is one label plane"):
        read_mask(tmp_path / "rgb.tif")


# --------------------------------------------------------------------------- layouts
def _folders(root: Path, with_masks: bool = False):
    for label, patients in {"healthy": ["p1", "p2"], "sezary": ["p3"]}.items():
        for p in patients:
            d = root / "imgs" / label / p
            d.mkdir(parents=True)
            for k in range(2):
                tifffile.imwrite(d / f"img{k}.tif", _rgb(k), photometric="rgb")
                if with_masks:
                    md = root / "masks" / label / p
                    md.mkdir(parents=True, exist_ok=True)
                    tifffile.imwrite(md / f"img{k}.tif", np.zeros((12, 10), np.uint16))
    return root / "imgs"


def test_class_folders_layout(tmp_path):
    root = _folders(tmp_path)
    t = discover_folders(root)
    assert list(t.columns) == ["image_id", "path", "label", "patient_id", "mask_path", "objects_path"]
    assert len(t) == 6
    assert t["image_id"].is_unique
    assert set(t["label"]) == {"healthy", "sezary"}
    assert t.loc[t["label"] == "sezary", "patient_id"].unique().tolist() == ["p3"]
    s = summarize(t)
    assert s["images"].tolist() == [2, 2, 2]


def test_class_folders_with_patient_pattern(tmp_path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for p in ("P01", "P02"):
            tifffile.imwrite(tmp_path / label / f"{p}_slide3.tif", _rgb(), photometric="rgb")
    t = discover_folders(tmp_path, patient_pattern=r"(?P<patient>P\d+)_")
    assert sorted(t["patient_id"].unique()) == ["P01", "P02"]
    with pytest.raises(CellbgError, match="named group"):
        discover_folders(tmp_path, patient_pattern=r"P\d+")
    with pytest.raises(CellbgError, match="does not match file name"):
        discover_folders(tmp_path, patient_pattern=r"(?P<patient>Q\d+)")


def test_class_folders_need_a_patient(tmp_path):
    (tmp_path / "a").mkdir()
    tifffile.imwrite(tmp_path / "a" / "x.tif", _rgb(), photometric="rgb")
    with pytest.raises(CellbgError, match=r"no patient for .*x\.tif"):
        discover_folders(tmp_path)


def test_empty_class_is_an_error(tmp_path):
    root = _folders(tmp_path)
    (root / "empty_class").mkdir()
    with pytest.raises(CellbgError, match=r"class 'empty_class' has no images"):
        discover_folders(root)


def test_mask_dir_and_shape_check(tmp_path):
    root = _folders(tmp_path, with_masks=True)
    t = discover_folders(root, mask_dir=tmp_path / "masks")
    assert (t["mask_path"] != "").all()
    check_masks(t)  # shapes agree
    bad = Path(t["mask_path"].iloc[0])
    tifffile.imwrite(bad, np.zeros((5, 5), np.uint16))
    with pytest.raises(CellbgError, match=r"mask .* has shape \(5, 5\) but image .* is \(12, 10\)"):
        check_masks(t)


def _manifest(tmp_path, rows, header="path,label,patient,mask"):
    (tmp_path / "m.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    return tmp_path / "m.csv"


def test_manifest_layout(tmp_path):
    (tmp_path / "im").mkdir()
    for i in range(3):
        tifffile.imwrite(tmp_path / "im" / f"{i}.tif", _rgb(i), photometric="rgb")
    tifffile.imwrite(tmp_path / "im" / "m0.tif", np.zeros((12, 10), np.uint16))
    m = _manifest(tmp_path, ["im/0.tif,a,p1,im/m0.tif", "im/1.tif,b,p1,", "im/2.tif,b,p2,"])
    t = discover_manifest(m)
    assert t["label"].tolist() == ["a", "b", "b"]
    assert t["patient_id"].tolist() == ["p1", "p1", "p2"]
    assert t["mask_path"].iloc[0].endswith("m0.tif") and t["mask_path"].iloc[1] == ""
    assert Path(t["path"].iloc[2]).is_absolute()


@pytest.mark.parametrize(
    "rows, header, message",
    [
        (["im/none.tif,a,p1,"], "path,label,patient,mask", r"m\.csv:2: image not found"),
        (["im/0.tif,,p1,"], "path,label,patient,mask", r"m\.csv:2: label is empty"),
        (["im/0.tif,a,,"], "path,label,patient,mask", r"m\.csv:2: patient is empty"),
        (["im/0.tif,a"], "path,label", r"lacks column\(s\) \['patient'\]"),
        (["im/0.tif,a,p1,im/nomask.tif"], "path,label,patient,mask", r"m\.csv:2: mask not found"),
        ([], "path,label,patient", "lists no images"),
    ],
)
def test_manifest_errors(tmp_path, rows, header, message):
    (tmp_path / "im").mkdir()
    tifffile.imwrite(tmp_path / "im" / "0.tif", _rgb(), photometric="rgb")
    with pytest.raises(CellbgError, match=message):
        discover_manifest(_manifest(tmp_path, rows, header))


def test_discover_needs_two_classes_and_masks_for_mask_method(tmp_path):
    (tmp_path / "im").mkdir()
    tifffile.imwrite(tmp_path / "im" / "0.tif", _rgb(), photometric="rgb")
    tifffile.imwrite(tmp_path / "im" / "1.tif", _rgb(), photometric="rgb")
    m = _manifest(tmp_path, ["im/0.tif,a,p1,", "im/1.tif,a,p2,"])
    p = parse_protocol(f"name: x\ndata:\n  source: manifest\n  manifest: {m}\nsegmentation:\n  method: threshold\n")
    with pytest.raises(CellbgError, match="1 class"):
        discover(p)
    m = _manifest(tmp_path, ["im/0.tif,a,p1,", "im/1.tif,b,p2,"])
    p = parse_protocol(f"name: x\ndata:\n  source: manifest\n  manifest: {m}\n")
    with pytest.raises(CellbgError, match="segmentation.method is 'masks' but image .* has no mask"):
        discover(p)


# --------------------------------------------------------------------------- folds
def test_assign_folds_groups_patients_and_stratifies():
    rng = np.random.default_rng(0)
    patients = [f"p{i}" for i in range(10)]
    label_of = {p: ("a" if i < 5 else "b") for i, p in enumerate(patients)}
    rows = [(p, label_of[p]) for p in patients for _ in range(rng.integers(3, 8))]
    t = pd.DataFrame(rows, columns=["patient_id", "label"])
    folds = assign_folds(t, folds=5, seed=1)
    # a patient lies in exactly one fold
    assert (t.assign(f=folds).groupby("patient_id")["f"].nunique() == 1).all()
    # every fold holds one patient of each class (5 per class dealt over 5 folds)
    per_fold = t.assign(f=folds).drop_duplicates("patient_id").groupby(["f", "label"]).size()
    assert (per_fold == 1).all() and len(per_fold) == 10
    # deterministic, and the seed matters
    assert folds.equals(assign_folds(t, folds=5, seed=1))
    assert not all(assign_folds(t, folds=5, seed=s).equals(folds) for s in range(2, 6))


def test_assign_folds_errors_and_fixed_split():
    t = pd.DataFrame({"patient_id": ["a", "b", "c"], "label": ["x", "y", "x"]})
    with pytest.raises(CellbgError, match="3 patients cannot fill 5"):
        assign_folds(t, folds=5)
    f = assign_folds(t, kind="fixed", test_patients=["b"])
    assert f.tolist() == [-1, 0, -1]
    with pytest.raises(CellbgError, match=r"unknown patient\(s\) \['zz'\]"):
        assign_folds(t, kind="fixed", test_patients=["zz"])


# --------------------------------------------------------------------------- masks beside images, segment-only
def _discs(shape=(48, 48), centres=((12, 12), (30, 32)), radius=6):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.uint16)
    for i, (r, c) in enumerate(centres):
        labels[np.hypot(yy - r, xx - c) <= radius] = i + 1
    return labels


def test_masks_found_beside_images_by_suffix(tmp_path):
    d = tmp_path / "a" / "p1"
    d.mkdir(parents=True)
    for name, suffix, ext in (("x", "_cp_masks", ".png"), ("y", "_masks", ".tif"), ("z", None, None)):
        tifffile.imwrite(d / f"{name}.tif", (_discs() * 100).astype(np.uint8))
        if suffix:
            iio.imwrite(d / f"{name}{suffix}{ext}", _discs()) if ext == ".png" else tifffile.imwrite(
                d / f"{name}{suffix}{ext}", _discs()
            )
    t = discover_folders(tmp_path, need_classes=False).set_index(pd.Index(["x", "y", "z"]))
    assert len(t) == 3  # the masks are not images
    assert t.loc["x", "mask_path"].endswith("x_cp_masks.png")
    assert t.loc["y", "mask_path"].endswith("y_masks.tif")
    assert t.loc["z", "mask_path"] == ""
    np.testing.assert_array_equal(read_mask(t.loc["x", "mask_path"]), _discs())
    # Configurable: other suffixes, or none at all (then a "_masks" file is an image).
    t = discover_folders(tmp_path, need_classes=False, mask_suffixes=["_cp_masks"])
    assert len(t) == 4 and (t["mask_path"] != "").sum() == 1
    assert len(discover_folders(tmp_path, need_classes=False, mask_suffixes=[])) == 5
    p = parse_protocol(f"name: x\ndata: {{source: folders, root: {tmp_path}, mask_suffixes: [_seg]}}\n")
    assert p.data.mask_suffixes == ["_seg"]


def test_plain_folder_and_one_class_segment_without_classes(tmp_path):
    from cellbg.segment import evaluate_run, run_segmentation

    plain = tmp_path / "plain"
    plain.mkdir()
    for k in range(2):
        tifffile.imwrite(plain / f"im{k}.tif", (_discs() * 100).astype(np.uint8))
        tifffile.imwrite(plain / f"im{k}_masks.tif", _discs())
    text = f"name: x\noutput: {tmp_path / 'run'}\ndata: {{source: folders, root: {plain}}}\n"
    p = parse_protocol(text + "segmentation: {method: threshold, workers: 1}\n")
    with pytest.raises(CellbgError, match="not in class folders; a classifier needs"):
        discover(p)  # training still needs classes
    t = discover(p, need_classes=False)
    assert t["label"].tolist() == ["", ""] and (t["mask_path"] != "").all()
    seg = run_segmentation(p)
    assert len(seg) == 2 and all(Path(s).exists() for s in seg["seg_path"])
    assert evaluate_run(p)["f1"].tolist() == [1.0, 1.0]
    # One class, patients as folders: segments; a classifier is refused.
    one = tmp_path / "one" / "tcells" / "p1"
    one.mkdir(parents=True)
    tifffile.imwrite(one / "a.tif", (_discs() * 100).astype(np.uint8))
    p = parse_protocol(
        f"name: y\noutput: {tmp_path / 'run1'}\ndata: {{source: folders, root: {one.parents[1]}}}\n"
        "segmentation: {method: threshold, workers: 1}\n"
    )
    with pytest.raises(CellbgError, match="a classifier needs at least two"):
        discover(p)
    assert len(run_segmentation(p)) == 1


def test_loose_images_beside_class_folders_is_named(tmp_path):
    (tmp_path / "a" / "p1").mkdir(parents=True)
    tifffile.imwrite(tmp_path / "a" / "p1" / "x.tif", np.zeros((8, 8), np.uint8))
    tifffile.imwrite(tmp_path / "stray.tif", np.zeros((8, 8), np.uint8))
    message = r"holds images both directly \(stray.tif, \.\.\.\) and in class folders \(a\)"
    with pytest.raises(CellbgError, match=message):
        discover_folders(tmp_path, need_classes=False)
