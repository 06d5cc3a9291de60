#!/usr/bin/env bash
# `server.mps: own` on a GPU host (issue 32): llama-orch starts its own MPS
# control daemon for the pool (pipe and log under the runtime directory),
# its four 16-slot engines join it, and it is stopped with the pool; then an
# engine crash under it (docs/gpu/mps_isolation.py). The h100 engine must be
# built already (docs/gpu/batched_replicas.sh does). No other MPS daemon may
# run: the pool would be refused (that refusal is checked first).
#
# usage: docs/gpu/mps_own.sh XTASK OUTDIR   (repository root; as root)
set -uo pipefail
X=$1; O=$2
mkdir -p "$O"
export LLORCH_ROOT=$PWD
P=/tmp/h100-mps-own.yaml
sed 's/^server:/server:\n  mps: own/' requirements/h100.yaml > "$P"
echo "== refused while a system daemon runs"
nvidia-cuda-mps-control -d
"$X" bench load --profile "$P" --mode batched --slots 16 --replicas 4 --clients 4 --runs 1 --max-tokens 8 2>&1 | grep -E "error|hint" | head -3
echo quit | nvidia-cuda-mps-control; sleep 1
echo "== bench load, the pool's own daemon"
"$X" bench load --profile "$P" --mode batched --slots 16 --replicas 4 --threads 4 --clients 64 --runs 2 --max-tokens 256 --json > "$O/own.json" 2> "$O/own.log"
grep -E "clients:|MPS control daemon" "$O/own.log"
pgrep -a nvidia-cuda-mps || echo "no MPS daemon left after the pool stopped"
echo "== crash isolation under the pool's own daemon"
"$X" serve --profile "$P" --mode batched --slots 16 --replicas 4 --addr 127.0.0.1:18098 > "$O/serve.out" 2> "$O/serve.err" &
serve=$!
for _ in $(seq 1 600); do curl -sf 127.0.0.1:18098/readyz > /dev/null && break; sleep 0.5; done
grep -E "MPS" "$O/serve.err"
python3 docs/gpu/mps_isolation.py http://127.0.0.1:18098
kill -TERM $serve; wait $serve
grep -E "MPS control daemon stopped" "$O/serve.err"
pgrep -a nvidia-cuda-mps || echo "no MPS daemon left after serve stopped"
