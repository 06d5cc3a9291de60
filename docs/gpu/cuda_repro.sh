#!/usr/bin/env bash
# CUDA engines, reproducible and cached, on the lent GPU host, in two steps
# (each fits one device call; the second needs the first's cache, kept in
# the checkout's ignored cache/ while the machine stays warm):
#   build:  the profile (default h100) built cold into cache/gpu-a with sccache
#           as the launcher and an empty compile cache; `engine gc --keep 0`;
#           the same fingerprint again with the compile cache warm.
#   verify: `engine verify --rebuild` of that engine: a scratch copy of the
#           tree, a scratch build dir, no compiler cache; the verdict and
#           every differing file.
# Usage (repository root; no network, no Rust):
#   docs/gpu/cuda_repro.sh build|verify XTASK BUNDLE SCCACHE OUTDIR [PROFILE]
set -uo pipefail
MODE=$1; X=$2; B=$3; S=$4; O=$5; PROFILE=${6:-h100}
mkdir -p "$O"
export LLORCH_ROOT=$PWD LLORCH_CACHE_DIR=$PWD/cache/gpu-a
step() { echo "== $1 ($(date -u +%T))"; }
nvcc --version | tail -1
case $MODE in
build)
  rm -rf "$LLORCH_CACHE_DIR"
  mkdir -p "$LLORCH_CACHE_DIR/tools-v1/sccache-0.16.0/bin"
  cp "$S" "$LLORCH_CACHE_DIR/tools-v1/sccache-0.16.0/bin/sccache"
  for n in cold warm; do
    step "build $n"
    "$X" engine build --profile "$PROFILE" --source-bundle "$B" --json > "$O/$n.json" 2> "$O/$n.log" || tail -40 "$O/$n.log"
    python3 -c "import json; d=json.load(open('$O/$n.json')); print('$n', d['fingerprint'][:12], 'duration_s', round(d['duration_s'],1), 'compile_cache', d['compile_cache'], 'files', d['manifest']['files'], 'nvcc_launcher', d['manifest']['inputs']['cuda'].get('nvcc_launcher'))" || true
    [[ $n == cold ]] && { step "engine gc --keep 0"; "$X" engine gc --keep 0; }
  done
  grep -c "not cacheable\|unsupported" "$LLORCH_CACHE_DIR/build-v1/work/build/llorch-build.log" || true
  ;;
verify)
  step "verify --rebuild"
  LLORCH_VERIFY_KEEP=1 "$X" engine verify --rebuild --profile "$PROFILE" --source-bundle "$B" --json > "$O/verify.json" 2> "$O/verify.log"
  echo "verify exit $?"
  # Object by object: the cached build's work dir against the scratch rebuild.
  a=$LLORCH_CACHE_DIR/build-v1/work/build
  b=$(ls -d "$LLORCH_CACHE_DIR"/build-v1/verify-*/build 2>/dev/null | head -1)
  if [[ -d $b ]]; then
    (cd "$a" && find . -name '*.o' | sort) | while read -r f; do
      cmp -s "$a/$f" "$b/$f" || echo "object differs: $f ($(stat -c %s "$a/$f") vs $(stat -c %s "$b/$f"))"
    done | tee "$O/objects.txt" | head -20
    echo "differing objects: $(wc -l < "$O/objects.txt") of $(cd "$a" && find . -name '*.o' | wc -l)"
    first=$(head -1 "$O/objects.txt" | sed 's/object differs: \(.*\) (.*/\1/')
    [[ -n $first ]] && diff <(strings -n 8 "$a/$first") <(strings -n 8 "$b/$first") | head -12
  fi
  python3 -c "
import json; d=json.load(open('$O/verify.json'))
print('reproduced', d['reproduced'], 'rebuild_s', round(d['rebuild_s'],1))
for f in d['files']: print(f['file'], f['same'], f.get('differing_bytes'), f.get('ranges', [])[:6])
" || tail -30 "$O/verify.log"
  ;;
esac
step done
