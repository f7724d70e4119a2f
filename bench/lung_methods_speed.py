"""Seconds of ``segment_lungs`` with method "hu" and "net", and of the lung network alone, on one diseased
phantom (512 x 512 x ``--slices``), in this process, one run each (the network loaded before the clock).

    python bench/lung_methods_speed.py --slices 120
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=120)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    from node import phantom as ph
    from node.pipeline.lungs import segment_lungs
    from node.pipeline.lungs.body import body_box, body_mask
    from node.pipeline.lungs.net import _lung_net, lung_probability

    p = ph.make_phantom(rows=512, cols=512, slices=args.slices, seed=0,
                        burden={"right_lower": 0.8, "left_upper": 0.3})
    volume = p.as_volume()
    _lung_net("cpu")
    print(f"{time.strftime('%Y-%m-%d %H:%M')} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, "
          f"512 x 512 x {args.slices}")
    for method in ("hu", "net"):
        t0 = time.perf_counter()
        segment_lungs(volume, method=method)
        print(f"segment_lungs method {method}: {time.perf_counter() - t0:.2f} s")
    rows, cols = body_box(body_mask(volume.hu, volume.pixel_spacing))
    t0 = time.perf_counter()
    lung_probability(volume.hu[:, rows, cols], "cpu")
    print(f"lung network alone: {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
