"""Fault injection, image files: every kind of bad or unusual photo through `read_image`, the
stage-00 decode check and the stage-01 cropper. Each one either decodes to the right pixels or
is excluded with its reason named in report.json; none raises and none is dropped silently.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image, UnidentifiedImageError

from whaleid import catalogue, detect, images
from whaleid.config import config_from_dict, load_config
from whaleid.images import image_size, read_image
from whaleid.io import read_json

RED, BLUE = (200, 30, 30), (30, 30, 200)


def two_band(width: int = 30, height: int = 20) -> np.ndarray:
    """An RGB image, red above blue: its orientation can be read off any decode or crop."""
    rgb = np.empty((height, width, 3), np.uint8)
    rgb[: height // 2], rgb[height // 2:] = RED, BLUE
    return rgb


def _pil(rgb: np.ndarray, mode: str | None = None) -> Image.Image:
    img = Image.fromarray(rgb)
    return img.convert(mode) if mode else img


def _jpeg_bytes() -> bytes:
    return cv2.imencode(".jpg", cv2.cvtColor(two_band(), cv2.COLOR_RGB2BGR))[1].tobytes()


def _exif_rotated(path: Path) -> None:
    """The upright two_band image stored rotated, with EXIF orientation 6 (rotate 90 CW to view)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    _pil(two_band()).transpose(Image.Transpose.ROTATE_90).save(path, format="JPEG", exif=exif, quality=95)


