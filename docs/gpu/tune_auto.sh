#!/usr/bin/env bash
# `bench tune --write` then `slots: auto` / `replicas: auto` against the one
# 64-slot engine, side by side (issue 32), with an MPS control daemon running
# (started here with its default directories, stopped at the end). The h100
# engine must be built (docs/gpu/batched_replicas.sh).
#
# usage: docs/gpu/tune_auto.sh XTASK OUTDIR   (repository root; as root)
set -uo pipefail
X=$1; O=$2
mkdir -p "$O"
export LLORCH_ROOT=$PWD
trap 'echo quit | nvidia-cuda-mps-control' EXIT
nvidia-cuda-mps-control -d && echo "MPS control daemon started"
echo "== bench tune ($(date -u +%T))"
"$X" bench tune --profile h100 --clients 16,64 --slots 16,64 --replicas 1,4 --runs 1 --write > "$O/tune.txt" 2> "$O/tune.log" || tail -20 "$O/tune.log"
cat "$O/tune.txt"
for n in one-64:"--slots 64" auto:"--slots auto --replicas auto"; do
  name=${n%%:*}; flags=${n#*:}
  echo "== $name ($(date -u +%T))"
  # shellcheck disable=SC2086
  "$X" bench load --profile h100 --mode batched $flags --threads 4 --clients 16,64 --runs 3 --max-tokens 256 --json > "$O/$name.json" 2> "$O/$name.log" || tail -20 "$O/$name.log"
  grep -E "clients:|auto" "$O/$name.log" | head -6
done
