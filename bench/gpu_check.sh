#!/bin/bash
# The checks that need a CUDA GPU, as one script (docs/performance.md, "Processing on a GPU"); logs in $1.
#   bash bench/gpu_check.sh /tmp/gpu-logs          # from the repository root, the package's dependencies installed
#   bash bench/gpu_check.sh /tmp/gpu-logs speed    # only the analysis benchmark (lung step and whole analysis)
# The analysis benchmark runs side by side with a baseline when one is given: BASELINE_TREE=DIR (a checkout of
# it) or BASELINE_REV=REV (a git worktree of it; needs git). About 3 minutes on a 16-core H200 machine without
# a baseline (every command's timeout together: 6 minutes); a baseline adds its runs (43d6f02: about 2 minutes).
set -u
out=${1:?usage: bench/gpu_check.sh LOG_DIR [speed]}
part=${2:-all}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{ date -u; nvidia-smi -L; nproc; python3 -c "import torch, numpy, scipy; print(torch.__version__, torch.cuda.is_available(), numpy.__version__, scipy.__version__)"; } > "$out/env.log" 2>&1
baseline=()
bench_s=90
if [ -n "${BASELINE_TREE:-}" ]; then baseline=(--baseline-tree "$BASELINE_TREE"); bench_s=240; fi
if [ -n "${BASELINE_REV:-}" ]; then baseline=(--baseline-rev "$BASELINE_REV"); bench_s=240; fi
# the lung step and the whole analysis of a 300-slice 512x512 study, twice (the second run without the CUDA
# context's creation); with a baseline, its tree runs the same in a child process before this one's
timeout $bench_s python3 bench/bench_pipeline.py --slices 300 --size 512 --runs infnet:cuda infnet:cuda ${baseline[@]+"${baseline[@]}"} \
    > "$out/bench_pipeline.log" 2>&1
echo "bench_pipeline exit status $?"
grep -E '"(lungs|analyse_total)"' "$out/bench_pipeline.log" | tail -12
# the lung network alone: GFLOP per slice, and its rate on the GPU and on the CPUs
{ timeout 30 python3 bench/lungs_speed.py --network --device cuda; timeout 30 python3 bench/lungs_speed.py --network; } \
    > "$out/lung_network.log" 2>&1
grep -E 'gflop' "$out/lung_network.log"
[ "$part" = speed ] && exit 0
timeout 30 python3 bench/cuda_under_rlimit.py > "$out/cuda_under_rlimit.log" 2>&1
timeout 75 python3 -m pytest -q -p no:cacheprovider -rA tests/test_gpu.py > "$out/test_gpu.log" 2>&1
tail -5 "$out/test_gpu.log"
timeout 55 python3 bench/worker_memory.py --slices 300 --engine infnet --device cuda > "$out/worker_memory.log" 2>&1
# the node end to end with the production example's memory cap; nvidia-smi shows the worker on the GPU
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader -l 1 > "$out/demo-nvidia-smi.log" 2>&1 &
smi=$!
CTNODE_PROCESSING_WORKER_MEMORY_GB=12 timeout 50 python3 -c "import sys; from node.cli import main; sys.exit(main(['demo']))" \
    > "$out/demo.log" 2>&1
echo "demo exit status $?"
kill $smi
grep -E "engine .* on |time per stage" "$out/demo.log"
