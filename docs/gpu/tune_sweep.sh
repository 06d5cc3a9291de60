#!/usr/bin/env bash
# Issue 32 on one GPU, in three device calls on one warm machine (each call
# stays under the 10-minute limit; the cache under the repository root is
# kept between calls while the machine is warm, and rebuilt when it is not):
#   build  the h100 engine and model, then the single 64-slot engine
#          (`bench load --slots 64 --clients 16,64 --runs 3`)
#   tune   `bench tune --clients 16,64 --slots 8,16,32,64 --replicas 1,2,4
#          --runs 1 --write` under an MPS control daemon
#   auto   `bench load --slots auto --replicas auto --vs-defaults`: auto's
#          choice from that table, the same engines direct, and the same
#          llama-server started by hand with its defaults, alternating
#   variants  `bench tune` over the engine flag sets (split, unified-kv,
#          no-flash-attn, q8-kv, batch-2048) for one 64-slot engine, then for
#          4 engines x 32 slots (--write), then `bench load --slots auto
#          --replicas auto --runs 1` from that table
# An MPS control daemon is started with its default directories for tune and
# auto and stopped at the end of the call (also on failure).
#
# usage: docs/gpu/tune_sweep.sh PHASE XTASK BUNDLE SCCACHE OUTDIR   (repository root; as root)
set -uo pipefail
P=$1; X=$2; B=$3; S=$4; O=$5
mkdir -p "$O"
export LLORCH_ROOT=$PWD
step() { echo "== $1 ($(date -u +%T))"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
# A cache hit on a warm machine takes seconds; a cold one builds (3-5 min).
step "engine build, model fetch"
mkdir -p cache/tools-v1/sccache-0.16.0/bin
cp "$S" cache/tools-v1/sccache-0.16.0/bin/sccache
"$X" engine build --profile h100 --source-bundle "$B" --json > "$O/build-$P.json" 2> "$O/build-$P.log" || { tail -40 "$O/build-$P.log"; exit 1; }
"$X" model fetch --profile h100 --json > "$O/model-$P.json" 2> "$O/model-$P.log" || { tail -20 "$O/model-$P.log"; exit 1; }
mps() {
  trap 'echo quit | nvidia-cuda-mps-control' EXIT
  nvidia-cuda-mps-control -d && echo "MPS control daemon started"
}
load() { # NAME FLAGS...
  local n=$1; shift
  step "$n"
  "$X" bench load --profile h100 --mode batched "$@" --clients 16,64 --runs 3 --max-tokens 256 --json > "$O/$n.json" 2> "$O/$n.log" || tail -20 "$O/$n.log"
  grep -E "clients:|auto" "$O/$n.log" | head -8
}
case $P in
  build) load one-64 --slots 64 --threads 4 ;;
  tune)
    mps
    step tune
    "$X" bench tune --profile h100 --clients 16,64 --slots 8,16,32,64 --replicas 1,2,4 --runs 1 --write --json > "$O/tune.json" 2> "$O/tune.log" || tail -20 "$O/tune.log"
    grep -E "clients:|auto would|did not start" "$O/tune.log"
    cp cache/tune-v1/*.json "$O/" 2>/dev/null ;;
  auto)
    mps
    load auto --slots auto --replicas auto --threads 4 --vs-defaults ;;
  variants)
    mps
    step "tune with engine flag sets"
    "$X" bench tune --profile h100 --clients 16,64 --slots 64 --replicas 1 --variants split,unified-kv,no-flash-attn,q8-kv,batch-2048 --runs 1 --json > "$O/variants-one.json" 2> "$O/variants-one.log" || tail -20 "$O/variants-one.log"
    grep -E "clients:|did not start" "$O/variants-one.log"
    "$X" bench tune --profile h100 --clients 16,64 --slots 32 --replicas 4 --variants split,unified-kv,no-flash-attn,q8-kv,batch-2048 --runs 1 --write --json > "$O/variants.json" 2> "$O/variants.log" || tail -20 "$O/variants.log"
    grep -E "clients:|auto would|did not start" "$O/variants.log"
    cp cache/tune-v1/*.json "$O/" 2>/dev/null
    step "auto from that table"
    "$X" bench load --profile h100 --mode batched --slots auto --replicas auto --threads 4 --clients 16,64 --runs 1 --max-tokens 256 --json > "$O/auto-variants.json" 2> "$O/auto-variants.log" || tail -20 "$O/auto-variants.log"
    grep -E "clients:|auto" "$O/auto-variants.log" | head -6 ;;
  *) echo "phase: build, tune, auto or variants"; exit 2 ;;
esac
step done
