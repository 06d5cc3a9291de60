#!/usr/bin/env python3
"""Two CUDA pools, one per GPU, behind one orchestrator: the proof.

Usage (repository root on a host with two GPUs, after `engine build` and
`model fetch` of the h100 profile): pools_proof.py XTASK OUTDIR

1. `XTASK serve --stack docs/gpu/two-h100.yaml`; nvidia-smi must show one
   llama-server per GPU, the pids of the pools' run records.
2. Streams to both pools at once; both complete.
3. SIGKILL gpu0's engine while gpu1 streams: gpu1's stream completes, gpu0's
   supervisor restarts its engine and it serves again.
4. gpu1 idles past its idle_unload_s: it unloads, and GPU 1's memory returns
   to its level before serve started; the next request loads it again.
5. SIGTERM: serve drains and exits 0, and no llama-server is left on a GPU.
Prints one JSON object (and writes OUTDIR/pools_proof.json). Standard library only.
"""
import http.client, json, os, signal, subprocess, sys, threading, time

xtask, outdir = sys.argv[1], sys.argv[2]
PORT = 18080
out = {"checks": {}}


def smi(q):
    return subprocess.check_output(["nvidia-smi", f"--query-{q}", "--format=csv,noheader,nounits"], text=True).strip()


def gpu_used():
    return {int(l.split(",")[0]): int(l.split(",")[1]) for l in smi("gpu=index,memory.used").splitlines()}


def apps():
    """pid -> GPU index of every compute process."""
    uuid_to_index = {l.split(",")[1].strip(): int(l.split(",")[0]) for l in smi("gpu=index,uuid").splitlines()}
    res = {}
    for l in smi("compute-apps=pid,gpu_uuid,used_memory").splitlines():
        if l.strip():
            pid, uuid, mem = [x.strip() for x in l.split(",")]
            res[int(pid)] = {"gpu": uuid_to_index.get(uuid), "used_mib": int(mem)}
    return res


def run_pid(pool):
    with open(f"cache/run/{pool}.pid") as f:
        return json.load(f)["process"]["pid"]


def req(method, path, body=None, timeout=600):
    c = http.client.HTTPConnection("127.0.0.1", PORT, timeout=timeout)
    c.request(method, path, json.dumps(body) if body is not None else None, {"Content-Type": "application/json"})
    r = c.getresponse()
    return r.status, r.read()


def stream(pool, tokens, result):
    """A task on `pool`, its stream read to the end: result[pool] = summary."""
    s, b = req("POST", "/v1/tasks", {"prompt": "Write a long story about a lighthouse keeper:\n", "max_tokens": tokens, "ignore_eos": True, "pool": pool})
    if s != 202:
        result[pool] = {"status": s, "body": b.decode()[:300]}
        return
    tid = json.loads(b)["task_id"]
    c = http.client.HTTPConnection("127.0.0.1", PORT, timeout=600)
    c.request("GET", f"/v1/tasks/{tid}/stream")
    r = c.getresponse()
    ev, n, first, last, end, err = None, 0, None, None, None, None
    for line in r:
        line = line.decode().rstrip("\n")
        if line.startswith("event: "):
            ev = line[7:]
        elif line.startswith("data: "):
            if ev == "token":
                now = time.perf_counter()
                first = first or now
                last = now
                n += 1
            elif ev == "end":
                end = json.loads(line[6:])
            elif ev == "error":
                err = json.loads(line[6:])
    result[pool] = {"token_events": n, "end": end, "error": err,
                    "client_decode_tok_s": (n - 1) / (last - first) if n > 1 and last > first else None}


def caps():
    return json.loads(req("GET", "/v1/capabilities")[1])


def state(pool):
    return next(p["state"] for p in caps()["pools"] if p["id"] == pool)


def wait_state(pool, want, within):
    t0 = time.time()
    while state(pool) != want:
        if time.time() - t0 > within:
            return False
        time.sleep(0.2)
    return True


before = gpu_used()
out["gpu_memory_used_mib_before"] = before
serve = subprocess.Popen([xtask, "serve", "--stack", "docs/gpu/two-h100.yaml", "--addr", f"127.0.0.1:{PORT}"],
                         stdout=subprocess.PIPE, stderr=open(os.path.join(outdir, "serve.log"), "w"), text=True)
for line in serve.stdout:
    if line.startswith("serving "):
        break
else:
    sys.exit(f"serve did not start (exit {serve.wait()}); see {outdir}/serve.log")
