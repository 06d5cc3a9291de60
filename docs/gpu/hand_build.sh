#!/usr/bin/env bash
# The baseline by hand on the GPU host: configure and build llama-server for
# sm_90 with plain cmake and the same flags `engine build --profile h100` uses
# (see `inputs.cmake_flags` in its manifest), launch it with the same flags
# `provision` uses, and measure decode like hand_vs_provisioned.py does.
# Usage: docs/gpu/hand_build.sh path/to/xtask path/to/bundle.tar.gz OUTDIR
set -uo pipefail
X=$1; B=$2; O=$3
mkdir -p "$O" /tmp/hand-src
export LLORCH_ROOT=$PWD
tar -xzf "$B" -C /tmp/hand-src
T=/tmp/hand-src/tree
HOSTCXX=${CUDAHOSTCXX:-$(command -v g++)}
t0=$(date +%s.%N)
cmake -S "$T" -B /tmp/hand-build -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CCACHE=OFF \
  -DGGML_CUDA=ON -DGGML_NATIVE=OFF -DLLAMA_BUILD_COMMIT=4df29be -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_NUMBER=0 \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF -DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc -DCMAKE_CUDA_HOST_COMPILER="$HOSTCXX" \
  > "$O/hand-configure.log" 2>&1 || { tail -30 "$O/hand-configure.log"; exit 1; }
t1=$(date +%s.%N)
cmake --build /tmp/hand-build --target llama-server -j "$(nproc)" > "$O/hand-build.log" 2>&1 || { tail -30 "$O/hand-build.log"; exit 1; }
t2=$(date +%s.%N)
python3 -c "print('hand configure_s', round($t1-$t0,1), 'build_s', round($t2-$t1,1), 'total_s', round($t2-$t0,1))" | tee "$O/hand-times.txt"
LLORCH_SYNTHETIC_VOCAB=$T/models/ggml-vocab-llama-spm.gguf "$X" model fetch --profile h100 --json > "$O/model.json" 2>/dev/null
M=$(python3 -c "import json; print(json.load(open('$O/model.json'))['metadata']['path'])")
PORT=18181
/tmp/hand-build/bin/llama-server -m "$M" --port $PORT --host 127.0.0.1 --parallel 1 --no-cont-batching --no-webui --metrics \
  --threads 16 --ctx-size 4096 --n-gpu-layers 999 --seed 42 > "$O/hand-server.log" 2>&1 &
PID=$!
python3 - "$PORT" <<'PY'
import http.client, sys, time
while True:
    try:
        c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=1)
        c.request("GET", "/health")
        if c.getresponse().status == 200:
            break
    except OSError:
        pass
    time.sleep(0.01)
PY
python3 docs/gpu/hand_vs_provisioned.py --measure 127.0.0.1:$PORT 5 256 | tee "$O/hand-decode.json"
kill $PID; wait $PID 2>/dev/null
