#!/usr/bin/env bash
# The CUDA engine under the full sandbox (issue 33), on a GPU host with the
# engine built (`engine build --profile h100` done): `serve --profile h100`,
# the engine's /proc status (Landlock shows as NoNewPrivs and Seccomp lines,
# the sandbox as capabilities report it), and one completion through it.
#
# usage: docs/gpu/sandbox_engine.sh XTASK OUTDIR   (repository root; as root)
set -uo pipefail
X=$1; O=$2
mkdir -p "$O"
export LLORCH_ROOT=$PWD
"$X" serve --profile h100 --addr 127.0.0.1:18099 > "$O/serve.out" 2> "$O/serve.err" &
serve=$!
trap 'kill $serve 2>/dev/null; wait $serve 2>/dev/null' EXIT
for _ in $(seq 1 600); do
  curl -sf 127.0.0.1:18099/readyz > /dev/null && break
  kill -0 $serve 2>/dev/null || { echo "serve exited"; tail -20 "$O/serve.err"; exit 1; }
  sleep 0.5
done
pid=$(pgrep -f 'llama-server' | head -1)
echo "== engine pid $pid"; grep -E "NoNewPrivs|Seccomp:" "/proc/$pid/status"
echo "== capabilities sandbox"; curl -s 127.0.0.1:18099/v1/capabilities | python3 -c "import json,sys; print(json.load(sys.stdin)['sandbox'])"
pool=$(curl -s 127.0.0.1:18099/v1/capabilities | python3 -c "import json,sys; print(json.load(sys.stdin)['pool'])")
echo "== a completion"; curl -s 127.0.0.1:18099/v1/completions -H 'content-type: application/json' \
  -d "{\"model\":\"$pool\",\"prompt\":\"Once upon a time\",\"max_tokens\":32,\"ignore_eos\":true}" | python3 -c "import json,sys; d=json.load(sys.stdin); print(d.get('usage'), repr(d['choices'][0]['text'][:60]))"
echo "== the engine log names the GPU"; find "$PWD/.runtime" "$PWD/cache" -name "*.log" -path "*h100*" 2>/dev/null | head -3 | xargs -r grep -ihE "CUDA0|offloaded|using device" | head -4
