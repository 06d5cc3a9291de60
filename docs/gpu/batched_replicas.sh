#!/usr/bin/env bash
# Several batched engines on one GPU, through the orchestrator (issue 32):
# one 64-slot engine, then four 16-slot engines of one pool with NVIDIA MPS
# running, each measured by `bench load` (64 streaming clients, 256 tokens,
# the orchestrator and the same engines addressed directly, alternating).
# The MPS control daemon is started here with its default directories and
# stopped at the end (also on failure).
#
# Usage (repository root on the GPU host; no network, no Rust; as root):
#   docs/gpu/batched_replicas.sh XTASK BUNDLE SCCACHE OUTDIR
# Make the inputs on a connected host:
#   cargo build --release -p xtask
#   cargo xtask source bundle --profile h100 --out llama.cpp-h100.tar.gz
set -uo pipefail
X=$1; B=$2; S=$3; O=$4
mkdir -p "$O"
export LLORCH_ROOT=$PWD
step() { echo "== $1 ($(date -u +%T))"; }
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
  nvcc --version | tail -1; echo "cores: $(nproc)"
} > "$O/machine.txt" 2>&1
cat "$O/machine.txt"
mkdir -p cache/tools-v1/sccache-0.16.0/bin
cp "$S" cache/tools-v1/sccache-0.16.0/bin/sccache
step build
"$X" engine build --profile h100 --source-bundle "$B" --json > "$O/build.json" 2> "$O/build.log" || { tail -40 "$O/build.log"; exit 1; }
python3 -c "import json; d=json.load(open('$O/build.json')); print('fingerprint', d['fingerprint'][:12], 'duration_s', round(d['duration_s'], 1))"
step model
"$X" model fetch --profile h100 --json > "$O/model.json" 2> "$O/model.log" || { tail -20 "$O/model.log"; exit 1; }
load() { # NAME FLAGS...
  local n=$1; shift
  step "$n"
  "$X" bench load --profile h100 --mode batched "$@" --clients 64 --runs 2 --max-tokens 256 --json > "$O/$n.json" 2> "$O/$n.log" || tail -20 "$O/$n.log"
  grep "clients:" "$O/$n.log"
}
load one-64 --slots 64
step "mps start"
trap 'echo quit | nvidia-cuda-mps-control' EXIT
nvidia-cuda-mps-control -d && echo "MPS control daemon started"
load four-16-mps --slots 16 --replicas 4 --threads 4
echo quit | nvidia-cuda-mps-control && trap - EXIT && echo "MPS control daemon stopped"
step done
