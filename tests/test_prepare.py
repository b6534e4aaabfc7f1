"""Prepared data sets (``transflow prepare``) and training from data not held in memory: the
prepared set equals the in-memory path, conversions are explicit, interruption leaves nothing
that looks complete and a rerun finishes with the same files, map-style datasets train, and
Hugging Face datasets are read by split and label column."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transflow import TarFlowConfig
from transflow.cli import main
from transflow.data import from_datasets, load_data
from transflow.data import prepared_set as P
from transflow.data.arrays import NpyImages
from transflow.data.huggingface import HFOptions
from transflow.data.prepare import PrepareOptions, prepare
from transflow.training import TrainConfig, train
from transflow.training.batches import Prefetcher

FAST = dict(batch_size=16, log_every=5, eval_every=100, eval_images=32, sample_every=100,
            checkpoint_every=100)


def tiny(channels: int = 1, size: int = 8, classes: int = 2) -> TarFlowConfig:
    return TarFlowConfig(image_size=size, channels=channels, patch_size=2, width=16,
                         head_dim=8, blocks=2, layers=1, num_classes=classes)


def write_folder(root: Path, per_class: int = 12, seed: int = 0) -> None:
    """Two class folders of RGB JPEGs and PNGs of mixed sizes (not square)."""
    rng = np.random.default_rng(seed)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            a = rng.integers(0, 256, (10 + i % 3, 12, 3), dtype=np.uint8)
            Image.fromarray(a).save(root / c / f"{i:03d}.{'jpg' if i % 2 else 'png'}")


def same_weights(a: Path, b: Path) -> bool:
    ca = torch.load(a / "checkpoint.pt", weights_only=True)
    cb = torch.load(b / "checkpoint.pt", weights_only=True)
    return ca["step"] == cb["step"] and all(
        torch.equal(ca[p][k], cb[p][k]) for p in ("model", "ema") for k in ca[p])


# ---------------------------------------------------------------------------------------------
# the prepared set equals the in-memory path
# ---------------------------------------------------------------------------------------------
def test_prepared_folder_equals_the_folder_in_memory(tmp_path):
    write_folder(tmp_path / "src")
    out = tmp_path / "out"
    m = prepare(str(tmp_path / "src"), out, PrepareOptions(image_size=8, workers=2),
                progress=False)
    mem = load_data(str(tmp_path / "src"), image_size=8)
    disk = load_data(str(out))
    assert isinstance(disk.x_train, NpyImages) and not disk.in_memory
    for split in ("train", "test"):
        xm, ym = mem.split(split)
        xd, yd = disk.split(split)
        assert torch.equal(xd[:], xm) and torch.equal(yd, ym)  # images, labels, order
    assert m["classes"] == ["cat", "dog"] and m["num_classes"] == 2
    assert m["splits"]["train"]["images"] == len(mem.x_train)
    assert m["sha256"] == P.checksum(out)
    P.verify(out)
    # plain .npy files: numpy maps them
    assert np.array_equal(np.load(out / "train_images.npy", mmap_mode="r"), mem.x_train.numpy())


def test_training_on_a_prepared_set_is_bit_identical_to_memory_and_resumes(tmp_path):
    rng = np.random.default_rng(1)
    npz = tmp_path / "d.npz"
    np.savez(npz, x_train=rng.integers(0, 256, (90, 8, 8, 1), dtype=np.uint8),
             y_train=rng.integers(0, 2, 90), x_test=rng.integers(0, 256, (20, 8, 8, 1),
                                                                   dtype=np.uint8),
             y_test=rng.integers(0, 2, 20))
    prepare(str(npz), tmp_path / "prep", progress=False)
    cfg, tc = tiny(), TrainConfig(steps=8, **FAST)
    train(cfg, load_data(str(npz)), tc, tmp_path / "mem", progress=False)
    train(cfg, load_data(str(tmp_path / "prep")), tc, tmp_path / "disk", progress=False)
    assert same_weights(tmp_path / "mem", tmp_path / "disk")
    # stopped at step 4 and resumed: the same run
    train(cfg, load_data(str(tmp_path / "prep")), TrainConfig(steps=4, **FAST),
          tmp_path / "half", progress=False)
    train(cfg, load_data(str(tmp_path / "prep")), tc, tmp_path / "half", resume=True,
          progress=False)
    a = torch.load(tmp_path / "mem" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "half" / "checkpoint.pt", weights_only=True)
    assert b["step"] == 8
    # the schedule of a 4-step run differs after step 4, so compare with a run cut the same way
    train(cfg, load_data(str(npz)), TrainConfig(steps=4, **FAST), tmp_path / "mh",
          progress=False)
    train(cfg, load_data(str(npz)), tc, tmp_path / "mh", resume=True, progress=False)
    assert same_weights(tmp_path / "mh", tmp_path / "half")
    assert not torch.equal(a["model"]["blocks.0.proj_in.weight"],
                           torch.zeros_like(a["model"]["blocks.0.proj_in.weight"]))


def test_prefetching_thread_gives_the_batches_of_the_main_thread(tmp_path):
    data = load_data("digits")
    cfg = dataclasses.replace(tiny(classes=10, size=8), num_levels=17)
    train(cfg, data, TrainConfig(steps=6, prefetch=3, **FAST), tmp_path / "a", progress=False)
    train(cfg, data, TrainConfig(steps=6, prefetch=0, **FAST), tmp_path / "b", progress=False)
    assert same_weights(tmp_path / "a", tmp_path / "b")


def test_prefetching_thread_runs_on_one_thread_and_keeps_the_callers_count():
    # a second OpenMP team in the batch thread would compete with the model's step for the
    # cores; the count the caller sees (torch keeps it process-wide) must stay its own
    def make(step: int) -> tuple[int, int]:
        torch.ones(1 << 17).sum()  # a parallel operator, as dequantizing a batch is
        return step, torch.get_num_threads()

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pf = Prefetcher(make, 0, depth=2)
        try:
            assert [pf.get(s) for s in range(4)] == [(0, 1), (1, 1), (2, 1), (3, 1)]
            assert torch.get_num_threads() == 2
            assert pf.get(7) == (7, 1)  # a restarted thread too
            assert torch.get_num_threads() == 2
        finally:
            pf.close()
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# conversions and unreadable files
# ---------------------------------------------------------------------------------------------
def test_prepare_converts_grey_rgba_palette_and_skips_a_corrupt_file(tmp_path):
    src = tmp_path / "src"
    write_folder(src, per_class=6)
    Image.fromarray(np.full((8, 8), 77, np.uint8)).save(src / "cat" / "grey.jpg", quality=100)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200  # red where opaque
    rgba[:, :4, 3] = 255  # left half opaque, right half transparent
    Image.fromarray(rgba, "RGBA").save(src / "cat" / "rgba.png")
    pal = Image.fromarray(np.full((8, 8, 3), (10, 120, 230), np.uint8)).convert(
        "P", palette=Image.Palette.ADAPTIVE, colors=4)
    pal.save(src / "dog" / "palette.png")
    (src / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (src / "dog" / "notes.txt").write_text("not an image")

    out = tmp_path / "out"
    assert main(["prepare", str(src), str(out), "--image-size", "8", "--workers", "1",
                 "--no-progress"]) == 0
    m = json.loads((out / P.MANIFEST).read_text())
    assert m["skipped"] == {"unreadable": 1, "not_images": 1}
    assert m["converted"] == {"alpha": 1, "grey->rgb": 1, "palette": 1}
    assert m["channels"] == 3 and m["image_size"] == 8

    d = load_data(str(out))
    mem = load_data(str(src), image_size=8)
    x = torch.cat([mem.x_train, mem.x_test])
    assert torch.equal(torch.cat([d.x_train[:], d.x_test[:]]), x)
    # find the converted images by content: transparent pixels are composited onto white
    flat = x.reshape(len(x), 3, -1)
    rgba_rows = [i for i in range(len(x)) if torch.equal(x[i, :, :, :4].unique(), torch.tensor(
        [0, 200], dtype=torch.uint8)) and bool((x[i, :, :, 4:] == 255).all())]
    assert len(rgba_rows) == 1
    assert x[rgba_rows[0], :, :, :4].reshape(3, -1)[:, 0].tolist() == [200, 0, 0]
    grey_rows = [i for i in range(len(x)) if bool((flat[i, 0] == flat[i, 1]).all())
                 and bool((flat[i, 1] == flat[i, 2]).all()) and int(flat[i].float().std()) < 3]
    assert len(grey_rows) == 1 and abs(int(flat[grey_rows[0]].float().mean()) - 77) <= 1
    pal_rows = [i for i in range(len(x)) if bool((flat[i].float().std(1) < 1).all())
                and abs(int(flat[i, 2, 0]) - 230) <= 8 and abs(int(flat[i, 0, 0]) - 10) <= 8]
    assert len(pal_rows) == 1

    # --strict stops at the corrupt file, with one line and exit 2
    assert main(["prepare", str(src), str(tmp_path / "strict"), "--image-size", "8",
                 "--strict", "--no-progress"]) == 2


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        Image.fromarray(np.full((6, 6), 257 * (40 + i), np.uint16)).save(src / f"{i}.png")
    prepare(str(src), tmp_path / "out", PrepareOptions(), progress=False)
    d = load_data(str(tmp_path / "out"))
    values = sorted(torch.cat([d.x_train[:], d.x_test[:]]).unique().tolist())
    assert values == [40, 41, 42, 43]
    assert json.loads((tmp_path / "out" / P.MANIFEST).read_text())["converted"] == {"16-bit": 4}


# ---------------------------------------------------------------------------------------------
# interruption: nothing looks complete; a rerun finishes with the same files
# ---------------------------------------------------------------------------------------------
FAULT = textwrap.dedent("""
    import os, signal, sys
    import transflow.data.prepare as prep
    import transflow.data.prepared_set as P
    prep.CHUNK = 16
    calls = {"n": 0}
    real = P.SplitWriter.append
    def append(self, images, labels):
        real(self, images, labels)
        calls["n"] += 1
        if calls["n"] == int(sys.argv[3]):
            self.files[0].flush()
            if sys.argv[4] == "kill":  # rows on disk beyond what the state file records
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(28, "No space left on device")
    P.SplitWriter.append = append
    from transflow.cli import main
    sys.exit(main(["prepare", sys.argv[1], sys.argv[2], "--image-size", "8", "--workers", "2",
                   "--no-progress"]))
