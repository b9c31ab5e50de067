#!/usr/bin/env bash
# The allocator comparison grid (W2A2, W3A3, W4A4 x every allocator, seed 0) with one sweep process per
# run, all at once. On one GPU the ResNet-20 steps are bound by kernel launches, so runs in separate
# processes overlap on the device; each process keeps one CPU thread. Every run is resumable (started
# again, finished runs are skipped). Each OUT/W<bits>-<allocator>/results.csv holds one row;
# results/cifar10/README.md shows how they were merged into one table.
# Usage: scripts/parallel_grid.sh DATA_ROOT OUT [REFINE_EPOCHS] [EXTRA SWEEP ARGS...]
# Narrow it with POINTS (default "2 3 4"), METHODS (default all five allocators), SEEDS (default "0").
set -euo pipefail
if [[ $# -lt 2 ]]; then
    echo "usage: $0 DATA_ROOT OUT [REFINE_EPOCHS] [EXTRA SWEEP ARGS...]" >&2
    exit 2
fi
data=$1 out=$2 epochs=${3:-15}
shift $(( $# < 3 ? $# : 3 ))
python=${PYTHON:-python3}
mkdir -p "$out"
pids=()
for bits in ${POINTS:-2 3 4}; do
    for method in ${METHODS:-uniform random class_count sensitivity classpath}; do
        for seed in ${SEEDS:-0}; do
            run="$out/W$bits-$method-s$seed"
            "$python" -m cpq_lib.sweep --profile cifar10 --data-root "$data" --out "$run" \
                --grid allocation.weight_bits,allocation.act_bits=$bits:$bits --grid allocation.method=$method \
                --set seed="$seed" --set refine.epochs="$epochs" --set threads=1 --no-progress "$@" > "$run.log" 2>&1 &
            pids+=($!)
        done
    done
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
