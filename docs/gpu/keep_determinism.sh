#!/usr/bin/env bash
# fattn-tile-instance-dkq512-dv512.cu compiled four times at once, each in its
# own directory with -keep: which intermediate file of nvcc differs?
# (Waits name their pids: a bare `wait` also waits for `>(tee …)`.)
# Usage: docs/gpu/keep_determinism.sh BUNDLE OUTDIR
set -uo pipefail
B=$1; O=$2; mkdir -p "$O"
{
w=$(mktemp -d); tar xzf "$B" -C "$w"
S=$(dirname "$(find "$w" -path '*ggml/src/ggml-cuda/fattn-tile.cuh' | head -1)")/../../..; S=$(cd "$S" && pwd)
f=$S/ggml/src/ggml-cuda/template-instances/fattn-tile-instance-dkq512-dv512.cu
flags=(-forward-unknown-to-host-compiler -DGGML_CUDA_PEER_MAX_BATCH_SIZE=128 -DGGML_CUDA_USE_GRAPHS -DGGML_SCHED_MAX_COPIES=4 -D_GNU_SOURCE -D_XOPEN_SOURCE=600
  -I"$S/ggml/src/ggml-cuda/.." -I"$S/ggml/src/../include" -O3 -DNDEBUG -std=c++17 "--generate-code=arch=compute_90,code=[compute_90,sm_90]"
  -use_fast_math -extended-lambda --frandom-seed=x.o -Xcudafe --orig_src_path_name=/llorch/src/x.cu -Xcicc --orig_src_path_name=/llorch/src/x.cu)
cd "$w"; pids=()
for v in 1 2 3 4; do mkdir k$v; (cd k$v && /usr/bin/time -f "k$v: %e s" timeout 150 nvcc "${flags[@]}" -compress-mode=size -keep -keep-dir . -x cu -c "$f" -o o.o) & pids+=($!); done
wait "${pids[@]}"
for x in $(cd k1 && ls); do
  h=""; for v in 1 2 3 4; do h="$h $(sha256sum < k$v/$x | cut -c1-10):$(stat -c %s k$v/$x)"; done
  echo "$x$h"
done
n=0; for x in $(cd k1 && ls *.cubin *.ptx); do for v in 2 3 4; do if ! cmp -s k1/$x k$v/$x && [ $n -lt 7 ]; then cp k1/$x "$O/k1-$x"; cp k$v/$x "$O/k$v-$x"; n=$((n+2)); break; fi; done; done
} > "$O/keep.txt" 2>&1
cat "$O/keep.txt"
