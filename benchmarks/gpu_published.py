"""Training and sampling at the published sizes on one GPU (what ``benchmarks/gpu_suite.sh``
runs): images/s, model-FLOPs utilisation and peak memory.

``train``: ``tarflow-imagenet64`` (2-768-8-8, T = 1024) and ``jet-imagenet64`` on synthetic
images, bf16 autocast (log-determinants and prior in fp32, as ``transflow train``), fused
attention and AdamW, with and without ``torch.compile``, at each batch size given (an
out-of-memory batch is recorded as such), beside the original TarFlow computation
(``_original_tarflow.py``) at the same batch. MFU = 3 x analytic forward FLOPs x images/s over
``--peak-tflops`` (H200 dense bf16: 790).

``sample``: the AFHQ-256 shape (8-768-8-8, T = 1024, 3 classes, CFG 1.5) and the ImageNet-64
shape, random weights with output layers perturbed (the first seed whose probe samples are
finite): the original's loop, our eager sequential solver, the static step captured as a CUDA
graph and compiled (``reduce-overhead``), and the parallel plans, at each batch. To fit a few
minutes every method inverts ONE block (the first to be inverted, all blocks cost the same) and
images/s is extrapolated to the 8 blocks; max |x - x_eager| is that block's.

``--smoke``: tiny shapes on the CPU, to check the script runs (no meaningful figures).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch
from _results import emit

PUBLISHED_TRAIN = ("tarflow-imagenet64", "jet-imagenet64")
SAMPLE_SHAPES = {
    "afhq256": dict(image_size=256, channels=3, patch_size=8, width=768, blocks=8, layers=8,
                    num_classes=3),
    "imagenet64": dict(image_size=64, channels=3, patch_size=2, width=768, blocks=8, layers=8,
                       num_classes=1000),
}
SMOKE_SAMPLE = dict(image_size=16, channels=3, patch_size=4, width=64, blocks=2, layers=2,
                    num_classes=3)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
def train_rate(name: str, batch: int, compiled: bool, original: bool, steps: int,
               device: torch.device, smoke: bool, checkpointing: str) -> dict[str, Any]:
    from _original_tarflow import original_loss

    from transflow import build, get_config
    from transflow.training.recipe import make_optimizer

    overrides = dict(width=64, blocks=2, layers=2, couplings=2, image_size=16) if smoke else {}
    cfg = get_config(name, **{k: v for k, v in overrides.items()
                              if k in get_config(name).to_dict()})
    torch.manual_seed(0)
    model = build(cfg).to(device)
    model.configure_memory(checkpointing)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "proj_out" in n:
                p.normal_(0, 0.02)
    opt = make_optimizer(model, 1e-4, 1e-4)
    x = torch.rand(batch, cfg.channels, cfg.image_size, cfg.image_size, device=device) * 2 - 1
    y = torch.randint(0, max(cfg.num_classes, 1), (batch,), device=device) \
        if cfg.num_classes else None
    bf16 = device.type == "cuda"

    def loss_fn() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if original:
                return original_loss(model, x, y)
            z, logdet = fwd(x, y)
        return -(model.prior_log_prob(z) + logdet).mean() / cfg.dims

    fwd = torch.compile(model) if compiled and not original else model
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for i in range(steps + 3):
            if i == 3:
                sync(device)
                t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss_fn().backward()
            opt.step()
        sync(device)
    except torch.OutOfMemoryError:
        return {"config": name, "batch": batch, "compiled": compiled, "original": original,
                "oom": True}
    img_s = steps * batch / (time.perf_counter() - t0)
    tflops = 3 * cfg.forward_flops() * img_s / 1e12
    return {"config": name, "batch": batch, "precision": "bf16" if bf16 else "fp32",
            "compiled": compiled, "original": original, "checkpointing": checkpointing,
            "img_s": img_s, "model_tflops": tflops, "peak_gpu_gb": peak_gb(device)}


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------
def sample_model(shape: dict[str, Any], device: torch.device) -> Any:
    from transflow import TarFlow, TarFlowConfig
    from transflow.flows import Guidance, solvers

    for seed in range(20):
        torch.manual_seed(seed)
        model = TarFlow(TarFlowConfig(head_dim=64, **shape)).to(device).eval()
        with torch.no_grad():
            for b in model.blocks:
                b.proj_out.weight.normal_(0, 0.02)
                b.proj_out.bias.normal_(0, 0.02)
        c = model.config
        z = torch.randn(2, c.channels, c.image_size, c.image_size, device=device)
        t = solvers.solve_block(model.blocks[-1], model.tokens(z),
                                model.check_labels(torch.tensor([0, 1]), 2),
                                guidance=Guidance(1.5))[0]
        if bool(torch.isfinite(t).all()) and t.abs().max() < 1e3:
            return model
    raise RuntimeError("no seed gave finite samples")


def sample_rates(name: str, shape: dict[str, Any], batch: int, methods: list[str],
                 device: torch.device) -> dict[str, Any]:
    from sampling_speed import OriginalCache, original_step

    from transflow.flows import Guidance, solvers

    model = sample_model(shape, device)
    c = model.config
    block = model.blocks[-1]  # the first block inverted
    z = torch.randn(batch, c.channels, c.image_size, c.image_size, device=device)
    labels = torch.arange(batch, device=device) % c.num_classes
    y = model.check_labels(labels, batch)
    g = Guidance(1.5)
    tokens = model.tokens(z)
    out: dict[str, Any] = {"shape": name, "batch": batch, "tokens": c.tokens, "blocks": c.blocks,
                           "guidance": 1.5, "extrapolated_from_blocks": 1, "methods": {}}
    outputs: dict[str, torch.Tensor] = {}

    def original() -> torch.Tensor:
        x = block.order(tokens).clone()
        pos = block.ordered_pos_embed()
        cls_c = block.class_embed[y].unsqueeze(1)
        cls_u = block.class_embed[-1:].unsqueeze(1).expand(batch, -1, -1)
        cc, cu = OriginalCache(len(block.layers)), OriginalCache(len(block.layers))
        for i in range(x.shape[1] - 1):
            za, zb = original_step(block, x[:, i:i + 1], i, pos, cls_c, cc)
            za_u, zb_u = original_step(block, x[:, i:i + 1], i, pos, cls_u, cu)
            za, zb = za + 1.5 * (za - za_u), zb + 1.5 * (zb - zb_u)
            x[:, i + 1] = x[:, i + 1] * za[:, 0].exp() + zb[:, 0]
        return block.order(x)

    for m in methods:
        def run(m: str = m) -> torch.Tensor:
            if m == "original":
                return original()
            plan, static = m, None
            if m in ("graph", "compile"):
                plan, static = "sequential", m
            return solvers.solve_block(block, tokens, y, guidance=g, plan=plan,
                                       static=static)[0]

        try:
            with torch.inference_mode():
                first_t0 = time.perf_counter()
                x = run()  # compiles / captures, warms up
                sync(device)
                first = time.perf_counter() - first_t0
                t0 = time.perf_counter()
                x = run()
                sync(device)
                secs = time.perf_counter() - t0
        except Exception as e:  # recorded, the suite goes on
            out["methods"][m] = {"error": f"{type(e).__name__}: {e}"[:300]}
            continue
        outputs[m] = x.float()
        out["methods"][m] = {"block_seconds": secs, "first_call_seconds": first,
                             "img_s": batch / (secs * c.blocks)}
    ref = outputs.get("sequential")
    for m, x in outputs.items():
        if ref is not None:
            out["methods"][m]["max_diff_to_eager"] = float((x - ref).abs().max())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["train", "sample"])
    ap.add_argument("--configs", default=None, help="comma list (train: presets; sample: "
                    f"{', '.join(SAMPLE_SHAPES)})")
    ap.add_argument("--batches", default="64,128,256")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--compile", default="0,1", help="train: 0, 1 or both")
    ap.add_argument("--checkpointing", default="none")
    ap.add_argument("--methods", default="original,sequential,graph,compile,jacobi,gs:16")
    ap.add_argument("--peak-tflops", type=float, default=790.0)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    a = ap.parse_args()
    device = torch.device("cpu" if a.smoke or not torch.cuda.is_available() else "cuda")
    batches = [int(b) for b in a.batches.split(",")]
    rows = []
    if a.what == "train":
        for name in (a.configs.split(",") if a.configs else PUBLISHED_TRAIN):
            for b in batches:
                for comp in [bool(int(c)) for c in a.compile.split(",")]:
                    rows.append(train_rate(name, b, comp, False, a.steps, device, a.smoke,
                                           a.checkpointing))
                if name.startswith("tarflow"):
                    rows.append(train_rate(name, b, False, True, a.steps, device, a.smoke,
                                           a.checkpointing))
        for r in rows:
            if "img_s" in r:
                r["mfu"] = r["model_tflops"] / a.peak_tflops
    else:
        methods = [m for m in a.methods.split(",") if m]
        if device.type != "cuda":
            methods = [m for m in methods if m != "graph"]
        names = a.configs.split(",") if a.configs else list(SAMPLE_SHAPES)
        for name in names:
            shape = SMOKE_SAMPLE if a.smoke else SAMPLE_SHAPES[name]
            for b in batches:
                rows.append(sample_rates(name, shape, b, methods, device))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    record = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": gpu or "cpu",
              "torch": torch.__version__, "smoke": a.smoke, "threads": torch.get_num_threads(),
              "rows": rows, "argv": vars(a), "cpus": os.cpu_count()}
    if a.smoke:  # not a measurement: printed, not kept
        print(json.dumps(record, indent=2))
    else:
        emit(f"gpu_{a.what}", record)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], f"gpu_{a.what}.json"), "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
