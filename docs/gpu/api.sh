#!/usr/bin/env bash
# The client API on one GPU: build the sm_90 engine from an offline source
# bundle, then `bench openai` (streamed chat, a forced tool call, embeddings
# inputs/s; each through the orchestrator and straight against the same
# engine, alternating). Record the results in docs/gpu.md.
#
# Usage (repository root on a GPU host; no network, no Rust):
#   docs/gpu/api.sh path/to/xtask path/to/bundle.tar.gz OUTDIR [RUNS]
# Make the two inputs on a connected host:
#   cargo build --release -p xtask
#   cargo xtask source bundle --profile h100 --out llama.cpp-h100.tar.gz
set -uo pipefail
X=$1; B=$2; O=$3; RUNS=${4:-9}
mkdir -p "$O"
export LLORCH_ROOT=$PWD
step() { echo "== $1 ($(date -u +%T))"; }
{
  date -u
  nvidia-smi --query-gpu=index,name,driver_version,memory.total,compute_cap --format=csv
  nvcc --version | tail -2; gcc --version | head -1; cmake --version | head -1; echo "cores: $(nproc)"
} > "$O/machine.txt" 2>&1
step build
"$X" engine build --profile h100 --source-bundle "$B" --json > "$O/build.json" 2> "$O/build.log" || { tail -60 "$O/build.log"; exit 1; }
step model; "$X" model fetch --profile h100 --json > "$O/model.json" 2> "$O/model.log" || { tail -30 "$O/model.log"; exit 1; }
step bench-openai
"$X" bench openai --profile h100 --runs "$RUNS" --max-tokens 256 --json > "$O/openai.json" 2> "$O/openai.log" || tail -30 "$O/openai.log"
cat "$O/openai.json"
step done
