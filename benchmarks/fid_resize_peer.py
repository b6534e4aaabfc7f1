"""Peer check of the FID resize: transflow's TF1-style bilinear resize against torch-fidelity's
``interpolate_bilinear_2d_like_tensorflow1x`` (both its ``slow`` manual path and its ``fast``
grid-sample path), on random images of several sizes, to 299x299.

    python benchmarks/fid_resize_peer.py [--wheel torch_fidelity-0.4.0-py3-none-any.whl]

torch-fidelity cannot be installed beside torchmetrics without torchvision (importing
torchmetrics then imports torch-fidelity, which imports torchvision, which does not import beside
the CPU torch wheel), so this script loads the one file of torch-fidelity that holds the
function (it imports only torch) straight from the wheel. Without ``--wheel`` it downloads the
wheel with ``pip download --no-deps torch-fidelity==0.4.0`` (an explicit download). Writes one
JSON line to ``benchmarks/results/fid_resize_peer.jsonl``.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import emit  # noqa: E402

from transflow.evaluation import fid_metrics as fid  # noqa: E402

MEMBER = "torch_fidelity/interpolate_compat_tensorflow.py"


def load_peer(wheel: Path):
    with zipfile.ZipFile(wheel) as z, tempfile.TemporaryDirectory() as d:
        path = Path(d) / "interpolate_compat_tensorflow.py"
        path.write_bytes(z.read(MEMBER))
        spec = importlib.util.spec_from_file_location("tf_compat_peer", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module.interpolate_bilinear_2d_like_tensorflow1x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--wheel", default=None, help="torch-fidelity wheel (default: download)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        wheel = Path(a.wheel) if a.wheel else None
        if wheel is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                            "torch-fidelity==0.4.0", "-d", d], check=True)
            wheel = next(Path(d).glob("torch_fidelity-*.whl"))
        peer = load_peer(wheel)
        rows = []
        g = torch.Generator().manual_seed(0)
        for size in (8, 28, 32, 64, 100, 128, 256, 512):
            x64 = torch.randint(0, 256, (4, 3, size, size), generator=g).double()
            row = {"size": size}
            for dtype, tag in ((torch.float32, ""), (torch.float64, "_float64")):
                x = x64.to(dtype)
                ours = fid.resize_tf1_bilinear(x)
                for method in ("slow", "fast"):
                    theirs = peer(x, size=(299, 299), align_corners=False, method=method)
                    row[f"max_abs_diff_{method}{tag}"] = float((ours - theirs).abs().max())
            rows.append(row)
            print(row, flush=True)
    worst = max(max(r["max_abs_diff_slow"], r["max_abs_diff_fast"]) for r in rows)
    # in float64 the grid-sample path computes the map exactly; the "slow" path rounds its
    # coordinates to float32 whatever the input dtype
    worst64 = max(r["max_abs_diff_fast_float64"] for r in rows)
    emit("fid_resize_peer", {"time": time.strftime("%Y-%m-%d %H:%M"), "wheel": wheel.name,
                             "torch": torch.__version__, "rows": rows,
                             "max_abs_diff_pixels_float32": worst,
                             "max_abs_diff_pixels_float64_fast": worst64,
                             # in the network's input units, (x - 128) / 128
                             "max_abs_diff_network_input_float32": worst / 128,
                             "max_abs_diff_network_input_float64_fast": worst64 / 128,
                             "tolerance": 1e-5, "passed_float64": worst64 / 128 <= 1e-5})


if __name__ == "__main__":
    main()