""")


@pytest.mark.parametrize("fault", ["kill", "disk-full"])
def test_interrupted_prepare_leaves_nothing_complete_and_a_rerun_finishes(tmp_path, fault):
    src = tmp_path / "src"
    write_folder(src, per_class=40)
    whole = tmp_path / "whole"
    prepare(str(src), whole, PrepareOptions(image_size=8), progress=False)

    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", FAULT, str(src), str(out), "3", fault],
                       capture_output=True, text=True, timeout=300)
    if fault == "kill":
        assert r.returncode == -9
    else:
        assert r.returncode == 2 and "No space left on device" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (out / P.MANIFEST).exists() and (out / P.STATE).exists()
    assert not (out / "train_images.npy").exists()  # only *.partial files
    with pytest.raises(ValueError, match="unfinished prepared data set"):
        load_data(str(out))
    # a rerun with other options refuses; with the same ones it finishes
    assert main(["prepare", str(src), str(out), "--image-size", "6", "--no-progress"]) == 2
    assert main(["prepare", str(src), str(out), "--image-size", "8", "--no-progress"]) == 0
    assert (out / P.MANIFEST).read_text() == (whole / P.MANIFEST).read_text()
    for f in ("train_images.npy", "train_labels.npy", "test_images.npy", "test_labels.npy"):
        assert (out / f).read_bytes() == (whole / f).read_bytes(), f
    assert not (out / P.STATE).exists()


def test_existing_output_is_refused_unless_overwrite(tmp_path, capsys):
    src = tmp_path / "src"
    write_folder(src, per_class=5)
    out = tmp_path / "out"
    assert main(["prepare", str(src), str(out), "--no-progress"]) == 0
    assert main(["prepare", str(src), str(out), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["prepare", str(src), str(out), "--image-size", "4", "--overwrite",
                 "--no-progress"]) == 0
    assert load_data(str(out)).image_size == 4
    other = tmp_path / "other"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    assert main(["prepare", str(src), str(other), "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err
    # a damaged array is caught by the checksum
    with open(out / "train_images.npy", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        b = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(ValueError, match="changed or damaged"):
        P.verify(out)


# ---------------------------------------------------------------------------------------------
# map-style datasets
# ---------------------------------------------------------------------------------------------
class ArrayDataset(torch.utils.data.Dataset):
    """Items ``(uint8 [H, W, C] array, label)``, no ``targets`` attribute."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def test_train_accepts_a_map_style_dataset_and_equals_the_tensor_path(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (100, 8, 8, 1), dtype=np.uint8)
    y = rng.integers(0, 2, 100)
    cfg, tc = tiny(), TrainConfig(steps=5, **FAST)
    train(cfg, ArrayDataset(x, y), tc, tmp_path / "ds", progress=False)
    held = np.arange(0, 100, 10)
    keep = np.setdiff1d(np.arange(100), held)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    from transflow.data import ImageData

    mem = ImageData("t", t(x[keep]), torch.from_numpy(y[keep]), t(x[held]),
                    torch.from_numpy(y[held]), num_classes=2)
    train(cfg, mem, tc, tmp_path / "mem", progress=False)
    assert same_weights(tmp_path / "ds", tmp_path / "mem")
    # [C, H, W] items and an explicit test set
    chw = from_datasets(ArrayDataset(x.transpose(0, 3, 1, 2), y),
                        ArrayDataset(x[:7].transpose(0, 3, 1, 2), y[:7]))
    assert chw.x_train.shape == (100, 1, 8, 8) and len(chw.x_test) == 7
    assert torch.equal(chw.x_train[[3, 1]], t(x[[3, 1]]))
    with pytest.raises(ValueError, match="square"):
        from_datasets(ArrayDataset(np.zeros((4, 8, 5), np.uint8), np.zeros(4)))


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets (a local save_to_disk copy: no network)
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def hf_dir(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the hf extra (datasets) is not installed")
    rng = np.random.default_rng(3)

    def split(n: int):
        ims = [Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)) for _ in
               range(n)]
        features = datasets.Features({"img": datasets.Image(),
                                      "fine_label": datasets.ClassLabel(names=["a", "b", "c"]),
                                      "coarse_label": datasets.Value("int64")})
        return datasets.Dataset.from_dict({"img": ims, "fine_label": [i % 3 for i in range(n)],
                                           "coarse_label": [0] * n}, features=features)

    path = tmp_path / "hf"
    datasets.DatasetDict(train=split(30), validation=split(9)).save_to_disk(str(path))
    return path


