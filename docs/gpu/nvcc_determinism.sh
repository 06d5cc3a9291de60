#!/usr/bin/env bash
# What makes nvcc's objects vary between two compiles of the same file in
# two directories, and which flags make them identical: one small kernel
# compiled twice per flag set (host compiler prefix-mapped as every build
# is), sha256 of each pair, and for a differing pair the first differing
# strings.
#
# Usage: docs/gpu/nvcc_determinism.sh OUTDIR
set -uo pipefail
O=$1; mkdir -p "$O"
nvcc --version | tail -2
work=$(mktemp -d)
src='#include <cstdio>
__global__ void add(float *a, const float *b, int n) { int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) a[i] += b[i]; }
namespace { __global__ void scale(float *a, float s) { a[threadIdx.x] *= s; } }
void launch(float *a, const float *b, int n) { add<<<(n + 255) / 256, 256>>>(a, b, n); scale<<<1, 32>>>(a, 2.0f); printf("%s\n", __FILE__); }'
LAUNCH=${LAUNCH:-}
try() { # NAME FLAGS...  (LAUNCH: a launcher before nvcc, e.g. sccache)
  local name=$1; shift
  for d in one two/deeper; do
    mkdir -p "$work/$d/obj"; printf '%s\n' "$src" > "$work/$d/k.cu"
    (cd "$work/$d" && SCCACHE_DIR=$work/$d/sc SCCACHE_SERVER_UDS=$work/$d/sc.sock $LAUNCH nvcc -arch=sm_90 -O3 -Xcompiler=-ffile-prefix-map=$work/$d=/llorch/src "$@" -c $work/$d/k.cu -o obj/k.cu.o) 2>&1 | tail -3
    [[ -f $work/$d/obj/k.cu.o ]] || echo "$name: NO OBJECT WRITTEN in $d"
  done
  a=$(sha256sum < "$work/one/obj/k.cu.o"); b=$(sha256sum < "$work/two/deeper/obj/k.cu.o")
  if [[ $a == "$b" ]]; then echo "$name: identical"; else
    echo "$name: DIFFER ($(stat -c %s "$work/one/obj/k.cu.o") vs $(stat -c %s "$work/two/deeper/obj/k.cu.o") bytes)"
    diff <(strings -n 8 "$work/one/obj/k.cu.o") <(strings -n 8 "$work/two/deeper/obj/k.cu.o") | head -6
  fi
  rm -rf "$work/one" "$work/two"
}
try plain
try objtemp -objtemp
try seed --frandom-seed=k.cu.o
try objtemp+seed -objtemp --frandom-seed=k.cu.o
# The anonymous-namespace hash follows the absolute source path nvcc hands
# cudafe++ and cicc (--orig_src_path_name): name it ourselves.
try objtemp+seed+path -objtemp --frandom-seed=k.cu.o -Xcudafe --orig_src_path_name=/llorch/src/k.cu -Xcicc --orig_src_path_name=/llorch/src/k.cu
try objtemp+seed+path2 -objtemp --frandom-seed=k.cu.o "-Xcudafe=--orig_src_path_name=/llorch/src/k.cu"
try seed+path --frandom-seed=k.cu.o -Xcudafe --orig_src_path_name=/llorch/src/k.cu -Xcicc --orig_src_path_name=/llorch/src/k.cu
if [[ -n ${SCCACHE:-} ]]; then
  LAUNCH=$SCCACHE
  try sccache:seed+path --frandom-seed=k.cu.o -Xcudafe --orig_src_path_name=/llorch/src/k.cu -Xcicc --orig_src_path_name=/llorch/src/k.cu
  try sccache:objtemp+seed+path -objtemp --frandom-seed=k.cu.o -Xcudafe --orig_src_path_name=/llorch/src/k.cu -Xcicc --orig_src_path_name=/llorch/src/k.cu
  try sccache:plain
  LAUNCH=
fi
echo "== same path twice (bind mount): is the path all that is left?"
if unshare -m true 2>/dev/null; then
  for d in one two/deeper; do
    mkdir -p "$work/$d/obj" /tmp/llorch-fixed; printf '%s\n' "$src" > "$work/$d/k.cu"
    unshare -m sh -c "mount --bind $work/$d /tmp/llorch-fixed && cd /tmp/llorch-fixed && nvcc -arch=sm_90 -O3 -objtemp --frandom-seed=k.cu.o -c k.cu -o obj/k.cu.o"
  done
  cmp "$work/one/obj/k.cu.o" "$work/two/deeper/obj/k.cu.o" && echo "bind-mounted same path: identical"
fi
echo "== nvcc -dryrun (where temp names and ids come from)"
mkdir -p "$work/d" && printf '%s\n' "$src" > "$work/d/k.cu" && (cd "$work/d" && nvcc -arch=sm_90 -objtemp --frandom-seed=k.cu.o -dryrun -c k.cu -o k.o 2>&1 | grep -E "cudafe|module_id|random|seed" | cut -c1-300 | head -8)
