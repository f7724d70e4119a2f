#!/usr/bin/env bash
# Runs the experiment table (docs/results.md) for one preset.
#   training/schedule.sh PRESET ROOT [A|B|all]
# Queue A: supervised rows + multi-class; queue B: self-supervised and semi rows. "all" runs A then B then
# the test evaluation of every final model and prints the table. Test evaluation happens once per final model.
set -euo pipefail
PRESET=${1:-cpu-small}; ROOT=${2:-runs/$PRESET}; Q=${3:-all}
PY=${PYTHON:-python}
T="$PY -m training"
mkdir -p "$ROOT"
done_() { [ -f "$1/metrics.json" ]; }   # a finished run is skipped (rerun with --resume to continue a cut one)

queue_a() {
  done_ $ROOT/sinfnet        || $T train --preset $PRESET --run-dir $ROOT/sinfnet
  done_ $ROOT/sinfnet-aug04  || $T train --preset $PRESET --run-dir $ROOT/sinfnet-aug04 --aug --cutout 0.4
  done_ $ROOT/multi          || $T train-multi --preset $PRESET --run-dir $ROOT/multi
  done_ $ROOT/sinfnet-aug02  || $T train --preset $PRESET --run-dir $ROOT/sinfnet-aug02 --aug --cutout 0.2
  done_ $ROOT/sinfnet-aug05  || $T train --preset $PRESET --run-dir $ROOT/sinfnet-aug05 --aug --cutout 0.5
}
queue_b() {
  done_ $ROOT/pretrain       || $T pretrain --preset $PRESET --run-dir $ROOT/pretrain
  done_ $ROOT/selfsup        || $T train --preset $PRESET --run-dir $ROOT/selfsup --init $ROOT/pretrain/pretrained.pt
  done_ $ROOT/selfsup-aug04  || $T train --preset $PRESET --run-dir $ROOT/selfsup-aug04 --init $ROOT/pretrain/pretrained.pt --aug --cutout 0.4
  done_ $ROOT/semi-pseudo    || $T train --preset $PRESET --run-dir $ROOT/semi-pseudo --train-set pseudo
  done_ $ROOT/semi           || $T train --preset $PRESET --run-dir $ROOT/semi --init $ROOT/semi-pseudo/best.pt
}
evaluate_all() {
  for r in sinfnet sinfnet-aug02 sinfnet-aug04 sinfnet-aug05 selfsup selfsup-aug04 semi; do
    [ -f $ROOT/$r/best.pt ] || continue
    [ -f $ROOT/$r/test_metrics.json ] || $T evaluate --preset $PRESET --ckpt $ROOT/$r/best.pt
    # multi-class column: the multi-class network with this row's single-class model as test-time prior
    [ -f $ROOT/multi/best.pt ] && { [ -f $ROOT/$r/test_multi.json ] || \
      $T evaluate --preset $PRESET --ckpt $ROOT/multi/best.pt --prior-ckpt $ROOT/$r/best.pt --out $ROOT/$r/test_multi.json; }
  done
  $PY -m training.table "$ROOT"
}
case $Q in
  A) queue_a ;;
  B) queue_b ;;
  eval) evaluate_all ;;
  all) queue_a; queue_b; evaluate_all ;;
esac