def test_hf_validation_split_and_label_column(hf_dir, tmp_path):
    opts = HFOptions(label_column="fine_label")
    d = load_data(f"hf:{hf_dir}", image_size=8, hf=opts)  # "validation" is the test split
    assert (len(d.x_train), len(d.x_test), d.num_classes, d.classes) == (30, 9, 3,
                                                                         ["a", "b", "c"])
    assert d.y_test.tolist() == [i % 3 for i in range(9)]
    none = load_data(f"hf:{hf_dir}", image_size=8, hf=HFOptions(label_column="none"))
    assert none.y_train is None and none.num_classes == 0
    with pytest.raises(ValueError, match="no label column 'label_x'"):
        load_data(f"hf:{hf_dir}", hf=HFOptions(label_column="label_x"))
    with pytest.raises(ValueError, match="no 'test' split.*--test-split"):
        load_data(f"hf:{hf_dir}", hf=HFOptions(test_split="test"))
    # prepared through worker processes: the same images as the in-memory load
    out = tmp_path / "prep"
    assert main(["prepare", f"hf:{hf_dir}", str(out), "--image-size", "8", "--label-column",
                 "fine_label", "--workers", "2", "--no-progress"]) == 0
    p = load_data(str(out))
    assert torch.equal(p.x_train[:], d.x_train) and torch.equal(p.y_test, d.y_test)
    assert p.classes == ["a", "b", "c"]


