#!/usr/bin/env bash
# Is ptxas what varies on this machine for the fattn tile kernels, and why?
# On a 2-core machine, nvcc 13.0.88 (pip wheels) gives identical output for
# fattn-tile-instance-dkq512-dv512.cu every time, alone or three at once
# (ptxas 9 s, cicc 23 s); on the H200 machine the objects differed.
# PTX: a .ptx made by `nvcc -ptx` of that file elsewhere.
# (Waits name their pids: a bare `wait` also waits for the `>(tee …)` below.)
# Usage: docs/gpu/ptxas_determinism.sh PTX BUNDLE OUTDIR
set -uo pipefail
P=$(realpath "$1"); B=$2; O=$3; mkdir -p "$O"
exec > >(tee "$O/ptxas_determinism.txt") 2>&1
echo "== machine: $(nproc) cpus, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), gcc $(gcc -dumpfullversion), load $(cut -d' ' -f1-3 /proc/loadavg)"
nvcc --version | tail -1
w=$(mktemp -d); cd "$w"
pt() { local tag=$1; shift; /usr/bin/time -f "$tag: %e s, %M KB, exit %x" timeout 150 ptxas -arch=sm_90 -m64 "$@"; }
sums() { for x in "$@"; do echo "  $(sha256sum < "$x" | cut -c1-16) $(stat -c %s "$x") $x"; done; }
echo "== ptxas on the carried PTX, alone, twice one after the other"
pt a1 "$P" -o a1.cubin; pt a2 "$P" -o a2.cubin; sums a1.cubin a2.cubin
echo "== the same, four at once"
pids=(); for v in 1 2 3 4; do pt b$v "$P" -o b$v.cubin & pids+=($!); done; wait "${pids[@]}"; sums b?.cubin
echo "== the same, four at once, with 12 busy loops beside them"
busy=(); for i in $(seq 12); do (timeout 100 sh -c "while :; do :; done") & busy+=($!); done
pids=(); for v in 1 2 3 4; do pt c$v "$P" -o c$v.cubin & pids+=($!); done; wait "${pids[@]}"; sums c?.cubin
kill "${busy[@]}" 2>/dev/null
echo "== this machine's own PTX (nvcc -ptx, host gcc here)"
tar xzf "$B" -C "$w"
S=$(dirname "$(find "$w" -path '*ggml/src/ggml-cuda/fattn-tile.cuh' | head -1)")/../../..; S=$(cd "$S" && pwd)
f=$S/ggml/src/ggml-cuda/template-instances/fattn-tile-instance-dkq512-dv512.cu
flags=(-forward-unknown-to-host-compiler -DGGML_CUDA_PEER_MAX_BATCH_SIZE=128 -DGGML_CUDA_USE_GRAPHS -DGGML_SCHED_MAX_COPIES=4 -D_GNU_SOURCE -D_XOPEN_SOURCE=600
  -I"$S/ggml/src/ggml-cuda/.." -I"$S/ggml/src/../include" -O3 -DNDEBUG -std=c++17 "--generate-code=arch=compute_90,code=[compute_90,sm_90]"
  -use_fast_math -extended-lambda --frandom-seed=x.o -Xcudafe --orig_src_path_name=/llorch/src/x.cu -Xcicc --orig_src_path_name=/llorch/src/x.cu)
/usr/bin/time -f "nvcc -ptx: %e s" timeout 150 nvcc "${flags[@]}" -ptx -x cu "$f" -o own.ptx
sums "$P" own.ptx
pids=(); for v in 1 2; do pt d$v own.ptx -o d$v.cubin & pids+=($!); done; wait "${pids[@]}"; sums d?.cubin
cp a1.cubin "$O/a1.cubin"; for x in a2 b1 b2 c1 c2; do cmp -s a1.cubin $x.cubin || cp $x.cubin "$O/$x.cubin"; done
ls "$O"
