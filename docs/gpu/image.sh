#!/usr/bin/env bash
# The h100 profile's CUDA image on a GPU host, without Docker: a cold engine
# build from the offline source bundle (its binary's sha256, for docs), the
# synthetic model, `image build`, `umoci unpack`, then the entrypoint chrooted
# in its own mount and pid namespaces as uid 65532, with only the unpacked
# root, the model (read-only), a state directory, the GPU device nodes and
# the driver's libraries (what a node's NVIDIA container runtime mounts)
# bound in; the haiku proof runs against it.
#
# Usage (repository root on the GPU host; no network, no Rust; as root):
#   docs/gpu/image.sh path/to/xtask path/to/bundle.tar.gz path/to/umoci OUTDIR
set -uo pipefail
X=$1; B=$2; U=$3; O=$4
mkdir -p "$O"
export LLORCH_ROOT=$PWD
step() { echo "== $1 ($(date -u +%T))"; }
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
  nvcc --version | tail -2; gcc --version | head -1; cmake --version | head -1; echo "cores: $(nproc)"
} > "$O/machine.txt" 2>&1
step build
"$X" engine build --profile h100 --source-bundle "$B" --json > "$O/build.json" 2> "$O/build.log" || { tail -60 "$O/build.log"; exit 1; }
python3 - "$O/build.json" <<'EOF' | tee "$O/build.txt"
import json, sys, hashlib
d = json.load(open(sys.argv[1]))
b = d["binary"]
print("fingerprint", d["fingerprint"], "duration_s", round(d["duration_s"], 1), "cache_hit", d["cache_hit"])
print("bin/llama-server sha256", hashlib.sha256(open(b, "rb").read()).hexdigest(), "bytes", len(open(b, "rb").read()))
print("inputs", json.dumps(d["manifest"]["inputs"], sort_keys=True))
EOF
step model
"$X" model fetch --profile h100 --json > "$O/model.json" 2> "$O/model.log" || { tail -20 "$O/model.log"; exit 1; }
MODEL=$(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d.get('metadata', d).get('path') or d['path'])" "$O/model.json")
step image
IMG=/tmp/llorch-img-h100
/usr/bin/time -f "image build: %e s, %M KB" "$X" image build --profile h100 --out "$IMG" --json > "$O/image.json" 2> "$O/image.log" || { tail -20 "$O/image.log"; exit 1; }
tail -1 "$O/image.log"
python3 -c "import json,sys; d=json.load(open(sys.argv[1]))['image']; print('digest', d['digest']); [print(' layer', l['name'], l['size'], 'bytes', l['files'], 'files') for l in d['layers']]; print(' total', d['size'])" "$O/image.json" | tee "$O/image.txt"
step unpack
BUNDLE=/tmp/llorch-bundle-h100
rm -rf "$BUNDLE"
"$U" unpack --image "$IMG:h100" "$BUNDLE" > "$O/unpack.log" 2>&1 || { cat "$O/unpack.log"; exit 1; }
R=$BUNDLE/rootfs
du -sb "$R" | tee -a "$O/image.txt"
LIBDIR=$(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print([f['path'] for f in d['files'] if f['path'].endswith('/libc.so.6')][0].rsplit('/',1)[0])" "$R/opt/llorch/image.json")
DRV=$(ldconfig -p | awk '/libcuda\.so\.1 /{print $NF; exit}')
DRVDIR=$(dirname "$(readlink -f "$DRV")")
echo "driver libraries from $DRVDIR, bound into $LIBDIR" | tee -a "$O/image.txt"
ENVS=$(python3 - "$IMG" <<'EOF'
import json, sys
L = sys.argv[1]
blob = lambda d: f"{L}/blobs/sha256/{d.split(':')[1]}"
i = json.load(open(f"{L}/index.json"))
m = json.load(open(blob(i["manifests"][0]["digest"])))
c = json.load(open(blob(m["config"]["digest"])))
print(" ".join(f"'{e}'" for e in c["config"]["Env"] if not e.startswith("PORT=")))
EOF
)
STATE=/tmp/llorch-state-h100
rm -rf "$STATE"; mkdir -p "$STATE"; chown 65532:65532 "$STATE"
mkdir -p "$R/proc" "$R/dev" "$R/sys"
: > "$R/models/model.gguf"
cat > /tmp/llorch-image-entry.sh <<EOF
set -e
mount --bind "$STATE" "$R/var/lib/llorch"
mount --bind "$MODEL" "$R/models/model.gguf"
mount -o remount,bind,ro "$R/models/model.gguf"
mount --rbind /sys "$R/sys"
mount -t tmpfs -o mode=755 tmpfs "$R/dev"
for d in null zero urandom random; do touch "$R/dev/\$d"; mount --bind /dev/\$d "$R/dev/\$d"; done
for d in /dev/nvidia*; do
  if [ -d "\$d" ]; then mkdir -p "$R\$d"; mount --rbind "\$d" "$R\$d"; else touch "$R\$d"; mount --bind "\$d" "$R\$d"; fi
done
for f in "$DRVDIR"/libcuda.so* "$DRVDIR"/libnvidia-*.so*; do
  [ -e "\$f" ] || continue
  n=\$(basename "\$f"); touch "$R$LIBDIR/\$n"; mount --bind "\$(readlink -f "\$f")" "$R$LIBDIR/\$n"
done
exec /usr/bin/env -i $ENVS PORT=0 LLORCH_API_TOKEN=gpu-image-token /usr/bin/unshare --root="$R" --wd=/opt/llorch --mount-proc --setuid=65532 --setgid=65532 /usr/local/bin/llorch serve --in-image
EOF
step serve
unshare --mount --pid --fork --kill-child bash /tmp/llorch-image-entry.sh > "$O/serve.out" 2> "$O/serve.log" &
SERVE=$!
URL=
for _ in $(seq 1 600); do
  URL=$(sed -n 's/^serving .* at \(http[^ ]*\).*/\1/p' "$O/serve.out" | head -1)
  [ -n "$URL" ] && break
  kill -0 $SERVE 2>/dev/null || break
  sleep 0.5
done
if [ -z "$URL" ]; then echo "the entrypoint did not serve:"; tail -40 "$O/serve.log"; exit 1; fi
URL=${URL/0.0.0.0/127.0.0.1}
echo "serving at $URL" | tee -a "$O/image.txt"
nvidia-smi --query-compute-apps=pid,used_memory --format=csv >> "$O/image.txt" 2>&1
step haiku
LLORCH_API_TOKEN=gpu-image-token "$X" haiku --against "$URL" --handoff "$STATE/run/engines/h100.json" > "$O/haiku.txt" 2>&1
echo "haiku exit $?" | tee -a "$O/image.txt"
tail -16 "$O/haiku.txt"
kill $SERVE; wait $SERVE 2>/dev/null
step done
