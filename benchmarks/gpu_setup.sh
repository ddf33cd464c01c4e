# Sourced by the GPU scripts (results_gpu.sh, inside_the_learning_gpu.sh): the checks they make before
# anything starts, and the move to the repository root. Reads OUT, FA_DATA_DIR and FA_DEVICE; sets DEVICE.
# Every failure is one line and exit code 2.

die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }

[[ -n "${OUT:-}" ]] || die "set OUT to the folder the results should go to"
[[ -n "${FA_DATA_DIR:-}" ]] || die "set FA_DATA_DIR to the folder that holds MNIST/raw/"
for name in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
  [[ -f "$FA_DATA_DIR/MNIST/raw/$name" ]] || die "$FA_DATA_DIR/MNIST/raw/$name not found (FA_DATA_DIR=$FA_DATA_DIR)"
done
# Absolute paths: the script moves to the repository root next.
FA_DATA_DIR="$(cd "$FA_DATA_DIR" && pwd)"
export FA_DATA_DIR
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z "${VIRTUAL_ENV:-}" && -f .venv/bin/activate ]]; then
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
command -v fa-train >/dev/null || die "fa-train not on PATH: install the project (pip install -e .) or activate its .venv"

DEVICE="${FA_DEVICE:-cuda}"  # never a silent CPU run: no GPU is an error
if [[ "$DEVICE" == cuda* ]]; then
  python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || die "FA_DEVICE=$DEVICE but torch sees no GPU (torch $(python -c 'import torch; print(torch.__version__)'))"
fi
