#!/usr/bin/env bash
# Many clients on one GPU: build the sm_90 engine from an offline source
# bundle, then `bench load` for the three ways to serve concurrent clients
# (one exact engine, exact replicas, one batched engine), each through the
# orchestrator and straight against the same engines, alternating.
# Record the results in docs/gpu.md.
#
# Usage (repository root on a GPU host; no network, no Rust):
#   docs/gpu/load.sh path/to/xtask path/to/bundle.tar.gz OUTDIR [build|bench|all] [DEVICES]
# DEVICES (e.g. 0,1) places exact replicas one per GPU; default: GPU 0 only.
# Make the two inputs on a connected host:
#   cargo build --release -p xtask
#   cargo xtask source bundle --profile h100 --out llama.cpp-h100.tar.gz
set -uo pipefail
X=$1; B=$2; O=$3; PHASE=${4:-all}; DEV=${5:-0}
mkdir -p "$O"
export LLORCH_ROOT=$PWD
step() { echo "== $1 ($(date -u +%T))"; }
{
  date -u
  nvidia-smi --query-gpu=index,name,driver_version,memory.total,compute_cap --format=csv
  nvcc --version | tail -2; gcc --version | head -1; cmake --version | head -1; echo "cores: $(nproc)"
} > "$O/machine.txt" 2>&1
if [[ $PHASE == build || $PHASE == all ]]; then
  step build
  "$X" engine build --profile h100 --source-bundle "$B" --json > "$O/build.json" 2> "$O/build.log" || { tail -60 "$O/build.log"; exit 1; }
  step model; "$X" model fetch --profile h100 --json > "$O/model.json" 2> "$O/model.log" || { tail -30 "$O/model.log"; exit 1; }
fi
if [[ $PHASE == bench || $PHASE == all ]]; then
  n=$(echo "$DEV" | tr ',' '\n' | wc -l)
  step batched
  "$X" bench load --profile h100 --mode batched --slots 16 --clients 1,16,64 --runs 3 --max-tokens 256 --json > "$O/load_batched.json" 2> "$O/load_batched.log" || tail -20 "$O/load_batched.log"
  step exact-one
  "$X" bench load --profile h100 --clients 1,16 --runs 3 --max-tokens 128 --devices "${DEV%%,*}" --json > "$O/load_exact1.json" 2> "$O/load_exact1.log" || tail -20 "$O/load_exact1.log"
  step exact-replicas
  "$X" bench load --profile h100 --replicas $(( n > 1 ? n : 2 )) --devices "$DEV" --clients 1,16 --runs 3 --max-tokens 128 --json > "$O/load_replicas.json" 2> "$O/load_replicas.log" || tail -20 "$O/load_replicas.log"
  grep -h "clients:" "$O"/load_*.log
fi
step done