threading.Thread(target=lambda: [None for _ in serve.stdout], daemon=True).start()

def visible_devices(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    return env.get(b"CUDA_VISIBLE_DEVICES", b"").decode()


def llama_servers():
    res = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.path.basename(os.readlink(f"/proc/{d}/exe")) == "llama-server":
                    res.append(int(d))
            except OSError:
                pass
    return res


# 1. One engine per GPU: nvidia-smi's compute apps name our pids (when the
# container shows them), each engine sees only its GPU, and each GPU's memory rose.
pids = {p: run_pid(p) for p in ("gpu0", "gpu1")}
a = apps()
loaded = gpu_used()
out["engines"] = {p: {"pid": pid, "CUDA_VISIBLE_DEVICES": visible_devices(pid), **a.get(pid, {"gpu": None})} for p, pid in pids.items()}
out["nvidia_smi_compute_apps"] = a
out["gpu_memory_used_mib_serving"] = loaded
by_smi = out["engines"]["gpu0"]["gpu"] == 0 and out["engines"]["gpu1"]["gpu"] == 1 and sorted(a) == sorted(pids.values())
by_env = out["engines"]["gpu0"]["CUDA_VISIBLE_DEVICES"] == "0" and out["engines"]["gpu1"]["CUDA_VISIBLE_DEVICES"] == "1"
by_mem = all(loaded[i] > before[i] + 256 for i in (0, 1))
out["one_engine_per_gpu_evidence"] = {"nvidia_smi_pids": by_smi, "visible_devices": by_env, "memory_rose_on_both": by_mem,
                                      "llama_server_processes": sorted(llama_servers())}
out["checks"]["one_engine_per_gpu"] = by_env and by_mem and sorted(llama_servers()) == sorted(pids.values()) and (by_smi or not a)

# 2. Both at once.
res = {}
ts = [threading.Thread(target=stream, args=(p, 512, res)) for p in ("gpu0", "gpu1")]
[t.start() for t in ts]
[t.join() for t in ts]
out["both_at_once"] = res
out["checks"]["both_pools_stream_at_once"] = all(res[p].get("end") and res[p]["end"]["tokens_out"] == 512 for p in res)

# 3. Kill gpu0's engine while gpu1 streams.
res = {}
t1 = threading.Thread(target=stream, args=("gpu1", 1024, res))
t0 = threading.Thread(target=stream, args=("gpu0", 1000, res))
t1.start(); t0.start()
time.sleep(0.5)
os.kill(pids["gpu0"], signal.SIGKILL)
t1.join(); t0.join()
out["kill_gpu0"] = res
restarted = wait_state("gpu0", "ready", 300)
res2 = {}
stream("gpu0", 16, res2)
out["checks"]["gpu1_untouched_when_gpu0_killed"] = bool(res["gpu1"].get("end") and res["gpu1"]["end"]["tokens_out"] == 1024 and not res["gpu1"]["error"])
out["checks"]["gpu0_restarted_and_serves"] = restarted and bool(res2["gpu0"].get("end")) and run_pid("gpu0") != pids["gpu0"]

# 4. Idle unload of gpu1 and its memory.
loaded_used = gpu_used()
out["gpu_memory_used_mib_loaded"] = loaded_used
unloaded = wait_state("gpu1", "unloaded", 60)
time.sleep(1.0)
after = gpu_used()
out["gpu_memory_used_mib_after_gpu1_unloaded"] = after
out["checks"]["gpu1_unloaded_when_idle"] = unloaded
out["checks"]["gpu1_memory_back_to_idle"] = after[1] <= before[1] + 16 and after[0] > before[0] + 256
res3 = {}
stream("gpu1", 16, res3)
out["checks"]["gpu1_loads_again"] = bool(res3["gpu1"].get("end")) and state("gpu1") == "ready"
out["capabilities"] = caps()

# 5. Drain and stop.
serve.send_signal(signal.SIGTERM)
rc = serve.wait(timeout=120)
time.sleep(1.0)
out["serve_exit"] = rc
out["gpu_memory_used_mib_after_stop"] = gpu_used()
out["checks"]["nothing_left_on_gpus"] = rc == 0 and not apps() and not llama_servers() and all(
    out["gpu_memory_used_mib_after_stop"][i] <= before[i] + 16 for i in (0, 1))
out["all_passed"] = all(out["checks"].values())
with open(os.path.join(outdir, "pools_proof.json"), "w") as f:
    json.dump(out, f, indent=2)
print(json.dumps(out, indent=2))
