#!/bin/bash
# Interleaved A/B of two lmx source trees on the CPU, in one session (RESULTS.md, "Refactor check").
# Usage: benchmarks/ab_source_trees.sh BEFORE_DIR AFTER_DIR [ROUNDS] [lmx bench options...]
# Each DIR is a checkout (e.g. `git archive <commit> | tar -x -C DIR`, plus the built kernels
# copied into DIR/src/lmx/kernels/). Prints one JSON line per run (medians of lmx bench), then
# the step ops of each tree (benchmarks/step_ops.py).
set -u
before=$1; after=$2; rounds=${3:-3}; shift $(( $# < 3 ? $# : 3 ))
python=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
for i in $(seq 1 "$rounds"); do
  if [ $((i % 2)) = 1 ]; then order="$before $after"; else order="$after $before"; fi
  for dir in $order; do
    echo "== $dir round $i $(date -u +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg)"
    (cd "$dir" && PYTHONPATH="$dir/src" $python -m lmx.cli.main bench --device cpu --json "$@" 2>/dev/null |
      $python -c "import json,sys; r=json.load(sys.stdin); print(json.dumps({k: r[k] for k in r if k != 'runs'}))")
  done
done
for dir in "$before" "$after" "$after" "$before"; do
  echo "== step ops $dir"
  (cd "$dir" && PYTHONPATH="$dir/src" $python "$here/step_ops.py" 2>/dev/null)
done
