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


def test_resize_then_centre_crop_or_box(tmp_path):
    a = np.zeros((10, 30, 3), dtype=np.uint8)
    a[:, 7:23] = 255  # the centre (with a margin for the filter) is white, the sides black
    for i in range(10):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    d = load_data(str(tmp_path), image_size=5)  # shorter side to 5, then the centre 5x5
    assert d.x_train.shape[1:] == (3, 5, 5) and int(d.x_train.min()) == 255
    # box: the whole 30x10 image squeezed to 5x5 (aspect not kept): black sides remain
    b = load_data(str(tmp_path), image_size=5, resize="box")
    assert b.x_train[0, 0, :, 0].tolist() == [0] * 5 and b.x_train[0, 0, :, 2].tolist() == [255] * 5


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


def _mode_image(mode: str, value: int, size: int = 8) -> Image.Image:
    grey = Image.fromarray(np.full((size, size), value, np.uint8), "L")
    return grey.convert(mode)


def test_mixed_modes_are_converted_to_the_majority_and_nothing_readable_is_lost(tmp_path):
    # class a: 10 grey, class b: 10 RGB, class c: 10 RGBA (colour is the majority: 20 of 30)
    for cls, mode in (("a", "L"), ("b", "RGB"), ("c", "RGBA")):
        (tmp_path / cls).mkdir()
        for i in range(10):
            _mode_image(mode, 20 * i).save(tmp_path / cls / f"{i}.png")
    with pytest.warns(UserWarning, match=r"converted 10 image\(s\) to RGB \(the majority"):
        d = load_data(str(tmp_path))
    assert d.channels == 3 and d.skipped == 0 and d.num_classes == 3
    assert len(d.x_train) + len(d.x_test) == 30
    assert set(d.y_train.tolist()) == {0, 1, 2}
    grey = load_data(str(tmp_path), channels=1)  # chosen explicitly: every image converted
    assert grey.channels == 1 and len(grey.x_train) + len(grey.x_test) == 30
    # a grey value survives either conversion
    assert int(d.x_train[0].float().std(0).max()) == 0


def test_mixed_sizes_are_resized_to_the_most_common_and_stated(tmp_path):
    for i in range(6):
        _mode_image("L", 10 * i, size=8 if i < 4 else 12).save(tmp_path / f"{i}.png")
    with pytest.warns(UserWarning, match=r"resized 2 image\(s\) to 8x8"):
        d = load_data(str(tmp_path))
    assert d.image_size == 8 and len(d.x_train) + len(d.x_test) == 6 and d.skipped == 0


@pytest.mark.parametrize("arrays,needle", [
    (dict(y_train=[0, 1, 99], y_test=[0]), "take 3 distinct values but go up to 99"),
    (dict(y_train=[0, 1, 0]), "has y_train but no y_test"),
    (dict(y_test=[0]), "has y_test but no y_train"),
    (dict(y_train=[0.0, np.nan, 1.0], y_test=[0.0]), "non-integer labels"),
    (dict(y_train=[0.0, 1.5, 1.0], y_test=[0.0]), "non-integer labels"),
])
def test_label_problems_say_what_was_found(tmp_path, arrays, needle):
    p = tmp_path / "d.npz"
    np.savez(p, x_train=np.zeros((3, 8, 8, 1), np.uint8), x_test=np.zeros((1, 8, 8, 1), np.uint8),
             **arrays)
    with pytest.raises(ValueError, match=needle):
        load_data(str(p))


def test_empty_test_split_with_labels_names_the_split(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x_train=np.zeros((3, 8, 8, 1), np.uint8), y_train=[0, 1, 0],
             x_test=np.zeros((0, 8, 8, 1), np.uint8), y_test=np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="empty test split"):
        load_data(str(p))
