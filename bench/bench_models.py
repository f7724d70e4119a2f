"""Inference throughput (slices/s) at 352x352 of every network, side by side with the reference
Res2Net-50 Inf-Net in the same process; prints a markdown table with the speed-up over the reference.

    python bench/bench_models.py [--threads 2] [--batch 4] [--repeats 3] [--device cpu]

Weights are random (speed does not depend on them); the multi-class U-Net has the shipped one's width.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models.factory import build_model  # noqa: E402


def bench(model, x, repeats, device):
    model.eval()
    with torch.no_grad():
        model(x)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return x.shape[0] / min(times)


def _shipped_multiclass_base() -> int:
    """The base width of the shipped multi-class U-Net (its sidecar), 12 when none is shipped."""
    import json

    sidecar = Path(__file__).resolve().parents[1] / "models" / "weights" / "infnet-multiclass.json"
    return int(json.loads(sidecar.read_text())["model_config"]["base"]) if sidecar.is_file() else 12


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--size", type=int, default=352)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev = a.device
    base = _shipped_multiclass_base()
    cases = [("infnet-res2net50 (reference)", "infnet-res2net50", {}, 1),
             ("infnet-compact (shipped)", "infnet-compact", {}, 1),
             (f"multiclass-unet (shipped, base {base})", "multiclass-unet", {"base": base}, 2)]
    rows = []
    for label, arch, cfg, ch in cases:
        m = build_model(arch, cfg).to(dev)
        n = sum(p.numel() for k, p in m.named_parameters() if not k.startswith("inp_"))
        x = torch.randn(a.batch, ch, a.size, a.size, device=dev)
        rows.append((label, n, bench(m, x, a.repeats, dev)))
    ref = rows[0][2]
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; machine: {platform.machine()} "
          f"{platform.processor() or ''} {os.cpu_count()} logical CPUs; torch {torch.__version__}; device {dev}; "
          f"threads {a.threads}; batch {a.batch}; {a.size}x{a.size}; best of {a.repeats}")
    print()
    print("| model | parameters | fp16 size (MB) | slices/s | speed-up vs reference |")
    print("|---|---|---|---|---|")
    for label, n, sps in rows:
        print(f"| {label} | {n / 1e6:.2f} M | {2 * n / 1e6:.1f} | {sps:.2f} | {sps / ref:.1f}x |")
    return rows


if __name__ == "__main__":
    main()