def test_missing_datasets_package_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert main(["train", "--data", "hf:someone/something", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'transflow[hf]'" in err and len(err.strip().splitlines()) == 1


def test_hf_streamed_prepare_equals_the_downloaded_one(hf_dir, tmp_path):
    args = ["--image-size", "8", "--label-column", "fine_label", "--workers", "1",
            "--no-progress"]
    assert main(["prepare", f"hf:{hf_dir}", str(tmp_path / "a"), *args]) == 0
    assert main(["prepare", f"hf:{hf_dir}", str(tmp_path / "b"), "--stream", *args]) == 0
    ma = json.loads((tmp_path / "a" / P.MANIFEST).read_text())
    mb = json.loads((tmp_path / "b" / P.MANIFEST).read_text())
    assert ma["sha256"] == mb["sha256"] and ma["splits"] == mb["splits"]
    # a label column without class names: the classes are the labels seen
    c = load_data(f"hf:{hf_dir}", hf=HFOptions(label_column="coarse_label"), image_size=8)
    assert c.num_classes == 1
    assert main(["prepare", f"hf:{hf_dir}", str(tmp_path / "c"), "--label-column",
                 "coarse_label", "--no-progress"]) == 0
    assert json.loads((tmp_path / "c" / P.MANIFEST).read_text())["num_classes"] == 1
