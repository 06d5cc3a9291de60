#!/usr/bin/env bash
# Which bytes of the h100 engine vary between builds of one fingerprint:
#   build   OUT  cold `engine build` from the bundle; the binary's sha256 and
#                every object's sha256 (cache/build-v1/work/build)
#   verify  OUT  `engine verify --rebuild` (scratch tree and build dir, no
#                compiler cache, kept: LLORCH_VERIFY_KEEP=1); the objects that
#                differ from the first build's, and which ELF sections differ
# Usage (repository root on the GPU host): docs/gpu/repro_objects.sh build|verify XTASK BUNDLE OUT
set -uo pipefail
MODE=$1; X=$2; B=$3; O=$4
mkdir -p "$O"
export LLORCH_ROOT=$PWD
objects() { (cd "$1" && find . -name '*.o' -type f | sort | xargs sha256sum); }
if [ "$MODE" = build ]; then
  "$X" engine build --profile h100 --source-bundle "$B" --json > "$O/build.json" 2> "$O/build.log" || { tail -40 "$O/build.log"; exit 1; }
  python3 -c "import json,sys,hashlib; d=json.load(open(sys.argv[1])); print(d['fingerprint'], 'duration_s', round(d['duration_s'],1), 'bin sha256', hashlib.sha256(open(d['binary'],'rb').read()).hexdigest())" "$O/build.json" | tee "$O/build.txt"
  objects cache/build-v1/work/build > "$O/objects-a.txt"; wc -l < "$O/objects-a.txt"
  exit 0
fi
LLORCH_VERIFY_KEEP=1 "$X" engine verify --rebuild --profile h100 --source-bundle "$B" --json > "$O/verify.json" 2> "$O/verify.log"
echo "verify exit $?"
python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print('reproduced', d.get('reproduced'), [(f['file'], f['same'], f['differing_bytes'], f['ranges'][:6]) for f in d.get('files', [])])" "$O/verify.json" | tee "$O/verify.txt"
KEPT=$(grep -o 'kept [^ ]* at [^ ]*\|kept at [^ ]*\|/[^ ]*llorch-verify[^ ]*' "$O/verify.log" | grep -o '/[^ ]*' | head -1)
[ -z "$KEPT" ] && KEPT=$(ls -d /tmp/*verify* "$PWD"/cache/*verify* 2>/dev/null | head -1)
echo "kept scratch: $KEPT" | tee -a "$O/verify.txt"
BUILD=$(find "$KEPT" -name build.ninja -printf '%h\n' 2>/dev/null | head -1)
echo "scratch build dir: $BUILD" | tee -a "$O/verify.txt"
objects "$BUILD" > "$O/objects-b.txt"
objects cache/build-v1/work/build > "$O/objects-a.txt"
diff "$O/objects-a.txt" "$O/objects-b.txt" | grep '^<' | awk '{print $3}' > "$O/differing.txt"
echo "objects: $(wc -l < "$O/objects-a.txt") vs $(wc -l < "$O/objects-b.txt"); differing: $(wc -l < "$O/differing.txt")" | tee -a "$O/verify.txt"
for f in $(head -6 "$O/differing.txt"); do
  echo "-- $f" | tee -a "$O/verify.txt"
  for s in $(readelf -SW "cache/build-v1/work/build/$f" | sed -n 's/^ *\[ *[0-9]*\] \([^ ]*\) .*/\1/p' | grep -v '^$'); do
    a=$(objcopy -O binary --only-section="$s" "cache/build-v1/work/build/$f" /dev/stdout 2>/dev/null | sha256sum | cut -c1-12)
    b=$(objcopy -O binary --only-section="$s" "$BUILD/$f" /dev/stdout 2>/dev/null | sha256sum | cut -c1-12)
    [ "$a" != "$b" ] && echo "   section $s differs ($a vs $b)" | tee -a "$O/verify.txt"
  done
  cmp "cache/build-v1/work/build/$f" "$BUILD/$f" | head -1 | tee -a "$O/verify.txt"
done
