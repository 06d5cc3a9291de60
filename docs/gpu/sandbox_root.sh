#!/usr/bin/env bash
# Issue 33 as root on a GPU host: CUDA engines on a unix socket, in a network
# namespace of their own, run by the dedicated user `llama-orch`.
#   check  build the h100 engine and model; `provision` a detached engine and
#          read what the kernel says of it (uids, groups, NoNewPrivs, Seccomp,
#          its network namespace and TCP sockets), one completion through its
#          socket with curl, `engine down`; then the same as a client of the
#          machine's MPS control daemon (started by root here)
#   bench  `bench sandbox --runs 6` (the same engine sandboxed, now with all
#          of the above, vs unconfined, alternating), then `bench load
#          --slots 32 --replicas 4 --clients 16,64 --runs 3` under MPS
#          (orchestrator vs the same engines direct, both through the sockets)
#
# usage: docs/gpu/sandbox_root.sh PHASE XTASK BUNDLE SCCACHE OUTDIR   (repository root; as root)
set -uo pipefail
P=$1; X=$2; B=$3; S=$4; O=$5
mkdir -p "$O"
export LLORCH_ROOT=$PWD
step() { echo "== $1 ($(date -u +%T))"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
id llama-orch 2>/dev/null || useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin llama-orch
id llama-orch
step "engine build, model fetch"
mkdir -p cache/tools-v1/sccache-0.16.0/bin
cp "$S" cache/tools-v1/sccache-0.16.0/bin/sccache
"$X" engine build --profile h100 --source-bundle "$B" --json > "$O/build-$P.json" 2> "$O/build-$P.log" || { tail -40 "$O/build-$P.log"; exit 1; }
"$X" model fetch --profile h100 --json > "$O/model-$P.json" 2> "$O/model-$P.log" || { tail -20 "$O/model-$P.log"; exit 1; }
mps() {
  trap 'echo quit | nvidia-cuda-mps-control' EXIT
  nvidia-cuda-mps-control -d && echo "MPS control daemon started (root)"
}
engine() { # NAME
  step "provision ($1)"
  "$X" provision --profile h100 --json > "$O/provision-$1.json" 2> "$O/provision-$1.log" || { tail -30 "$O/provision-$1.log"; return 1; }
  python3 -c "import json,sys; print('sandbox:', json.load(open(sys.argv[1])).get('sandbox'))" "$O/provision-$1.json"
  local url pid sock pool
  url=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['url'])" "$O/provision-$1.json")
  pid=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['pid'])" "$O/provision-$1.json")
  pool=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['pool_id'])" "$O/provision-$1.json")
  sock=${url#unix:}
  echo "url $url pid $pid"
  grep -E "^(Uid|Gid|Groups|NoNewPrivs|Seccomp):" "/proc/$pid/status"
  echo "netns engine $(readlink /proc/$pid/ns/net) self $(readlink /proc/self/ns/net)"
  echo "tcp sockets in its namespace: $(($(wc -l < /proc/$pid/net/tcp) - 1)) v4, $(($(wc -l < /proc/$pid/net/tcp6) - 1)) v6"
  ls -ld "$(dirname "$sock")" "$sock"
  curl -s --unix-socket "$sock" http://localhost/completion -H 'content-type: application/json' \
    -d '{"prompt":"Once upon a time","n_predict":32,"ignore_eos":true,"temperature":0}' \
    | python3 -c "import json,sys; d=json.load(sys.stdin); print('completion:', d['tokens_predicted'], 'tokens,', round(d['timings']['predicted_per_second']), 'tok/s')"
  grep -ihE "CUDA0|offloaded" "$PWD/cache/run/llamacpp-$pool.log" | head -3
  "$X" engine down --pool "$pool" 2>&1 | tail -1
}
case $P in
  check)
    engine plain
    mps
    engine mps-client ;;
  bench)
    step "bench sandbox"
    "$X" bench sandbox --profile h100 --runs 6 --json > "$O/sandbox.json" 2> "$O/sandbox.log" || tail -20 "$O/sandbox.log"
    cat "$O/sandbox.json"
    mps
    step "bench load 4 x 32 under MPS"
    "$X" bench load --profile h100 --mode batched --slots 32 --replicas 4 --threads 4 --clients 16,64 --runs 3 --max-tokens 256 --json > "$O/load.json" 2> "$O/load.log" || tail -20 "$O/load.log"
    grep -E "clients:|sandbox" "$O/load.log" | head -8 ;;
  *) echo "phase: check or bench"; exit 2 ;;
esac
step done
