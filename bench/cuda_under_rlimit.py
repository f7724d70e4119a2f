"""Does CUDA start under an address-space cap (RLIMIT_AS) or a data cap (RLIMIT_DATA), and does each cap still
stop a numpy allocation larger than itself? Why :func:`node.worker.limit_memory` caps RLIMIT_DATA.

    python bench/cuda_under_rlimit.py [--cap-gb 8]     # on a machine with a CUDA GPU

Each case runs in a fresh interpreter: the cap is set first, then torch starts CUDA and runs a small
half-precision convolution, then numpy allocates 1.5 x the cap.
"""
from __future__ import annotations

import argparse
import subprocess
import sys

CHILD = r'''
import resource, sys
name, cap_gb = sys.argv[1], float(sys.argv[2])
if name != "none":
    cap = int(cap_gb * 1024**3)
    resource.setrlimit(getattr(resource, name), (cap, cap))
import numpy as np
import torch

def vm():
    return {l.split(":")[0]: l.split(":")[1].strip() for l in open("/proc/self/status")
            if l.startswith(("VmSize", "VmRSS", "VmData"))}

try:
    conv = torch.nn.Conv2d(3, 8, 3).cuda().half()
    conv(torch.ones(2, 3, 64, 64, device="cuda").half())
    torch.cuda.synchronize()
    print("cuda ok", vm())
except Exception as e:
    print("cuda FAILED", type(e).__name__, str(e)[:300], vm())
try:
    a = np.ones(int(cap_gb * 1.5 * 1024**3), np.uint8)
    print(f"{cap_gb * 1.5:g} GB numpy: allocated (NOT capped)")
except MemoryError:
    print(f"{cap_gb * 1.5:g} GB numpy: MemoryError (capped)")
'''


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cap-gb", type=float, default=8.0)
    args = ap.parse_args()
    for name in ("none", "RLIMIT_AS", "RLIMIT_DATA"):
        r = subprocess.run([sys.executable, "-c", CHILD, name, str(args.cap_gb)], capture_output=True, text=True,
                           timeout=300)
        print(f"== {name} (cap {args.cap_gb:g} GB) rc={r.returncode}\n{r.stdout}{r.stderr[-800:]}", flush=True)


if __name__ == "__main__":
    main()
