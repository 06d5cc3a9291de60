#!/usr/bin/env bash
# One of the six objects that differed between two CUDA builds of the h100
# profile (fattn-tile-instance-dkq512-dv512.cu), compiled by nvcc alone in
# one directory with the build's flags: twice as the build compiles it and
# twice without `-compress-mode=size`, all four at once. Is nvcc itself
# nondeterministic for this kernel, and is it the compression?
# Usage: docs/gpu/fattn_determinism.sh BUNDLE OUTDIR
set -uo pipefail
B=$1; O=$2; mkdir -p "$O"
w=$(mktemp -d); tar xzf "$B" -C "$w"
S=$(dirname "$(find "$w" -path '*ggml/src/ggml-cuda/fattn-tile.cuh' | head -1)")/../../..
S=$(cd "$S" && pwd)
f=$S/ggml/src/ggml-cuda/template-instances/fattn-tile-instance-dkq512-dv512.cu
flags=(-forward-unknown-to-host-compiler -DGGML_CUDA_PEER_MAX_BATCH_SIZE=128 -DGGML_CUDA_USE_GRAPHS -DGGML_SCHED_MAX_COPIES=4 -D_GNU_SOURCE -D_XOPEN_SOURCE=600
  -I"$S/ggml/src/ggml-cuda/.." -I"$S/ggml/src/../include" -O3 -DNDEBUG -std=c++17 "--generate-code=arch=compute_90,code=[compute_90,sm_90]"
  -use_fast_math -extended-lambda --frandom-seed=x.o -Xcudafe --orig_src_path_name=/llorch/src/x.cu -Xcicc --orig_src_path_name=/llorch/src/x.cu -objtemp)
cd "$w"
for v in 1 2; do
  nvcc "${flags[@]}" -compress-mode=size -x cu -c "$f" -o "c$v.o" &
  nvcc "${flags[@]}" -x cu -c "$f" -o "n$v.o" &
done
wait
ls -l c1.o c2.o n1.o n2.o | awk '{print $5, $9}'
cmp -s c1.o c2.o && echo "with -compress-mode=size: identical" || echo "with -compress-mode=size: DIFFER"
cmp -s n1.o n2.o && echo "without compression: identical" || echo "without compression: DIFFER"
