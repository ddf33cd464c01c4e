#!/usr/bin/env bash
# The GPU half of docs/RESULTS.md: the report's CNN grid (bp, fa, dfa x seeds 0-2, experiment=report_cnn),
# BioTorch's LeNet grid (bp, fa, usf, brsf, frsf, dfa x seeds 0-2, experiment=biotorch_lenet) and the
# report's ANN grid (bp, fa, dfa x seeds 0-2, experiment=report_ann) on one GPU; on request also the
# AdamW grids of docs/RESULTS.md (report_cnn_adamw: fa, dfa; biotorch_lenet_adamw: its six rules), each
# method with the overrides its preset's comment gives it. One `fa-train -m` per (preset, method) runs in
# the background, all at once: a run of these small models keeps one CPU core busy launching kernels and
# leaves the GPU mostly idle, so 12 of them share it.
#
#   FA_DATA_DIR=/data OUT=/tmp/results benchmarks/results_gpu.sh            # the real thing (cuda)
#   FA_DATA_DIR=/data OUT=/tmp/tiny FA_DEVICE=cpu benchmarks/results_gpu.sh trainer.epochs=1 dataset.subset=512
#
# Arguments are extra overrides for every run. Environment:
#   FA_DATA_DIR      folder holding MNIST/raw/ (required; checked before anything starts)
#   FA_PRESETS       which grids (default: report_cnn biotorch_lenet report_ann; also report_cnn_adamw,
#                    biotorch_lenet_adamw)
#   OUT              where results come back (required): one folder per sweep with each run's results.json,
#                    metrics.csv, train.log and .hydra/ (no checkpoints), the sweeps' summaries, the logs,
#                    summary_<preset>.md (fa-report's tables) and machine.txt
#   FA_DEVICE        trainer.device for every run (default cuda: no GPU is an error, never a silent CPU run)
#   FA_TIME_LIMIT    seconds each fa-train may take before it is stopped (default 330: all done in 6 min)
#   FA_WORK          where runs write while training (default: a fresh temporary folder)
# Exit code 0 only when every run completed (36 by default); otherwise 1, after copying back what there is.
set -euo pipefail

# shellcheck source=benchmarks/gpu_setup.sh
source "$(dirname "$0")/gpu_setup.sh"  # checks OUT, FA_DATA_DIR, fa-train, the GPU; cd to the repo

TIME_LIMIT="${FA_TIME_LIMIT:-330}"
PRESETS="${FA_PRESETS:-report_cnn biotorch_lenet report_ann}"
GRIDS=()
for preset in $PRESETS; do
  case $preset in
    report_ann | report_cnn) methods="bp fa dfa" ;;
    biotorch_lenet | biotorch_lenet_adamw) methods="bp fa usf brsf frsf dfa" ;;  # BioTorch's benchmark's rules
    report_cnn_adamw) methods="fa dfa" ;;  # the rules it is the recipe for
    *) die "FA_PRESETS: unknown preset $preset (report_ann, report_cnn, biotorch_lenet, report_cnn_adamw, biotorch_lenet_adamw)" ;;
  esac
  for method in $methods; do GRIDS+=("$preset $method"); done
done

# Per-method settings the AdamW presets' comments give (docs/RESULTS.md measured them); overrides given
# to this script come after them, so they win.
tuned() {
  case "$1 $2" in
    "report_cnn_adamw fa") echo "trainer.epochs=20" ;;
    "report_cnn_adamw dfa") echo "optim.lr=0.003 trainer.epochs=20" ;;
    "biotorch_lenet_adamw dfa") echo "optim.lr=0.003" ;;
  esac
}
SEEDS="0,1,2"
EXPECTED=$((${#GRIDS[@]} * 3))
CORES="$(nproc)"
THREADS=$((CORES / ${#GRIDS[@]} > 0 ? CORES / ${#GRIDS[@]} : 1))

WORK="${FA_WORK:-$(mktemp -d -t fa-results.XXXXXX)}"
mkdir -p "$WORK/logs" "$OUT"
START=$(date +%s)

copy_back() {
  # Everything but checkpoints (the model weights: megabytes each, and not needed for the tables).
  tar -C "$WORK" --exclude=checkpoint.pt -cf - . | tar -C "$OUT" -xf -
  {
    echo "made by: benchmarks/results_gpu.sh, ${#GRIDS[@]} fa-train -m (one per preset and method) at once"
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "wall seconds: $(($(date +%s) - START))"
    echo "host: $(hostname)"
    echo "cpu cores: $CORES, threads per run: $THREADS"
    echo "device: $DEVICE"
    python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)
for i in range(torch.cuda.device_count()):
    print("gpu", i, torch.cuda.get_device_name(i))'
    nvidia-smi -L 2>/dev/null || true
    echo "extra overrides: $*"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  } >"$OUT/machine.txt"
}
trap 'copy_back "$@"' EXIT

export PYTHONUNBUFFERED=1  # the logs show each run as it goes, and keep its last lines if it is killed
echo "results_gpu.sh: ${#GRIDS[@]} sweeps x seeds $SEEDS on $DEVICE, $THREADS threads each, in $WORK"
PIDS=()
for grid in "${GRIDS[@]}"; do
  read -r preset method <<<"$grid"
  read -r -a settings <<<"$(tuned "$preset" "$method")"
  timeout --signal=TERM --kill-after=30 "$TIME_LIMIT" \
    fa-train -m "experiment=$preset" "method=$method" "seed=$SEEDS" \
    "trainer.device=$DEVICE" "trainer.threads=$THREADS" \
    "hydra.sweep.dir=$WORK/$preset/$method" ${settings[@]+"${settings[@]}"} "$@" \
    >"$WORK/logs/${preset}_$method.log" 2>&1 &
  PIDS+=($!)
done

FAILED=0
for i in "${!GRIDS[@]}"; do
  rc=0
  wait "${PIDS[$i]}" || rc=$?
  elapsed=$(($(date +%s) - START))
  if [[ $rc -eq 0 ]]; then
    echo "ok      ${GRIDS[$i]} (${elapsed} s)"
  else
    FAILED=1
    case $rc in 124 | 137) why="stopped after FA_TIME_LIMIT=$TIME_LIMIT s" ;; *) why="exit code $rc" ;; esac
    echo "FAILED  ${GRIDS[$i]}: $why; last lines of $OUT/logs/${GRIDS[$i]// /_}.log:" >&2
    tail -n 5 "$WORK/logs/${GRIDS[$i]// /_}.log" | cut -c1-200 | sed 's/^/        /' >&2
  fi
done

for preset in $PRESETS; do
  if [[ -d "$WORK/$preset" ]]; then
    fa-report "$WORK/$preset" --format markdown >"$WORK/summary_$preset.md" || FAILED=1
    fa-report "$WORK/$preset" || true
  fi
done

COMPLETED=$(find "$WORK" -name results.json -exec grep -l '"status": "completed"' {} + 2>/dev/null | wc -l)
echo "results_gpu.sh: $COMPLETED of $EXPECTED runs completed in $(($(date +%s) - START)) s; files in $OUT"
if [[ $FAILED -ne 0 || $COMPLETED -ne $EXPECTED ]]; then
  echo "results_gpu.sh: error: not every run completed (see above and $OUT/logs/)" >&2
  exit 1
fi
