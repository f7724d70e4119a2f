#!/usr/bin/env bash
# The experiment table of docs/protocol.md at full size on one GPU: preset gpu-full (compact Inf-Net, 352 px,
# multi-scale 0.75/1/1.25, bf16 autocast), seeds 0 1 2, all runs in ONE process (data decoded once), in the
# priority order of training/schedule.py; a second call continues where the first stopped. Extra arguments go
# to training.schedule (e.g. --budget-min 6). Then: python -m training.table ROOT.
# Usage: training/gpu_schedule.sh [ROOT [ARGS...]]   (default root runs/gpu)
set -euo pipefail
cd "$(dirname "$0")/.."
python -m training.schedule --preset gpu-full --root "${1:-runs/gpu}" --device cuda --seeds 0 1 2 "${@:2}"
