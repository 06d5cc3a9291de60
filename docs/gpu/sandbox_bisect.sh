#!/usr/bin/env bash
# Which sandbox rule a CUDA program needs (issue 33): the check program of
# docs/gpu/sandbox_cuda.sh under `sandbox-probe run` with one part of the
# sandbox left out or one path granted at a time
# (LLORCH_SANDBOX_PROBE_WITHOUT / _READ / _WRITE / _SECCOMP_LOG; see
# crates/engine-runtime/src/bin/sandbox-probe.rs). One line per variant:
# ok or the program's first failure.
#
# usage: docs/gpu/sandbox_bisect.sh SANDBOX_PROBE OUTDIR
set -uo pipefail
probe=$1; out=$2
mkdir -p "$out"
work=$(mktemp -d /tmp/llorch-sbx.XXXXXX)
mkdir -p "$work/bin"
# The program of sandbox_cuda.sh, compiled for this GPU's own arch.
sed -n '/^cat > "\$work\/cuda_check.cu"/,/^CU$/p' "$(dirname "$0")/sandbox_cuda.sh" | sed '1d;$d' > "$work/cuda_check.cu"
nvcc -O2 -arch=native -o "$work/bin/cuda_check" "$work/cuda_check.cu" -lcublas 2>&1 | tail -3
variant() { # NAME then VAR=VALUE...
  local name=$1; shift
  local r
  r=$(env "$@" "$probe" run "$work/bin/cuda_check" 2>"$out/$name.err" | head -1)
  printf '%-28s %s\n' "$name" "${r:-no output; $(tail -1 "$out/$name.err")}"
}
echo "== unconfined: $("$work/bin/cuda_check" | head -1)"
if [ -n "${TRACE:-}" ]; then # which opens fail under the full sandbox (an LD_PRELOAD shim)
  cat > "$work/trace.c" <<'C'
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <sys/stat.h>
#define LOG(name, p, f, r) do { int e = errno; if ((r) < 0) fprintf(stderr, "TRACE %s %s flags=0x%x errno=%d\n", name, p, f, e); errno = e; } while (0)
#define WRAP_OPEN(fn) int fn(const char *p, int f, ...) { static int (*real)(const char *, int, ...); va_list a; va_start(a, f); int m = va_arg(a, int); va_end(a); if (!real) real = dlsym(RTLD_NEXT, #fn); int r = real(p, f, m); LOG(#fn, p, f, r); return r; }
#define WRAP_OPENAT(fn) int fn(int d, const char *p, int f, ...) { static int (*real)(int, const char *, int, ...); va_list a; va_start(a, f); int m = va_arg(a, int); va_end(a); if (!real) real = dlsym(RTLD_NEXT, #fn); int r = real(d, p, f, m); LOG(#fn, p, f, r); return r; }
WRAP_OPEN(open) WRAP_OPEN(open64) WRAP_OPENAT(openat) WRAP_OPENAT(openat64)
FILE *fopen(const char *p, const char *m) { static FILE *(*real)(const char *, const char *); if (!real) real = dlsym(RTLD_NEXT, "fopen"); FILE *r = real(p, m); int e = errno; if (!r) fprintf(stderr, "TRACE fopen %s mode=%s errno=%d\n", p, m, e); errno = e; return r; }
FILE *fopen64(const char *p, const char *m) { static FILE *(*real)(const char *, const char *); if (!real) real = dlsym(RTLD_NEXT, "fopen64"); FILE *r = real(p, m); int e = errno; if (!r) fprintf(stderr, "TRACE fopen64 %s mode=%s errno=%d\n", p, m, e); errno = e; return r; }
int mkdir(const char *p, mode_t m) { static int (*real)(const char *, mode_t); if (!real) real = dlsym(RTLD_NEXT, "mkdir"); int r = real(p, m); LOG("mkdir", p, m, r); return r; }
C
  gcc -O1 -shared -fPIC -o "$work/bin/trace.so" "$work/trace.c" -ldl
  echo "== failing opens, unconfined"; LD_PRELOAD="$work/bin/trace.so" "$work/bin/cuda_check" 2>&1 | grep TRACE | sort | uniq -c | head -30
  echo "== failing opens, sandboxed"; LD_PRELOAD="$work/bin/trace.so" "$probe" run "$work/bin/cuda_check" 2>&1 | grep -E "TRACE|FAIL|ok:" | sort | uniq -c | head -40
  rm -rf "$work"; exit 0
fi
if [ -n "${ONLY_WRITE:-}" ]; then # narrow a write grant: one path per variant
  for p in $ONLY_WRITE; do variant "write$(echo "$p" | tr / _)" LLORCH_SANDBOX_PROBE_WRITE="$p"; done
  rm -rf "$work"; exit 0
fi
variant full X=1
variant no-landlock LLORCH_SANDBOX_PROBE_WITHOUT=landlock
variant no-seccomp LLORCH_SANDBOX_PROBE_WITHOUT=seccomp
variant no-both-no-nnp LLORCH_SANDBOX_PROBE_WITHOUT=landlock,seccomp,nnp
variant no-ioctl LLORCH_SANDBOX_PROBE_WITHOUT=ioctl
variant no-net LLORCH_SANDBOX_PROBE_WITHOUT=net
variant no-scopes LLORCH_SANDBOX_PROBE_WITHOUT=scopes
variant no-denylist LLORCH_SANDBOX_PROBE_WITHOUT=denylist
variant no-socket LLORCH_SANDBOX_PROBE_WITHOUT=socket
variant no-clone LLORCH_SANDBOX_PROBE_WITHOUT=clone
variant no-clone3 LLORCH_SANDBOX_PROBE_WITHOUT=clone3
variant read-all LLORCH_SANDBOX_PROBE_READ=/
variant write-all LLORCH_SANDBOX_PROBE_WRITE=/
variant write-tmp LLORCH_SANDBOX_PROBE_WRITE=/tmp
variant write-home LLORCH_SANDBOX_PROBE_WRITE="${HOME:-/root}"
variant write-dev LLORCH_SANDBOX_PROBE_WRITE=/dev
variant write-run LLORCH_SANDBOX_PROBE_WRITE=/run:/var/run
variant write-var LLORCH_SANDBOX_PROBE_WRITE=/var
variant write-proc-sys LLORCH_SANDBOX_PROBE_WRITE=/proc:/sys
variant read-etc LLORCH_SANDBOX_PROBE_READ=/etc
variant write-all-no-ioctl LLORCH_SANDBOX_PROBE_WRITE=/ LLORCH_SANDBOX_PROBE_WITHOUT=ioctl
variant seccomp-log LLORCH_SANDBOX_PROBE_SECCOMP_LOG=1 LLORCH_SANDBOX_PROBE_WITHOUT=landlock
echo "== kernel log (seccomp audit lines)"
dmesg 2>/dev/null | grep -E "type=1326|seccomp" | tail -20
echo "== device nodes"; ls -la /dev | grep -E "nvidia|dri" ; ls -la /dev/nvidia-caps 2>/dev/null
ls -la /run/nvidia-persistenced 2>/dev/null
uname -r; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
rm -rf "$work"
