#!/usr/bin/env bash
# Full-size schedule of the experiment table on one GPU: preset gpu-full (compact Inf-Net, 352 px, multi-scale
# 0.75/1/1.25, bf16 autocast + channels_last), all runs in ONE process so the data are decoded once into
# memory; prints the table last. Includes the best CPU recipe (self-supervised + pseudo-label stage + aug, flip TTA,
# multi-class net on its own prior). Tested end to end on the tiny preset (tests/test_training.py -k schedule).
# Usage: training/gpu_schedule.sh [ROOT]   (default runs/gpu)
set -euo pipefail
cd "$(dirname "$0")/.."
python -m training.schedule --preset gpu-full --root "${1:-runs/gpu}" --device cuda
