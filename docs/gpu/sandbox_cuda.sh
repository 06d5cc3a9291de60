#!/usr/bin/env bash
# A CUDA program under the engine sandbox, on a GPU host without a Rust
# toolchain: `sandbox-probe run` (built here: cargo build --release -p
# engine-runtime --bin sandbox-probe) starts it exactly as an engine is
# confined. The program does what llama.cpp's CUDA backend does at start and
# in a decode step: device query, cudaMemGetInfo, device and pinned host
# memory, a kernel, cuBLAS SGEMM. Run unconfined, sandboxed, and sandboxed as
# an MPS client (the daemon started and stopped here).
#
# usage: docs/gpu/sandbox_cuda.sh SANDBOX_PROBE OUTDIR
set -uo pipefail
probe=$1; out=$2
mkdir -p "$out"
work=$(mktemp -d /tmp/llorch-sbx.XXXXXX)
mkdir -p "$work/bin"
cat > "$work/cuda_check.cu" <<'CU'
#include <cstdio>
#include <cuda_runtime.h>
#include <cublas_v2.h>
__global__ void fill(float *x, int n, float v) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] = v;
}
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("FAIL %s: %s\n", #x, cudaGetErrorString(e)); return 1; } } while (0)
int main() {
  int n = 0; CK(cudaGetDeviceCount(&n));
  cudaDeviceProp p; CK(cudaGetDeviceProperties(&p, 0));
  size_t freeb, total; CK(cudaMemGetInfo(&freeb, &total));
  const int N = 1024; float *a, *b, *c;
  CK(cudaMalloc(&a, N * N * 4)); CK(cudaMalloc(&b, N * N * 4)); CK(cudaMalloc(&c, N * N * 4));
  fill<<<(N * N + 255) / 256, 256>>>(a, N * N, 1.0f);
  fill<<<(N * N + 255) / 256, 256>>>(b, N * N, 2.0f);
  CK(cudaGetLastError());
  cublasHandle_t h;
  if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) { printf("FAIL cublasCreate\n"); return 1; }
  float al = 1, be = 0;
  if (cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, N, N, N, &al, a, N, b, N, &be, c, N) != CUBLAS_STATUS_SUCCESS) { printf("FAIL sgemm\n"); return 1; }
  float hc = 0; CK(cudaMemcpy(&hc, c, 4, cudaMemcpyDeviceToHost));
  void *pin; CK(cudaMallocHost(&pin, 64 << 20)); CK(cudaFreeHost(pin));
  printf("ok: %d device(s), %s, sm_%d%d, free %zu MiB of %zu, sgemm c[0]=%.0f (want %d)\n",
         n, p.name, p.major, p.minor, freeb >> 20, total >> 20, hc, 2 * N);
  return hc == 2.0f * N ? 0 : 1;
}
CU
nvcc -O2 -o "$work/bin/cuda_check" "$work/cuda_check.cu" -lcublas 2>&1 | tail -3
echo "== unconfined"; "$work/bin/cuda_check"; echo "exit $?"
echo "== sandboxed"; "$probe" run "$work/bin/cuda_check"; echo "exit $?"
export CUDA_MPS_PIPE_DIRECTORY=$work/mps-pipe CUDA_MPS_LOG_DIRECTORY=$work/mps-log
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
if nvidia-cuda-mps-control -d; then
  echo "== sandboxed, MPS client"; "$probe" run "$work/bin/cuda_check"; echo "exit $?"
  echo quit | nvidia-cuda-mps-control
  sleep 1
  tail -5 "$CUDA_MPS_LOG_DIRECTORY/control.log" 2>/dev/null
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
rm -rf "$work"
