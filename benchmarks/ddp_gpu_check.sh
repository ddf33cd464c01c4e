#!/usr/bin/env bash
# The torchrun path on one GPU: `torchrun --nproc_per_node=1 -m fa_cli.train ... trainer.device=cuda`
# trains with DistributedDataParallel over NCCL, and ends with the weights of a plain one-process run
# of the same config on the same GPU (dfa: projected output error; kp: B takes W's gradient after DDP
# has averaged it, fa_cli.alignment.train_feedback). Then one epoch of a torchvision ResNet-18 under
# torchrun, whose BatchNorm becomes SyncBatchNorm on CUDA. Five short runs, one after another; each
# starts its own processes.
#
#   OUT=/tmp/ddp benchmarks/ddp_gpu_check.sh                      # generated data
#   OUT=/tmp/ddp FA_DATA_DIR=/data benchmarks/ddp_gpu_check.sh    # MNIST, from /data/MNIST/raw/
#
# Arguments are extra overrides for every run. Writes under $OUT (required): each run's folder (without
# checkpoints) and check.txt, the table of what was compared. Exit code 0 only when every run completed
# and the weights agree; 1 otherwise.
set -euo pipefail

die() { echo "ddp_gpu_check.sh: error: $*" >&2; exit 2; }
[[ -n "${OUT:-}" ]] || die "set OUT to the folder the results should go to"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
if [[ -z "${VIRTUAL_ENV:-}" && -f .venv/bin/activate ]]; then
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || die "no CUDA GPU visible"

if [[ -n "${FA_DATA_DIR:-}" ]]; then
  [[ -f "$FA_DATA_DIR/MNIST/raw/train-images-idx3-ubyte" ]] || die "no MNIST/raw/ under FA_DATA_DIR=$FA_DATA_DIR"
  data=(dataset=mnist "dataset.root=$(cd "$FA_DATA_DIR" && pwd)")
else
  data=(dataset=synthetic dataset.train_size=20000 dataset.test_size=2000)
fi
common=("${data[@]}" model=cnn trainer.epochs=3 trainer.batch_size=128 trainer.device=cuda seed=0 "$@")
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
torchrun=(python -m torch.distributed.run --standalone --nproc_per_node=1 -m fa_cli.train)

status=0
for method in dfa kp; do
  "${torchrun[@]}" "${common[@]}" "method=$method" "hydra.run.dir=$work/ddp_$method" > "$work/ddp_$method.log" 2>&1 || status=1
  python -m fa_cli.train "${common[@]}" "method=$method" "hydra.run.dir=$work/single_$method" > "$work/single_$method.log" 2>&1 || status=1
done
# SyncBatchNorm under DDP: a torchvision ResNet-18 on 3-channel 32x32 generated images, one epoch.
"${torchrun[@]}" dataset=synthetic dataset.train_size=5000 dataset.test_size=1000 dataset.channels=3 \
  dataset.image_size=32 model=torchvision model.name=resnet18 method=fa trainer.epochs=1 trainer.device=cuda \
  "hydra.run.dir=$work/ddp_resnet18_fa" > "$work/ddp_resnet18_fa.log" 2>&1 || status=1

python - "$work" > "$OUT/check.txt" <<'EOF' || status=1
import json, sys
from pathlib import Path

import torch

work = Path(sys.argv[1])
print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
print("| run | status | processes | test accuracy | wall s | max abs weight difference vs one process |")
print("|---|---|---:|---:|---:|---:|")
ok = True
for name in ("ddp_dfa", "single_dfa", "ddp_kp", "single_kp", "ddp_resnet18_fa"):
    try:
        r = json.loads((work / name / "results.json").read_text())
    except OSError:
        print(f"| {name} | no results.json | | | | |")
        ok = False
        continue
    ok &= r["status"] == "completed"
    diff = ""
    if name.startswith("ddp_") and (work / name.replace("ddp_", "single_") / "checkpoint.pt").is_file():
        a = torch.load(work / name / "checkpoint.pt", weights_only=True)["model"]
        b = torch.load(work / name.replace("ddp_", "single_") / "checkpoint.pt", weights_only=True)["model"]
        worst = max((a[k].double() - b[k].double()).abs().max().item() for k in b)
        ok &= a.keys() == b.keys() and worst <= 1e-4
        diff = f"{worst:.3g}"
    acc = r.get("test_accuracy")
    acc = "—" if acc is None else f"{acc:.2f} %"
    print(f"| {name} | {r['status']} | {r.get('processes')} | {acc} | {r.get('wall_seconds')} | {diff} |")
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
EOF
cat "$OUT/check.txt"
# everything but the checkpoints comes back
(cd "$work" && find . -name checkpoint.pt -prune -o -type f -print | tar -cf - -T -) | (cd "$OUT" && tar -xf -)
exit "$status"
