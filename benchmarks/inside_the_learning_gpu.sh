#!/usr/bin/env bash
# The GPU half of docs/RESULTS.md's "inside the learning" section: the report's CNN trained with every
# rule (bp fa dfa usf brsf frsf kp shallow) x seeds, with alignment diagnostics during training and a
# PGD attack (FA_ATTACK) on the test set after it; then the sweep's tables and figures. All runs start
# at once, one CPU thread each: a run of this small model keeps one core busy launching kernels and
# leaves the GPU mostly idle, so 16 of them share one GPU. Meant to finish within 3 minutes on 16 cores and one H100.
#
#   FA_DATA_DIR=/data OUT=/tmp/inside benchmarks/inside_the_learning_gpu.sh              # the real thing
#   FA_DATA_DIR=/data OUT=/tmp/tiny FA_DEVICE=cpu FA_SEEDS="0" \
#     benchmarks/inside_the_learning_gpu.sh trainer.epochs=1 dataset.subset=512 eval.steps=2   # a CPU check
#
# Arguments are extra overrides for every run (e.g. experiment=report_cnn for the tuned recipe).
# Environment:
#   FA_DATA_DIR    folder holding MNIST/raw/ (required; checked before anything starts)
#   OUT            where results come back (required): cnn/ with a folder per run (results.json,
#                  metrics.csv, alignment.csv, train.log, curves.png, alignment.png; no checkpoints),
#                  cnn/summary.md and the sweep figures (cnn/mnist_cnn_*.png), logs/, machine.txt
#   FA_DEVICE      trainer.device (default cuda: no GPU is an error, never a silent CPU run)
#   FA_SEEDS       seeds, space-separated (default "0 1")
#   FA_EPOCHS      trainer.epochs (default 5)
#   FA_ATTACK      eval.attack (default pgd; fgsm is one gradient per epsilon instead of ten)
#   FA_TIME_LIMIT  seconds each run may take before it is stopped (default 140)
# Exit code 0 only when every run completed; otherwise 1, after copying back whatever there is.
set -euo pipefail

# shellcheck source=benchmarks/gpu_setup.sh
source "$(dirname "$0")/gpu_setup.sh"  # checks OUT, FA_DATA_DIR, fa-train, the GPU; cd to the repo

read -r -a SEEDS <<<"${FA_SEEDS:-0 1}"
EPOCHS="${FA_EPOCHS:-5}"
ATTACK="${FA_ATTACK:-pgd}"
TIME_LIMIT="${FA_TIME_LIMIT:-140}"
METHODS=(bp fa dfa usf brsf frsf kp shallow)

WORK="$(mktemp -d -t fa-inside.XXXXXX)"
mkdir -p "$WORK/logs" "$WORK/cnn"
START=$(date +%s)

copy_back() {
  tar -C "$WORK" --exclude=checkpoint.pt -cf - . | tar -C "$OUT" -xf -
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "wall seconds: $(($(date +%s) - START))"
    echo "cpu cores: $(nproc), device: $DEVICE, epochs: $EPOCHS, seeds: ${SEEDS[*]}, attack: $ATTACK"
    python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)
for i in range(torch.cuda.device_count()):
    print("gpu", i, torch.cuda.get_device_name(i))'
    echo "extra overrides: $*"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  } >"$OUT/machine.txt"
}
trap 'copy_back "$@"' EXIT

JOBS=()
PIDS=()
for method in "${METHODS[@]}"; do
  for seed in "${SEEDS[@]}"; do
    name="${method}_seed$seed"
    timeout --signal=TERM --kill-after=15 "$TIME_LIMIT" \
      fa-train model=cnn "method=$method" "seed=$seed" "trainer.epochs=$EPOCHS" \
      diagnostics.every=50 "eval.attack=$ATTACK" "eval.eps=[0,0.05,0.1,0.2,0.3]" \
      "trainer.device=$DEVICE" trainer.threads=1 "hydra.run.dir=$WORK/cnn/$name" "$@" \
      >"$WORK/logs/$name.log" 2>&1 &
    JOBS+=("$name")
    PIDS+=($!)
  done
done
echo "inside_the_learning_gpu.sh: ${#JOBS[@]} runs on $DEVICE in $WORK"

FAILED=0
for i in "${!JOBS[@]}"; do
  rc=0
  wait "${PIDS[$i]}" || rc=$?
  if [[ $rc -ne 0 ]]; then
    FAILED=1
    echo "FAILED  ${JOBS[$i]}: exit code $rc; last lines of $OUT/logs/${JOBS[$i]}.log:" >&2
    tail -n 5 "$WORK/logs/${JOBS[$i]}.log" | sed 's/^/        /' >&2
  fi
done
echo "inside_the_learning_gpu.sh: runs done in $(($(date +%s) - START)) s"

fa-report "$WORK/cnn" --write --plots || FAILED=1
echo "inside_the_learning_gpu.sh: done in $(($(date +%s) - START)) s; files in $OUT"
exit $FAILED
