"""The bad-input and fault matrix of the command line: its fixtures, its cases and a runner.

Every case is one command that a careless or hostile user could type; each must end with exit
code 2, exactly one line on stderr, no traceback, no temporary file left behind, and no existing
file changed (except the files a case names). ``tests/test_cli_matrix.py`` runs them; run this
file directly to print the table (also against another checkout, with ``PYTHONPATH``)::

    python tests/cli_matrix.py [ROOT [SRC]]    # SRC: run the cases against another checkout

Each case runs in its own process: a server process imports the CLI once and forks a child per
case, which runs ``transflow.cli.main(argv)`` with its stdout/stderr redirected to files and exits
with its return code (an escaping exception prints its traceback and exits 1, as the interpreter
would). Cases on a full disk use a small tmpfs, mounted when the tests run as root (else they are
skipped, with the reason).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

TINY = ["--width", "32", "--blocks", "2", "--layers", "1", "--head-dim", "16"]
TMPFS_BYTES = 2 * 1024 * 1024
TMPFS_FREE = 40 * 1024  # left free on the tmpfs: less than a checkpoint, a model or the outputs


@dataclass
class Case:
    name: str
    argv: list[str]  # "{root}" and "{full}" (the tmpfs) are replaced
    needle: str  # the error line must contain it
    issue: str = ""  # what of issue 16 the case covers
    may_change: list[str] = field(default_factory=list)  # files the case may rewrite
    full_disk: bool = False


def cases() -> list[Case]:
    r, m, f = "{root}", "{root}/model", "{full}"
    bad = "{root}/bad_run"
    return [
        # -- 1. corrupted files --------------------------------------------------------------
        Case("corrupt checkpoint: sample", ["sample", f"{r}/corrupt_ckpt", "-o", f"{r}/s.png"],
             "is corrupt", "1"),
        Case("corrupt checkpoint: eval bpd", ["eval", "bpd", f"{r}/corrupt_ckpt"], "is corrupt",
             "1"),
        Case("corrupt checkpoint: score", ["score", f"{r}/corrupt_ckpt", f"{r}/img.png"],
             "is corrupt", "1"),
        Case("corrupt checkpoint: train --resume",
             ["train", "--resume", f"{r}/corrupt_ckpt", "--steps", "8", "--no-progress"],
             "is corrupt", "1"),
        Case("corrupt model.safetensors: sample",
             ["sample", f"{r}/corrupt_model", "-o", f"{r}/s.png"], "is corrupt", "1"),
        Case("corrupt model.safetensors: eval bpd", ["eval", "bpd", f"{r}/corrupt_model"],
             "is corrupt", "1"),
        Case("corrupt model.safetensors: score",
             ["score", f"{r}/corrupt_model", f"{r}/img.png"], "is corrupt", "1"),
        # -- 2, 3. full disk ------------------------------------------------------------------
        Case("disk full: first checkpoint",
             ["train", "--out", f"{f}/new", "--steps", "2", "--checkpoint-every", "1",
              "--eval-images", "20", "--no-progress", *TINY], "No space left on device", "2",
             full_disk=True),
        Case("disk full: checkpoint on resume",
             ["train", "--resume", f"{f}/run", "--steps", "6", "--no-progress"],
             "No space left on device", "2", full_disk=True,
             may_change=["run/config.json", "run/metrics.jsonl", "run/log.txt"]),
        Case("disk full: sample over an existing .npz",
             ["sample", m, "-o", f"{f}/existing.npz", "--n", "4000", "--batch-size", "1000",
              "--quiet"],
             "No space left on device", "3", full_disk=True),
        Case("disk full: sample into a PNG folder",
             ["sample", m, "-o", f"{f}/pngs", "--n", "400", "--batch-size", "400",
              "--quiet"],
             "No space left on device", "3", full_disk=True),
        Case("disk full: writing a model (convert)",
             ["convert", "tarflow-original", f"{r}/original.pth", f"{f}/converted",
              "--patch-size", "2", "--width", "32", "--blocks", "2", "--layers", "1",
              "--head-dim", "16", "--classes", "10", "--num-levels", "17"],
             "No space left on device", "2", full_disk=True),
        # -- 4. non-finite training -----------------------------------------------------------
        Case("--lr inf", ["train", "--out", f"{r}/out1", "--lr", "inf", *TINY], "lr must be",
             "4"),
        Case("--lr nan", ["train", "--out", f"{r}/out2", "--lr", "nan", *TINY], "lr must be",
             "4"),
        Case("training diverges (--lr 1e30)",
             ["train", "--out", f"{r}/diverged", "--lr", "1e30", "--steps", "3", "--warmup",
              "1", "--eval-images", "20", "--no-progress", *TINY], "training diverged", "4",
             may_change=[]),
        # -- 5. resume options ----------------------------------------------------------------
        Case("--resume --width", ["train", "--resume", f"{r}/run", "--width", "64"],
             "cannot change", "5"),
        Case("--resume --lr", ["train", "--resume", f"{r}/run", "--lr", "0.01"], "cannot change",
             "5"),
        Case("--resume --batch-size", ["train", "--resume", f"{r}/run", "--batch-size", "8"],
             "cannot change", "5"),
        Case("--resume --preset", ["train", "--resume", f"{r}/run", "--preset", "jet-digits"],
             "cannot change", "5"),
        Case("--resume --data", ["train", "--resume", f"{r}/run", "--data", f"{r}/rgb.npz"],
             "cannot change", "5"),
        Case("--resume --steps below the steps done",
             ["train", "--resume", f"{r}/run", "--steps", "2", "--no-progress"],
             "already done 4 steps", "5"),
        # -- 7. labels ------------------------------------------------------------------------
        Case("labels with gaps (99)", ["train", "--data", f"{r}/gaps.npz", "--out", f"{r}/out3"],
             "distinct values", "7"),
        Case("y_train without y_test",
             ["train", "--data", f"{r}/one_sided.npz", "--out", f"{r}/out4"], "but no y_test",
             "7"),
        Case("empty test split", ["train", "--data", f"{r}/empty_test.npz", "--out", f"{r}/out5"],
             "empty test split", "7"),
        Case("NaN labels", ["train", "--data", f"{r}/nan_labels.npz", "--out", f"{r}/out6"],
             "non-integer labels", "7"),
        # -- 8. devices and run configs -------------------------------------------------------
        Case("--device cuda without CUDA (train)",
             ["train", "--out", f"{r}/out7", "--device", "cuda", *TINY], "CUDA", "8"),
        Case("--device cuda without CUDA (sample)",
             ["sample", m, "-o", f"{r}/s.png", "--device", "cuda"], "CUDA", "8"),
        Case("--device bogus (eval bpd)",
             ["eval", "bpd", m, "--data", "digits", "--device", "bogus"], "unknown device",
             "8"),
        Case("--device bogus (train)", ["train", "--out", f"{r}/out8", "--device", "bogus", *TINY],
             "unknown device", "8"),
        Case("config.json is {}: --resume", ["train", "--resume", f"{bad}_empty"],
             "lacks the 'model' section", "8"),
        Case("config.json is {}: eval bpd", ["eval", "bpd", f"{bad}_empty"],
             "lacks the 'model' section", "8"),
        Case("config.json is a list: --resume", ["train", "--resume", f"{bad}_list"],
             "does not hold a JSON object", "8"),
        Case("config.json disagrees with the checkpoint: --resume",
             ["train", "--resume", f"{bad}_other", "--no-progress"], "different model", "8"),
        Case("config.json lacks a field: --resume",
             ["train", "--resume", f"{bad}_missing", "--no-progress"], "lacks field(s) width",
             "8"),
        # -- 9. numbers -----------------------------------------------------------------------
        Case("eval bpd --limit -5", ["eval", "bpd", m, "--data", "digits", "--limit", "-5"],
             "--limit", "9"),
        Case("eval bpd --batch-size 0",
             ["eval", "bpd", m, "--data", "digits", "--batch-size", "0"], "--batch-size", "9"),
        Case("sample --batch-size 0", ["sample", m, "-o", f"{r}/s.png", "--batch-size", "0"],
             "batch_size", "9"),
        Case("train --batch-size 0", ["train", "--out", f"{r}/out9", "--batch-size", "0"],
             "batch_size", "9"),
        Case("sample --n 0", ["sample", m, "-o", f"{r}/s.png", "--n", "0"], "--n", "9"),
        Case("score --dequant-samples 0",
             ["score", m, f"{r}/img.png", "--dequant-samples", "0"], "--dequant-samples", "9"),
        # -- 10. outputs ----------------------------------------------------------------------
        Case("sample into a used PNG folder",
             ["sample", m, "-o", f"{r}/used_pngs", "--n", "2"], "is not empty", "10"),
        Case("eval bpd --json unwritable",
             ["eval", "bpd", m, "--data", "digits", "--json", f"{r}/file/x.json"],
             "is not a directory", "10"),
        Case("score --json unwritable",
             ["score", m, f"{r}/img.png", "--json", f"{r}/file/x.json"], "is not a directory",
             "10"),
        # -- bad flags ------------------------------------------------------------------------
        Case("unknown flag", ["sample", m, "--bogus"], "unrecognized arguments", "flags"),
        Case("missing argument", ["sample"], "required", "flags"),
        Case("not a number", ["train", "--steps", "many"], "invalid int value", "flags"),
        # -- data at scale (issue 17) ---------------------------------------------------------
        Case("prepare: missing source", ["prepare", f"{r}/nope", f"{r}/p1", "--no-progress"],
             "not found", "17"),
        Case("prepare: onto a prepared set", ["prepare", "digits", f"{r}/prepared",
                                              "--no-progress"], "--overwrite", "17"),
        Case("train on an unfinished prepared set",
             ["train", "--data", f"{r}/unfinished", "--out", f"{r}/out10", *TINY],
             "unfinished prepared data set", "17"),
        Case("--accum-steps does not divide the batch",
             ["train", "--out", f"{r}/out11", "--batch-size", "32", "--accum-steps", "5", *TINY],
             "accum_steps", "17"),
        Case("--noise-std with uniform dequantization",
             ["train", "--out", f"{r}/out12", "--noise-std", "0.1", *TINY], "--dequant gaussian",
             "17"),
        Case("--epochs -1", ["train", "--out", f"{r}/out13", "--epochs", "-1", *TINY],
             "must be >= 0", "17"),
    ]


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------
def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def build(root: Path) -> None:
    """Create every file the cases read (in this process: the library, not the CLI)."""
    import numpy as np
    import torch
    from PIL import Image

    from transflow import build as build_model
    from transflow import get_config, save_pretrained
    from transflow.data import load_data
    from transflow.interop import save_original
    from transflow.training import train
    from transflow.training.recipe import TrainConfig

    root.mkdir(parents=True, exist_ok=True)
    from transflow.data.prepare import prepare
    from transflow.data.prepared_set import STATE

    prepare("digits", root / "prepared", progress=False)
    (root / "unfinished").mkdir()
    (root / "unfinished" / STATE).write_text("{}")
    torch.manual_seed(0)
    cfg = get_config("tarflow-digits", width=32, blocks=2, layers=1, head_dim=16,
                     marginals=False, whiten=False)  # exportable to the original's layout
    model = build_model(cfg)
    save_pretrained(model, root / "model")
    save_original(model, root / "original.pth")
    train(cfg, load_data("digits"), TrainConfig(steps=4, batch_size=32, checkpoint_every=500,
                                                eval_images=20, warmup=1), root / "run",
          data_spec="digits", progress=False)
    shutil.rmtree(root / "run" / "model")  # an unfinished run: one checkpoint, no model/
    shutil.copytree(root / "run", root / "corrupt_ckpt")
    _flip(root / "corrupt_ckpt" / "checkpoint.pt")
    save_pretrained(model, root / "corrupt_model")
    _flip(root / "corrupt_model" / "model.safetensors")
    for name, content in (("empty", {}), ("list", [1, 2])):
        shutil.copytree(root / "run", root / f"bad_run_{name}")
        (root / f"bad_run_{name}" / "config.json").write_text(json.dumps(content))
    for name in ("other", "missing"):
        shutil.copytree(root / "run", root / f"bad_run_{name}")
        p = root / f"bad_run_{name}" / "config.json"
        c = json.loads(p.read_text())
        if name == "other":
            c["model"]["width"] = 64
        else:
            del c["model"]["width"]
        p.write_text(json.dumps(c))
    z = np.zeros
    x = z((6, 8, 8, 1), np.uint8)
    np.savez(root / "rgb.npz", x_train=z((3, 8, 8, 3), np.uint8), x_test=z((3, 8, 8, 3),
                                                                          np.uint8))
    np.savez(root / "gaps.npz", x_train=x, y_train=[0, 1, 99, 0, 1, 99], x_test=x[:2],
             y_test=[0, 1])
    np.savez(root / "one_sided.npz", x_train=x, y_train=[0, 1, 0, 1, 0, 1], x_test=x[:2])
    np.savez(root / "empty_test.npz", x_train=x, y_train=[0, 1, 0, 1, 0, 1],
             x_test=z((0, 8, 8, 1), np.uint8), y_test=np.zeros(0, np.int64))
    np.savez(root / "nan_labels.npz", x_train=x, y_train=[0.0, 1.0, np.nan, 1, 0, 1],
             x_test=x[:2], y_test=[0.0, 1.0])
    Image.fromarray(z((8, 8), np.uint8)).save(root / "img.png")
    (root / "used_pngs").mkdir()
    Image.fromarray(z((8, 8), np.uint8)).save(root / "used_pngs" / "000007.png")
    (root / "file").write_text("x")


def mount_full_disk(root: Path) -> tuple[Path | None, str]:
    """A small tmpfs at ``root/full`` holding a run and an .npz, filled to ``TMPFS_FREE`` bytes
    free; ``(None, reason)`` when it cannot be mounted."""
    import numpy as np

    full = root / "full"
    full.mkdir(exist_ok=True)
    if os.geteuid() != 0:
        return None, "mounting a tmpfs needs root"
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs",
                            str(full)], capture_output=True, text=True)
    except OSError as e:
        return None, f"cannot run mount: {e}"
    if r.returncode != 0:
        return None, f"cannot mount a tmpfs: {r.stderr.strip() or r.returncode}"
    shutil.copytree(root / "run", full / "run")
    np.savez(full / "existing.npz", images=np.ones((3, 8, 8, 1), np.uint8))
    st = os.statvfs(full)
    free = st.f_bavail * st.f_frsize
    with open(full / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - TMPFS_FREE))
    return full, ""


def unmount(full: Path | None) -> None:
    if full is not None:
        try:
            subprocess.run(["umount", str(full)], capture_output=True)
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------
# running the cases
# ---------------------------------------------------------------------------------------------
def _child(argv: list[str], out: str, err: str) -> None:
    """In the forked child: run the CLI with its output in files, then exit with its code."""
    fo, fe = os.open(out, os.O_WRONLY | os.O_CREAT), os.open(err, os.O_WRONLY | os.O_CREAT)
    os.dup2(fo, 1)
    os.dup2(fe, 2)
    code = 1
    try:
        from transflow.cli import main

        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def serve(cases_json: Path, results_json: Path) -> None:
    """Run every case of ``cases_json`` in a forked child; write ``results_json``."""
    import transflow.cli  # noqa: F401  (imported once, before forking)

    spec = json.loads(cases_json.read_text())
    results = []
    for c in spec["cases"]:
        where = Path(spec["full"] if c["full_disk"] else spec["root"])
        before = _files(where)
        out, err = f"{spec['scratch']}/out.txt", f"{spec['scratch']}/err.txt"
        for p in (out, err):
            Path(p).write_text("")
        pid = os.fork()
        if pid == 0:
            _child(c["argv"], out, err)
        _, status = os.waitpid(pid, 0)
        after = _files(where)
        changed = sorted(k for k in before if k in after and before[k] != after[k]
                         and k not in c["may_change"])
        removed = sorted(k for k in before if k not in after)
        new = [k for k in after if k not in before]
        temps = sorted(k for k in new if Path(k).name.startswith(".") and k.endswith(".tmp"))
        empty = sorted(k for k in new if not after[k])
        results.append({"name": c["name"], "code": os.waitstatus_to_exitcode(status),
                        "stderr": Path(err).read_text(), "stdout": Path(out).read_text(),
                        "changed": changed, "removed": removed, "temps": temps, "empty": empty})
    results_json.write_text(json.dumps(results))


def run(root: Path, full: Path | None, selected: list[Case], python: str = sys.executable,
        env: dict[str, str] | None = None) -> list[dict]:
    """Run ``selected`` cases in the server process (``python`` with ``env``); their results."""
    def fill(a: str) -> str:
        return a.replace("{root}", str(root)).replace("{full}", str(full))

    scratch = root.parent / f"{root.name}-scratch"
    scratch.mkdir(exist_ok=True)
    spec = {"root": str(root), "full": str(full), "scratch": str(scratch),
            "cases": [{"name": c.name, "argv": [fill(a) for a in c.argv],
                       "full_disk": c.full_disk, "may_change": c.may_change} for c in selected]}
    (scratch / "cases.json").write_text(json.dumps(spec))
    env = dict(os.environ if env is None else env, OMP_NUM_THREADS="1")
    subprocess.run([python, __file__, "serve", str(scratch / "cases.json"),
                    str(scratch / "results.json")], env=env, check=True, timeout=900)
    return json.loads((scratch / "results.json").read_text())


def verdict(case: Case, res: dict) -> str:
    """'' when the case behaved, else what went wrong."""
    lines = res["stderr"].strip().splitlines()
    problems = []
    if res["code"] != 2:
        problems.append(f"exit {res['code']}")
    if len(lines) != 1:
        problems.append(f"{len(lines)} stderr lines")
    if "Traceback" in res["stderr"]:
        problems.append("traceback")
    if lines and case.needle not in res["stderr"]:
        problems.append(f"no {case.needle!r}")
    for key in ("changed", "removed", "temps", "empty"):
        if res[key]:
            problems.append(f"{key}: {res[key][:3]}")
    return "; ".join(problems)


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/cli-matrix").absolute()
    if root.exists():
        unmount(root / "full")
        shutil.rmtree(root)
    build(root)
    full, why = mount_full_disk(root)
    selected = [c for c in cases() if full is not None or not c.full_disk]
    env = dict(os.environ)
    if len(sys.argv) > 2:  # the cases against another checkout's package (fixtures: this one's)
        env["PYTHONPATH"] = str(Path(sys.argv[2]).absolute())
    try:
        results = run(root, full, selected, env=env)
    finally:
        unmount(full)
    for c, r in zip(selected, results, strict=True):
        err = r["stderr"].strip().splitlines()
        first = next((line for line in err if "error" in line.lower()), None) or \
            (err[-1] if err else (r["stdout"].strip().splitlines() or [""])[0])
        print(f"{c.issue:>5} | {c.name} | exit {r['code']} | {first[:160]} | "
              f"{verdict(c, r) or 'ok'}")
    if full is None:
        print(f"(full-disk cases skipped: {why})")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        main()
