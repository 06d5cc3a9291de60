#!/usr/bin/env bash
# The twelve fattn-tile template instances, each compiled three times at once
# for `90-real` (code=sm_90: the cubin only, no PTX embedded), with -keep: do
# the objects agree even where cicc's PTX does not?
# Usage: docs/gpu/real_arch_determinism.sh BUNDLE OUTDIR
set -uo pipefail
B=$1; O=$2; mkdir -p "$O"
{
w=$(mktemp -d); tar xzf "$B" -C "$w"
S=$(dirname "$(find "$w" -path '*ggml/src/ggml-cuda/fattn-tile.cuh' | head -1)")/../../..; S=$(cd "$S" && pwd)
flags=(-forward-unknown-to-host-compiler -DGGML_CUDA_PEER_MAX_BATCH_SIZE=128 -DGGML_CUDA_USE_GRAPHS -DGGML_SCHED_MAX_COPIES=4 -D_GNU_SOURCE -D_XOPEN_SOURCE=600
  -I"$S/ggml/src/ggml-cuda/.." -I"$S/ggml/src/../include" -O3 -DNDEBUG -std=c++17 "--generate-code=arch=compute_90,code=[sm_90]"
  -use_fast_math -extended-lambda -compress-mode=size --frandom-seed=x.o -Xcudafe --orig_src_path_name=/llorch/src/x.cu -Xcicc --orig_src_path_name=/llorch/src/x.cu)
cd "$w"; pids=(); t0=$(date +%s)
for f in "$S"/ggml/src/ggml-cuda/template-instances/fattn-tile-instance-*.cu; do
  n=$(basename "$f" .cu)
  for v in 1 2 3; do mkdir -p k$v/$n; (cd k$v/$n && timeout 250 nvcc "${flags[@]}" -keep -keep-dir . -x cu -c "$f" -o o.o) & pids+=($!); done
done
wait "${pids[@]}"; echo "all compiled in $(( $(date +%s) - t0 )) s"
for d in k1/*; do n=$(basename "$d")
  o=$(for v in 1 2 3; do sha256sum < k$v/$n/o.o | cut -c1-12; done | sort -u | wc -l)
  p=$(for v in 1 2 3; do sha256sum < k$v/$n/$n.ptx | cut -c1-12; done | sort -u | wc -l)
  c=$(for v in 1 2 3; do sha256sum < k$v/$n/$n.sm_90.cubin | cut -c1-12; done | sort -u | wc -l)
  echo "$n: objects $o distinct, cubins $c distinct, PTX $p distinct ($(stat -c %s k1/$n/o.o) bytes)"
done
} > "$O/real.txt" 2>&1
cat "$O/real.txt"
