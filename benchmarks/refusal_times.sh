#!/bin/bash
# How long fa-train takes to refuse a bad config, and to print --help: the working tree against an
# earlier commit, alternating, three rounds, each command after both cores were >= 95 % idle for 12 s.
#
#   benchmarks/refusal_times.sh f5377c9      # from the repository root, with .venv set up (README)
#
# The earlier commit runs from a temporary git worktree put first on PYTHONPATH (it takes precedence
# over the editable install of the working tree); the worktree is removed at the end.
set -u
base=${1:?usage: benchmarks/refusal_times.sh COMMIT}
root=$(pwd)
py=$root/.venv/bin/python
work=$(mktemp -d)
git worktree add -q "$work/base" "$base" || exit 1
trap 'git -C "$root" worktree remove --force "$work/base"; rm -rf "$work"' EXIT

wait_idle() {  # until both cores are >= 95 % idle for 12 consecutive 1-s samples of /proc/stat
  local ok=0 u n s i w x y z t1 t2 i1 i2
  while [ $ok -lt 12 ]; do
    read -r _ u n s i w x y z _ < /proc/stat; t1=$((u + n + s + i + w + x + y + z)); i1=$((i + w))
    sleep 1
    read -r _ u n s i w x y z _ < /proc/stat; t2=$((u + n + s + i + w + x + y + z)); i2=$((i + w))
    if [ $(((i2 - i1) * 100)) -ge $((95 * (t2 - t1))) ]; then ok=$((ok + 1)); else ok=0; fi
  done
}

cd "$work" || exit 1
for round in 1 2 3; do
  for version in before after; do
    path=""
    [ $version = before ] && path=$work/base/src
    for args in "method=dfx" "optim.lr=-0.1" "--help"; do
      wait_idle
      start=$(date +%s.%N)
      PYTHONPATH=$path $py -m fa_cli.train $args "hydra.run.dir=$work/run" >/dev/null 2>&1
      status=$?
      end=$(date +%s.%N)
      printf "%s round %s %-6s %-14s exit %s %.2f s\n" "$(date +%H:%M:%S)" $round $version "$args" $status \
        "$(echo "$end - $start" | bc)"
    done
  done
done