# name -> writer; every file is named .jpg or .png as a user's folder would have it.
WRITERS: dict[str, Callable[[Path], object]] = {
    "corrupt.jpg": lambda p: p.write_bytes(b"\x00\x01 not an image at all"),
    "truncated.jpg": lambda p: p.write_bytes(_jpeg_bytes()[: len(_jpeg_bytes()) // 3]),
    "zero_bytes.jpg": lambda p: p.write_bytes(b""),
    "png_named.jpg": lambda p: _pil(two_band()).save(p, format="PNG"),
    "webp_named.jpg": lambda p: _pil(two_band()).save(p, format="WEBP", quality=95),
    "gray.jpg": lambda p: _pil(np.full((20, 30), 90, np.uint8)).save(p, format="JPEG"),
    "rgba.png": lambda p: _pil(np.dstack([two_band(), np.full((20, 30), 128, np.uint8)])).save(p),
    "cmyk.jpg": lambda p: _pil(two_band(), "CMYK").save(p, format="JPEG", quality=95),
    "gray16.png": lambda p: cv2.imwrite(str(p), np.full((20, 30), 40000, np.uint16)),
    "rgb16.png": lambda p: cv2.imwrite(str(p), np.full((20, 30, 3), (10000, 20000, 40000), np.uint16)),
    "exif6.jpg": _exif_rotated,
    "tiny.jpg": lambda p: _pil(two_band(10, 10)).save(p, format="JPEG", quality=95),
    "baleine grise é 1.jpg": lambda p: _pil(two_band()).save(p, format="JPEG", quality=95),
    "鯨 ザトウ 2.png": lambda p: _pil(two_band()).save(p, format="PNG"),
}
BAD = {"corrupt.jpg": "not a decodable image", "truncated.jpg": "not a decodable image",
       "zero_bytes.jpg": "empty file"}
# Expected (width, height) after EXIF rotation, and the colour of the top-left / bottom-right pixel.
GOOD = {
    "png_named.jpg": ((30, 20), RED, BLUE),
    "webp_named.jpg": ((30, 20), RED, BLUE),
    "gray.jpg": ((30, 20), (90, 90, 90), (90, 90, 90)),
    "rgba.png": ((30, 20), RED, BLUE),  # alpha is dropped, not composited
    "cmyk.jpg": ((30, 20), RED, BLUE),
    "gray16.png": ((30, 20), (156, 156, 156), (156, 156, 156)),  # 40000 / 257
    "rgb16.png": ((30, 20), (156, 78, 39), (156, 78, 39)),
    "exif6.jpg": ((30, 20), RED, BLUE),  # stored 20 x 30, shown upright
    "tiny.jpg": ((10, 10), RED, BLUE),
    "baleine grise é 1.jpg": ((30, 20), RED, BLUE),
    "鯨 ザトウ 2.png": ((30, 20), RED, BLUE),
}


def write_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        WRITERS[name](folder / name)


@pytest.fixture(scope="module")
def huge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12000 x 9000 (108 MP) JPEG, cheap because uniform (~1 MB on disk, ~0.3 GB decoded)."""
    path = tmp_path_factory.mktemp("huge") / "huge.jpg"
    Image.new("L", (12000, 9000), 120).save(path, format="JPEG", quality=80)
    return path


# --- whaleid.images.read_image --------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(BAD))
def test_read_image_returns_the_reason_for_a_bad_file(tmp_path: Path, name: str) -> None:
    write_images(tmp_path, [name])
    rgb, reason = read_image(tmp_path / name)
    assert rgb is None and reason.startswith(BAD[name]), reason


def test_read_image_missing_file(tmp_path: Path) -> None:
    assert read_image(tmp_path / "absent.jpg") == (None, "file not found")


@pytest.mark.parametrize("name", sorted(GOOD))
def test_read_image_decodes_any_format_to_upright_rgb8(tmp_path: Path, name: str) -> None:
    write_images(tmp_path, [name])
    rgb, reason = read_image(tmp_path / name)
    (width, height), top_left, bottom_right = GOOD[name]
    assert reason == "" and rgb is not None
    assert rgb.dtype == np.uint8 and rgb.shape == (height, width, 3)
    # writable: torch.from_numpy (ToTensorV2 when no resize is needed) warns on a read-only array
    assert rgb.flags.writeable and rgb.flags.c_contiguous
    np.testing.assert_allclose(rgb[0, 0], top_left, atol=6)
    np.testing.assert_allclose(rgb[-1, -1], bottom_right, atol=6)
    assert image_size(tmp_path / name) == (width, height)  # the header-only probe agrees


def test_read_image_huge(huge: Path) -> None:
    rgb, reason = read_image(huge)
    assert reason == "" and rgb.shape == (9000, 12000, 3)
    assert image_size(huge) == (12000, 9000)


@pytest.mark.parametrize("value", [200, 256, 386, 255 * 257, 40000])
def test_16_bit_gray_scales_by_its_range_like_opencv(tmp_path: Path, value: int) -> None:
    """A flat 16-bit gray PNG (Pillow mode I;16) reads as round(value / 257), as OpenCV's path
    does, whatever the image's maximum (it was 200 -> 200 but 256 -> 1)."""
    path = tmp_path / "gray16.png"
    cv2.imwrite(str(path), np.full((20, 30), value, np.uint16))
    assert Image.open(path).mode == "I;16"
    rgb, reason = read_image(path)
    assert reason == "" and (rgb == round(value / 257)).all(), (value, rgb[0, 0])
    opencv = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert (rgb[:, :, 0] == (opencv / 257.0).round().astype(np.uint8)).all()


def test_32_bit_gray_is_clipped_to_the_16_bit_range(tmp_path: Path) -> None:
    """Pillow mode I (32-bit signed): values outside 0..65535 clip instead of wrapping."""
    path = tmp_path / "gray32.tif"
    values = np.array([[-5, 70000, 2**31 - 1], [65535, 257 * 100, 0]], np.int32)
    Image.fromarray(np.repeat(np.repeat(values, 10, axis=0), 10, axis=1)).save(path, format="TIFF")
    assert Image.open(path).mode == "I"
    rgb, reason = read_image(path)
    assert reason == ""
    np.testing.assert_array_equal(rgb[::10, ::10, 0], [[0, 255, 255], [255, 100, 0]])


def test_decompression_bomb_is_refused_by_name_and_never_decoded(tmp_path: Path, monkeypatch) -> None:
    """Above MAX_PIXELS (patched low) a photo is a bad image named with its size, whether our
    header check or Pillow's own limit catches it; OpenCV must not decode it instead."""
    path = tmp_path / "bomb.png"
    _pil(two_band()).save(path, format="PNG")
    decoded = []
    monkeypatch.setattr(images.cv2, "imdecode", lambda *a: decoded.append(a) or cv2.imdecode(*a))
    monkeypatch.setattr(images, "MAX_PIXELS", 30 * 20 - 1)
    rgb, reason = read_image(path)
    assert rgb is None and reason.startswith("image too large") and "bomb.png" in reason and "30 x 20" in reason
    monkeypatch.setattr(images, "MAX_PIXELS", 10**9)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow raises DecompressionBombError (> 2x)
    rgb, reason = read_image(path)
    assert rgb is None and reason.startswith("image too large") and "bomb.png" in reason and "600" in reason
    assert decoded == []


def test_opencv_fallback_applies_exif_orientation(tmp_path: Path, monkeypatch) -> None:
    """A file only OpenCV decodes (Pillow patched to refuse it) is still shown upright."""
    path = tmp_path / "exif6.jpg"
    _exif_rotated(path)

    def refuse(data: bytes) -> np.ndarray:
        raise UnidentifiedImageError("patched")

    monkeypatch.setattr(images, "_pil_decode", refuse)
    rgb, reason = read_image(path)
    assert reason == "" and rgb.shape == (20, 30, 3)
    np.testing.assert_allclose(rgb[0, 0], RED, atol=6)
    np.testing.assert_allclose(rgb[-1, -1], BLUE, atol=6)


# --- stage 00 and stage 01 on a folder holding every case ------------------------------------

@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, huge: Path) -> tuple[Path, dict]:
    """Stage 00 (decode check on) and stage 01 (whole-frame crops) on a data folder with every
    kind of image, plus a listed file missing from disk and an extra file not listed."""
    tmp = tmp_path_factory.mktemp("faults_images")
    data = tmp / "data"
    names = list(WRITERS)
    write_images(data / "train_images", names)
    (data / "train_images" / "huge.jpg").symlink_to(huge)
    WRITERS["png_named.jpg"](data / "train_images" / "not listed.jpg")
    write_images(data / "test_images", ["鯨 ザトウ 2.png", "exif6.jpg"])
    listed = [*names, "huge.jpg", "missing from disk.jpg"]
    pd.DataFrame({"image": listed, "species": "beluga",
                  "individual_id": [f"ind{i // 2}" for i in range(len(listed))]}).to_csv(data / "train.csv", index=False)
    pd.DataFrame({"image": ["鯨 ザトウ 2.png", "exif6.jpg", "gone.jpg"]}).to_csv(
        data / "sample_submission.csv", index=False)
    raw = load_config().to_dict()
    raw["paths"].update(data=str(data), demo=str(tmp / "demo"), outputs=str(tmp / "out"))
    raw["prepare"].update(n_folds=2, workers=1, check_decode=True)
    raw["crop"].update(workers=0, image_size=32, box_source={"fullbody": "full"})
    cfg = config_from_dict(raw)
    catalogue.run(cfg)
    detect.run(cfg)
    return tmp / "out", {"cfg": cfg, "listed": listed}


def test_stage_00_excludes_bad_files_by_name_and_reason(prepared: tuple[Path, dict]) -> None:
    out, _ = prepared
    report = read_json(out / "00_prepare" / "report.json")
    excluded = {(e["split"], e["image"]): e["reason"] for e in report["excluded"]}
    expected = {("train", n) for n in BAD} | {("train", "missing from disk.jpg"), ("test", "gone.jpg")}
    assert set(excluded) == expected
    for name, reason in BAD.items():
        assert excluded[("train", name)].startswith(reason)
    assert "file not found" in excluded[("train", "missing from disk.jpg")]
    assert report["test_missing"] == ["gone.jpg"]
    assert report["extra_files"]["train"] == {"count": 1, "examples": ["not listed.jpg"]}
    assert report["counts"]["train"] == {"listed": len(WRITERS) + 2, "usable": len(GOOD) + 1, "excluded": 4}


def test_stage_00_catalogue_sizes_are_upright_and_names_kept(prepared: tuple[Path, dict]) -> None:
    out, _ = prepared
    cat = pd.read_csv(out / "00_prepare" / "catalogue.csv", keep_default_na=False)
    train = cat[cat["split"] == "train"].set_index("image")
    assert set(train.index) == set(GOOD) | {"huge.jpg"}  # non-ASCII and spaces survive the CSV round trip
    for name, ((width, height), _, _) in GOOD.items():
        assert (train.at[name, "width"], train.at[name, "height"]) == (width, height), name
    assert (train.at["huge.jpg", "width"], train.at["huge.jpg", "height"]) == (12000, 9000)
    assert sorted(cat.loc[cat["split"] == "test", "image"]) == ["exif6.jpg", "鯨 ザトウ 2.png"]
    assert all(Path(p).is_file() for p in cat["path"])


def test_stage_01_crops_every_usable_image_upright(prepared: tuple[Path, dict]) -> None:
    out, state = prepared
    crops = detect.load_crops(state["cfg"])
    report = read_json(out / "01_crops" / "report.json")
    assert report["undecodable"] == []
    assert len(crops) == len(GOOD) + 1 + 2  # train usable + huge + 2 test
    for row in crops.itertuples():
        crop, reason = read_image(row.crop_path)
        assert reason == "" and crop.shape == (32, 32, 3), row.image
    exif = crops[(crops["image"] == "exif6.jpg") & (crops["split"] == "train")].iloc[0]
    assert (exif["x_max"], exif["y_max"]) == (30, 20)  # box in upright pixels
    crop, _ = read_image(exif["crop_path"])
    # keep_aspect pads the 30 x 20 frame to a square: sample the middle column's rows 10 and 21.
    np.testing.assert_allclose(crop[10, 16], RED, atol=25)
    np.testing.assert_allclose(crop[21, 16], BLUE, atol=25)
    names = {Path(p).name for p in crops["crop_path"]}
    assert {"baleine grise é 1.jpg", "鯨 ザトウ 2.jpg"} <= names
