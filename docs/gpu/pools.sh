#!/usr/bin/env bash
# Two pools on two GPUs: build the sm_90 engine from an offline source bundle,
# measure `bench pools` with one pool per GPU, then run the proof
# (docs/gpu/pools_proof.py). Record the results in docs/gpu.md.
#
# Usage (repository root on a host with two GPUs; no network, no Rust):
#   docs/gpu/pools.sh path/to/xtask path/to/bundle.tar.gz OUTDIR [build|bench|proof|all]
# Make the two inputs on a connected host:
#   cargo build --release -p xtask
#   cargo xtask source bundle --profile h100 --out llama.cpp-h100.tar.gz
set -uo pipefail
X=$1; B=$2; O=$3; PHASE=${4:-all}
mkdir -p "$O"
export LLORCH_ROOT=$PWD
step() { echo "== $1 ($(date -u +%T))"; }
{
  date -u
  nvidia-smi --query-gpu=index,name,driver_version,memory.total,compute_cap --format=csv
  nvidia-smi topo -m 2>/dev/null | head -5
  nvcc --version | tail -2; gcc --version | head -1; cmake --version | head -1; echo "cores: $(nproc)"
} > "$O/machine.txt" 2>&1
if [[ $PHASE == build || $PHASE == all ]]; then
  step build
  "$X" engine build --profile h100 --source-bundle "$B" --json > "$O/build.json" 2> "$O/build.log" || { tail -60 "$O/build.log"; exit 1; }
  step model; "$X" model fetch --profile h100 --json > "$O/model.json" 2> "$O/model.log" || { tail -30 "$O/model.log"; exit 1; }
fi
if [[ $PHASE == bench || $PHASE == all ]]; then
  step bench-pools
  "$X" bench pools --profile h100 --devices 0,1 --runs 11 --max-tokens 256 --json > "$O/bench_pools.json" 2> "$O/bench_pools.log" || tail -40 "$O/bench_pools.log"
  cat "$O/bench_pools.json"
fi
if [[ $PHASE == proof || $PHASE == all ]]; then
  step proof; python3 docs/gpu/pools_proof.py "$X" "$O" > "$O/proof.out" 2> "$O/proof.err" || tail -40 "$O/proof.err"
  python3 -c "import json,sys; d=json.load(open('$O/pools_proof.json')); print(json.dumps(d['checks'], indent=1)); print('all_passed', d['all_passed'])"
fi
step done
