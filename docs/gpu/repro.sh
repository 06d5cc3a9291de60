#!/usr/bin/env bash
# Reproducible builds on a many-core host: the profile (default: cpu) built
# from one offline source bundle into two cache directories of different
# paths with Ninja, a third with Unix Makefiles (ninja hidden from PATH),
# then `engine verify --rebuild` of the first (scratch copy of the tree, no
# compiler cache). Prints each build's file digests and the verdict.
#
# Usage (repository root; no network, no Rust):
#   docs/gpu/repro.sh path/to/xtask path/to/bundle.tar.gz OUTDIR [PROFILE]
set -uo pipefail
X=$1; B=$2; O=$3; PROFILE=${4:-cpu}
mkdir -p "$O"
export LLORCH_ROOT=$PWD
step() { echo "== $1 ($(date -u +%T))"; }
build() { # NAME CACHE_DIR [VAR=VALUE ...]
  local n=$1 c=$2; shift 2
  step "build $n in $c"
  env "$@" LLORCH_CACHE_DIR="$c" "$X" engine build --profile "$PROFILE" --source-bundle "$B" --json > "$O/$n.json" 2> "$O/$n.log" || tail -40 "$O/$n.log"
}
hide=$(mktemp -d)
IFS=: read -ra dirs <<< "$PATH"
for d in "${dirs[@]}"; do for f in "$d"/*; do
  n=$(basename "$f"); [[ $n == ninja ]] && continue; [[ -e $hide/$n ]] || ln -s "$f" "$hide/$n"
done; done
build a /tmp/llorch-repro-a
build b /tmp/llorch-repro/another/cache-b
build c /tmp/llorch-repro-c "PATH=$hide"
for n in a b c; do
  python3 -c "import json,sys; d=json.load(open('$O/$n.json')); m=d['manifest']; print('$n', d['fingerprint'][:12], m['inputs']['generator'], json.dumps(m['files']))" || true
done
step "verify --rebuild of a"
LLORCH_CACHE_DIR=/tmp/llorch-repro-a "$X" engine verify --rebuild --profile "$PROFILE" --source-bundle "$B" --json > "$O/verify.json" 2> "$O/verify.log"
echo "verify exit $?"
python3 -c "import json; d=json.load(open('$O/verify.json')); print('reproduced', d['reproduced'], [(f['file'], f['same'], f['differing_bytes'], f['ranges'][:4]) for f in d['files']])" || tail -20 "$O/verify.log"
step done
