#!/usr/bin/env bash
# Compile-only proof of the RTX 3090 profile (sm_86) on a GPU host without
# network. The profile's own pin is upstream git, which an offline host cannot
# fetch; the same llama.cpp commit comes from the default pin's source bundle,
# so this builds a copy of the profile that names that pin.
# Usage: docs/gpu/sm86.sh path/to/xtask path/to/bundle.tar.gz OUTDIR
set -uo pipefail
X=$1; B=$2; O=$3
mkdir -p "$O"
export LLORCH_ROOT=$PWD
sed 's/^  pin: upstream-4df29be$/  pin: llama-cpp-python-0.3.35/' requirements/llamacpp-3090-source.yaml > /tmp/rtx3090-offline.yaml
grep -q 'pin: llama-cpp-python-0.3.35' /tmp/rtx3090-offline.yaml || { echo "pin substitution failed"; exit 1; }
"$X" doctor --profile /tmp/rtx3090-offline.yaml > "$O/doctor-3090.txt" 2>&1
"$X" engine build --profile /tmp/rtx3090-offline.yaml --source-bundle "$B" --json > "$O/build-3090.json" 2> "$O/build-3090.log"
echo "build exit $?"
python3 -c "import json; b=json.load(open('$O/build-3090.json')); m=b['manifest']; print('sass', m['sass_archs'], 'build_s', m['build_s'], 'configure_s', m['configure_s'])"
