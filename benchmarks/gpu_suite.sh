#!/usr/bin/env bash
# The GPU checks of the GPU issue in about 8 minutes on one H200, from the repository root:
# training at the published sizes (MFU, beside the original TarFlow computation), sampling at the
# published sizes (original loop, eager, CUDA graph, compiled, parallel plans), NCCL with one
# process (DDP and FSDP2), and tests/test_cuda.py. Installs nothing: it runs the checkout's
# src/ with the machine's torch. JSON goes under $OUT (default /tmp/gpu_suite); a table at the end.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_suite}
mkdir -p "$OUT"
export OUT PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
python - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
PY
run() {  # name seconds command...
    local name=$1 secs=$2; shift 2
    local t0=$SECONDS
    timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
    echo "$name: exit $? in $((SECONDS - t0)) s"
}
run train 210 python benchmarks/gpu_published.py train --batches 64,128 --steps 8
run sample 180 python benchmarks/gpu_published.py sample --batches 16,64
for p in ddp fsdp; do
    run "nccl_$p" 60 torchrun --nproc_per_node=1 -m transflow train --steps 30 --parallel "$p" \
        --device cuda --out "$OUT/run_$p" --no-progress
done
run test_cuda 120 python -m pytest -q -p no:cacheprovider tests/test_cuda.py
python - <<'PY'
import json, os
out = os.environ["OUT"]
def load(name):
    p = os.path.join(out, name)
    return json.load(open(p)) if os.path.exists(p) else []
print("\ntraining: config | batch | precision | compiled | original | img/s | MFU | peak GB")
for r in load("gpu_train.json"):
    if r.get("oom"):
        print(f"{r['config']} | {r['batch']} | - | {r['compiled']} | {r['original']} | OOM")
        continue
    print(f"{r['config']} | {r['batch']} | {r['precision']} | {r['compiled']} | {r['original']}"
          f" | {r['img_s']:.1f} | {r['mfu']:.3f} | {r['peak_gpu_gb']:.1f}")
print("\nsampling: shape | batch | method | img/s (8 blocks from 1) | max |x - x_eager|")
for r in load("gpu_sample.json"):
    for m, v in r["methods"].items():
        if "error" in v:
            print(f"{r['shape']} | {r['batch']} | {m} | error: {v['error'][:80]}")
        else:
            print(f"{r['shape']} | {r['batch']} | {m} | {v['img_s']:.2f} | "
                  f"{v.get('max_diff_to_eager', float('nan')):.2e}")
PY
