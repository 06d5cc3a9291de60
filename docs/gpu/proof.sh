#!/usr/bin/env bash
# The H100 proof, one run: build the sm_90 engine from an offline source
# bundle, then measure provisioned vs hand-launched, GPU vs --n-gpu-layers 0,
# and run the haiku proof (determinism, cancel) on the GPU.
#
# Usage (from the repository root on the GPU host; no network, no Rust):
#   docs/gpu/proof.sh path/to/xtask path/to/bundle.tar.gz OUTDIR
# Make the two inputs on a connected host:
#   cargo build --release -p xtask -p test-harness-e2e-haiku
#   cargo xtask source bundle --profile h100 --out llama.cpp-h100.tar.gz
set -uo pipefail
X=$1; B=$2; O=$3
mkdir -p "$O"
export LLORCH_ROOT=$PWD
step() { echo "== $1 ($(date -u +%T))"; }
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
  nvcc --version | tail -2; gcc --version | head -1; cmake --version | head -1; echo "cores: $(nproc)"
} > "$O/machine.txt" 2>&1
step doctor; "$X" doctor --profile h100 > "$O/doctor.txt" 2>&1
step build
"$X" engine build --profile h100 --source-bundle "$B" --json > "$O/build.json" 2> "$O/build.log" || { tail -60 "$O/build.log"; exit 1; }
step model; "$X" model fetch --profile h100 --json > "$O/model.json" 2> "$O/model.log"
# `xtask haiku` runs the proof through cargo; without a Rust toolchain, run
# its binary (built next to xtask: cargo build --release -p test-harness-e2e-haiku).
step haiku; "$(dirname "$X")/llorch-haiku" --profile requirements/h100.yaml --json > "$O/haiku.json" 2> "$O/haiku.log"
step hand-vs-provisioned-gpu; python3 docs/gpu/hand_vs_provisioned.py "$X" h100 5 256 > "$O/gpu.json" 2> "$O/gpu.log"
sed 's/n_gpu_layers: 999/n_gpu_layers: 0/' requirements/h100.yaml > /tmp/h100-ngl0.yaml
step ngl0; python3 docs/gpu/hand_vs_provisioned.py "$X" /tmp/h100-ngl0.yaml 2 64 > "$O/ngl0.json" 2> "$O/ngl0.log"
step stream-bench; "$X" bench stream --profile h100 --json --runs 5 --max-tokens 256 > "$O/stream.json" 2> "$O/stream.log"
step openai-bench; "$X" bench openai --profile h100 --json --runs 9 --max-tokens 256 > "$O/openai.json" 2> "$O/openai.log"
step done
tar -czf "$O.tgz" -C "$O" . && echo "results: $O.tgz"
