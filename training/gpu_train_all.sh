#!/usr/bin/env bash
# Every GPU training of docs/protocol.md in one call, within a wall-clock limit, results packed for return:
# the open lung network candidates, then the experiment table (training/gpu_schedule.sh) until the limit.
#   training/gpu_train_all.sh OUT_DIR [LIMIT_S]      (CTNODE_DATA: the folder holding covid-semiseg/)
# OUT_DIR receives: env.log, lungnet.log, lungnet.tgz (metrics and fp16 weights of the candidates),
# schedule.log, runs.tgz (every metrics/test/config JSON of runs/gpu), weights-*.tar (fp16 exports of the
# seed-0 models of the cross-validation candidates and their multi-class nets).
set -u
out=${1:?usage: training/gpu_train_all.sh OUT_DIR [LIMIT_S]}
limit=${2:-480}
start=$(date +%s)
left() { echo $(( limit - ($(date +%s) - start) )); }
export PYTHONUNBUFFERED=1
device=${DEVICE:-cuda}; preset=${PRESET:-gpu-full}; ln_epochs=${LN_EPOCHS:-60}  # smoke runs: cpu, tiny, 1
data=${CTNODE_DATA:?set CTNODE_DATA}/covid-semiseg
mkdir -p "$out" runs
{ date -u; nvidia-smi -L; nproc; python3 -c "import torch; print(torch.__version__, torch.cuda.is_available())"; } > "$out/env.log" 2>&1

# the open lung network questions (docs/protocol.md, "Lung network", versions 2 and 3 from scratch; version 1's
# two candidates were decided on 2026-12-04, versions 4 and 5 on 2026-12-06 on the CPU)
ln_args=(--data "$data" --device $device --size 128 --epochs $ln_epochs --samples-per-epoch 960 --batch 32 --num-threads 8)
{
  # version 2 from scratch: the wide network with the real-CT examples (training/real_ct.py)
  timeout 200 python3 -m training lungnet --out runs/lungnet-wide-real --channels 16 32 48 64 96 --real "${ln_args[@]}"
  # version 3: also the phantoms with airless consolidation
  timeout 200 python3 -m training lungnet --out runs/lungnet-wide-real-dense --channels 16 32 48 64 96 --real \
    --dense-phantoms "${ln_args[@]}"
  for c in wide-real wide-real-dense; do
    [ -f runs/lungnet-$c/last.pt ] && python3 -m training lungnet-export --ckpt runs/lungnet-$c/last.pt \
      --name lungnet-$c --out-dir runs/lungnet-export
  done
  # rule (a) of versions 2 and 3: the shipped network and each candidate on the same validation examples
  python3 -m training lungnet-evaluate --name lungnet --data "$data" --out runs/lungnet-wide-real
  for c in wide-real wide-real-dense; do
    [ -f runs/lungnet-export/lungnet-$c.json ] && python3 -m training lungnet-evaluate --name lungnet-$c \
      --weights-dir runs/lungnet-export --data "$data" --out runs/lungnet-wide-real
  done
} > "$out/lungnet.log" 2>&1
tar czf "$out/lungnet.tgz" runs/lungnet-*/metrics.json runs/lungnet-export 2>/dev/null

# the experiment table until 60 s before the limit (no run starts in the last 150 s)
budget_min=$(python3 -c "print(max(0.5, ($(left) - 150) / 60))")
timeout $(( $(left) - 60 )) python3 -m training.schedule --preset $preset --root runs/gpu --device $device \
  --seeds 0 1 2 --budget-min "$budget_min" > "$out/schedule.log" 2>&1
python3 -m training.table runs/gpu >> "$out/schedule.log" 2>&1
(cd runs && find gpu -name "*.json" | tar czf "$out/runs.tgz" -T -)

# fp16 exports of the candidates' seed-0 models and their multi-class nets
for row in sinfnet-aug04 selfsup-aug04 selfsup-semi-aug04; do
  d=runs/gpu/seed0
  [ -f $d/$row/best.pt ] && python3 -m training export --ckpt $d/$row/best.pt --name infnet-$row \
    --out-dir runs/export-single --tta flips > /dev/null
  [ -f $d/multi-$row/best.pt ] && python3 -m training export --ckpt $d/multi-$row/best.pt \
    --name infnet-multiclass-$row --out-dir runs/export-multi > /dev/null
done
for kind in single multi; do
  [ -d runs/export-$kind ] && tar cf "$out/weights-$kind.tar" -C runs export-$kind
done
echo "done in $(( $(date +%s) - start )) s"
