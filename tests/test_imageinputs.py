"""The one reader of image inputs (:mod:`transflow.data.image_inputs`) on every format, against
hand-made arrays, and its one-line errors for bad inputs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transflow.data import image_inputs as R


def _images(n: int, shape: tuple[int, ...] = (8, 8, 1), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def _save_pngs(root: Path, images: np.ndarray) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).save(root / f"{i:06d}.png")


# ----------------------------------------------------------------------------- npz conventions


def test_npz_dataset_with_and_without_labels(tmp_path: Path) -> None:
    x_tr, x_te = _images(5, seed=1), _images(3, seed=2)
    np.savez(tmp_path / "l.npz", x_train=x_tr, y_train=np.array([0, 1, 2, 1, 0], np.uint8),
             x_test=x_te, y_test=np.array([2.0, 0.0, 1.0]))
    d = R.read_npz_dataset(tmp_path / "l.npz")
    assert np.array_equal(d.x_train, x_tr) and np.array_equal(d.x_test, x_te)
    assert d.y_train.dtype == np.int64 and d.y_train.tolist() == [0, 1, 2, 1, 0]
    assert d.y_test.tolist() == [2, 0, 1] and d.num_classes == 3
    np.savez(tmp_path / "u.npz", x_train=x_tr[..., 0], x_test=x_te[..., 0])  # [N, H, W]
    u = R.read_npz_dataset(tmp_path / "u.npz")
    assert u.x_train.shape == (5, 8, 8, 1) and np.array_equal(u.x_train, x_tr)
    assert u.y_train is None and u.y_test is None and u.num_classes == 0


def test_npz_split_and_first_key_of_each_convention(tmp_path: Path) -> None:
    x_tr, x_te = _images(4, (6, 6, 3), 1), _images(2, (6, 6, 3), 2)
    np.savez(tmp_path / "d.npz", x_train=x_tr, x_test=x_te)
    assert np.array_equal(R.read_npz_split(tmp_path / "d.npz", "train"), x_tr)
    assert np.array_equal(R.read_npz_split(tmp_path / "d.npz", "test"), x_te)
    for key in R.SAMPLE_KEYS:
        np.savez(tmp_path / f"{key}.npz", **{key: x_tr}, other=x_te)
        assert np.array_equal(R.read_samples(tmp_path / f"{key}.npz"), x_tr)
    for key in R.SCORE_KEYS:
        got_key, got = R.read_npz_images(tmp_path / f"{key}.npz", R.SCORE_KEYS)
        assert got_key == key and np.array_equal(got, x_tr)
    # the first key of the convention wins
    np.savez(tmp_path / "both.npz", images=x_te, arr_0=x_tr)
    assert np.array_equal(R.read_samples(tmp_path / "both.npz"), x_tr)
    assert R.read_npz_images(tmp_path / "both.npz", R.SCORE_KEYS)[0] == "images"


def test_sample_set_npz_in_either_layout(tmp_path: Path) -> None:
    pixels = _images(3, (5, 5, 3))
    # the layout transflow sample writes: arr_0 pixels, images levels, labels, num_levels
    np.savez(tmp_path / "s.npz", arr_0=pixels, images=pixels // 16,
             labels=np.array([-1, -1, -1]), num_levels=np.int64(16))
    assert np.array_equal(R.read_samples(tmp_path / "s.npz"), pixels)
    np.savez(tmp_path / "chw.npz", samples=pixels.transpose(0, 3, 1, 2))
    assert np.array_equal(R.read_samples(tmp_path / "chw.npz"), pixels)
    np.savez(tmp_path / "grey.npz", x=pixels[..., 0])
    assert np.array_equal(R.read_samples(tmp_path / "grey.npz"), pixels[..., :1])


# ----------------------------------------------------------------------------- image files


def test_png_folder_and_single_files(tmp_path: Path) -> None:
    rgb, grey = _images(4, (7, 7, 3), 1), _images(3, (7, 7, 1), 2)
    _save_pngs(tmp_path / "rgb", rgb)
    _save_pngs(tmp_path / "grey", grey)
    (tmp_path / "rgb" / "notes.txt").write_text("not an image")  # no image suffix: ignored
    assert np.array_equal(R.read_image_folder(tmp_path / "rgb"), rgb)
    assert np.array_equal(R.read_samples(tmp_path / "grey"), grey)
    one = R.read_image(tmp_path / "rgb" / "000002.png")
    assert one.dtype == np.uint8 and np.array_equal(one, rgb[2])
    assert np.array_equal(R.read_image(tmp_path / "rgb" / "000002.png", channels=1),
                          np.asarray(Image.fromarray(rgb[2]).convert("L"))[..., None])
    assert R.read_image(tmp_path / "grey" / "000000.png", size=4, channels=3).shape == (4, 4, 3)


def test_image_folder_dataset_with_classes(tmp_path: Path) -> None:
    a, b = _images(10, (6, 6, 3), 1), _images(10, (6, 6, 3), 2)
    _save_pngs(tmp_path / "a", a)
    _save_pngs(tmp_path / "b", b)
    d = R.read_folder_dataset(tmp_path, None, None, strict=False)
    # every 10th file (sorted, over both classes) is held out for test
    assert np.array_equal(d.x_test, np.stack([a[0], b[0]]))
    assert np.array_equal(d.x_train, np.concatenate([a[1:], b[1:]]))
    assert d.y_train.tolist() == [0] * 9 + [1] * 9 and d.y_test.tolist() == [0, 1]
    assert d.classes == ["a", "b"] and d.num_classes == 2 and d.skipped == 0 and not d.notes
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    d = R.read_folder_dataset(tmp_path, None, None, strict=False)
    assert d.skipped == 1 and "1 unreadable" in d.notes[-1]
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        R.read_folder_dataset(tmp_path, None, None, strict=True)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("arrays,needle", [
    (dict(images=_images(2)), "lacks array(s) x_train, x_test"),
    (dict(x_train=_images(2).astype(np.float32), x_test=_images(1)),
     "x_train must be uint8 [N, H, W, C], got float32 [2, 8, 8, 1]"),
    (dict(x_train=_images(2), x_test=np.zeros((3, 8), np.uint8)),
     "x_test must be uint8 [N, H, W, C], got uint8 [3, 8]"),
    (dict(x_train=_images(2), y_train=[0, 1], x_test=_images(1)), "has y_train but no y_test"),
    (dict(x_train=_images(2), y_train=[0, -1], x_test=_images(1), y_test=[0]),
     "labels must be >= 0, found -1"),
    (dict(x_train=_images(2), y_train=[0, 5], x_test=_images(1), y_test=[0]),
     "take 2 distinct values but go up to 5"),
    (dict(x_train=_images(2), y_train=[0.5, 1.0], x_test=_images(1), y_test=[0.0]),
     "non-integer labels"),
    (dict(x_train=_images(2), y_train=np.array(["a", "b"]), x_test=_images(1), y_test=["a"]),
     "must hold integer labels"),
])
def test_bad_npz_dataset_is_one_line(tmp_path: Path, arrays: dict, needle: str) -> None:
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(ValueError, match=re.escape(needle)) as e:
        R.read_npz_dataset(tmp_path / "d.npz")
    assert "\n" not in str(e.value) and str(tmp_path / "d.npz") in str(e.value)


def test_bad_npz_images_and_files(tmp_path: Path) -> None:
    (tmp_path / "garbage.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read .*garbage.npz"):
        R.read_samples(tmp_path / "garbage.npz")
    np.savez(tmp_path / "other.npz", mu=np.zeros(3))
    with pytest.raises(ValueError, match="has none of the arrays arr_0, samples, images, x, "
                                         "x_test"):
        R.read_samples(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="has none of the arrays x_valid"):
        R.read_npz_split(tmp_path / "other.npz", "valid")
    np.savez(tmp_path / "rgba.npz", arr_0=_images(2, (8, 8, 4)))
    with pytest.raises(ValueError, match="with 1 or 3 channels"):
        R.read_samples(tmp_path / "rgba.npz")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*bad.png"):
        R.read_image(tmp_path / "bad.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no image files"):
        R.read_image_folder(tmp_path / "empty")
    _save_pngs(tmp_path / "mixed", _images(1, (8, 8, 1)))
    Image.fromarray(_images(1, (6, 6, 3))[0]).save(tmp_path / "mixed" / "z.png")
    with pytest.raises(ValueError, match=r"the images differ in shape \(\[\(1, 8, 8\), "
                                         r"\(3, 6, 6\)\]\)"):
        R.read_image_folder(tmp_path / "mixed")
    with pytest.raises(ValueError, match="contains no files"):
        R.read_folder_dataset(tmp_path / "empty", None, None, strict=False)
