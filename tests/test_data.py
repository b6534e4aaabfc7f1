"""Data sources: image folders (PNG/JPEG, with and without class folders), .npz, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from transflow.data import load_data


def write_images(folder, n, fmt="PNG", size=(12, 10), mode="RGB", seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        a = rng.integers(0, 256, shape, dtype=np.uint8)
        Image.fromarray(a, mode).save(folder / f"img{i:03d}.{fmt.lower()}", format=fmt)


def test_folder_with_class_subfolders_png_and_jpeg(tmp_path):
    write_images(tmp_path / "cats", 10, "PNG")
    write_images(tmp_path / "dogs", 10, "JPEG", seed=1)
    d = load_data(str(tmp_path), image_size=8)
    assert d.num_classes == 2 and d.channels == 3 and d.image_size == 8
    assert len(d.x_train) + len(d.x_test) == 20 and len(d.x_test) == 2  # every 10th held out
    assert set(d.y_train.tolist()) == {0, 1}


def test_flat_folder_is_unlabelled_and_grey_stays_grey(tmp_path):
    write_images(tmp_path, 12, "PNG", size=(9, 9), mode="L")
    d = load_data(str(tmp_path))
    assert d.num_classes == 0 and d.y_train is None and d.channels == 1 and d.image_size == 9


def test_centre_crop_then_resize(tmp_path):
    a = np.zeros((10, 30, 3), dtype=np.uint8)
    a[:, 10:20] = 255  # the centre square is white, the sides black
    for i in range(10):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    d = load_data(str(tmp_path), image_size=5)
    assert d.x_train.shape[1:] == (3, 5, 5) and int(d.x_train.min()) == 255


def test_train_test_subfolders_are_the_splits(tmp_path):
    write_images(tmp_path / "train" / "a", 5)
    write_images(tmp_path / "train" / "b", 5)
    write_images(tmp_path / "test" / "a", 2)
    write_images(tmp_path / "test" / "b", 2)
    d = load_data(str(tmp_path), image_size=8)
    assert (len(d.x_train), len(d.x_test), d.num_classes) == (10, 4, 2)


def test_corrupt_files_are_skipped_and_counted_or_fatal_when_strict(tmp_path):
    write_images(tmp_path, 20)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n-truncated")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="skipped 2"):
        d = load_data(str(tmp_path), image_size=8)
    assert d.skipped == 2 and len(d.x_train) + len(d.x_test) == 20
    with pytest.raises(ValueError, match="cannot read image .*(broken.png|notes.txt)"):
        load_data(str(tmp_path), image_size=8, strict=True)


@pytest.mark.parametrize("setup,needle", [
    (lambda p: p.mkdir(), "contains no files"),
    (lambda p: np.savez(p, x_train=np.zeros((0, 8, 8, 1), np.uint8),
                        x_test=np.zeros((3, 8, 8, 1), np.uint8)), "empty train split"),
    (lambda p: np.savez(p, x_train=np.zeros((3, 8, 8, 1), np.float32),
                        x_test=np.zeros((3, 8, 8, 1), np.uint8)), "must be uint8"),
    (lambda p: np.savez(p, images=np.zeros((3, 8, 8, 1), np.uint8)), "lacks array(s) x_train"),
    (lambda p: np.savez(p, x_train=np.zeros((3, 8, 8, 1), np.uint8), y_train=[0, 1, -3],
                        x_test=np.zeros((3, 8, 8, 1), np.uint8), y_test=[0, 0, 0]),
     "labels must be >= 0, found -3"),
    (lambda p: p.write_bytes(b"garbage"), "cannot read"),
])
def test_bad_data_gives_one_clear_error(tmp_path, setup, needle):
    path = tmp_path / ("d" if "no files" in needle else "d.npz")
    setup(path)
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_data(str(path))


def test_npz_size_mismatch_is_explained(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x_train=np.zeros((3, 8, 8, 1), np.uint8), x_test=np.zeros((3, 8, 8, 1), np.uint8))
    with pytest.raises(ValueError, match="has 8x8 images, not 16x16"):
        load_data(str(p), image_size=16)
