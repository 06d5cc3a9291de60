#!/usr/bin/env python3
"""An engine crash under MPS must not take its siblings down (issue 32).

Against a running `serve` of a batched pool with several engines sharing one
GPU under NVIDIA MPS: 8 long streaming tasks spread over the replicas; once
every stream has its first token, one replica's llama-server is SIGKILLed.
Pass: the streams on the other replicas run to their full length, those on
the killed replica end with an error event, and the killed replica serves
again after its restart.

usage: docs/gpu/mps_isolation.py URL
"""
import json, os, signal, subprocess, sys, threading, time, urllib.request

URL = sys.argv[1].rstrip("/")
N, TOKENS = 8, 1500


def post(path, body):
    req = urllib.request.Request(URL + path, json.dumps(body).encode(), {"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=60))


def get(path):
    return json.load(urllib.request.urlopen(URL + path, timeout=60))


def stream(task, out, first):
    ev, tokens, end = None, 0, None
    with urllib.request.urlopen(URL + f"/v1/tasks/{task['task_id']}/stream", timeout=600) as r:
        for raw in r:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                ev = line[7:]
            elif line.startswith("data: "):
                if ev == "token":
                    tokens += 1
                    first.set()
                elif ev in ("end", "error"):
                    end = (ev, json.loads(line[6:]))
                    break
    out.append({"replica": task["replica"], "tokens": tokens, "end": end})


def engine_pid(port):
    r = subprocess.run(["pgrep", "-f", f"llama-server.*--port {port}( |$)"], capture_output=True, text=True)
    pids = [int(p) for p in r.stdout.split()]
    return pids[0] if pids else None


caps = get("/v1/capabilities")
reps = caps["replicas"]
print(f"pool {caps['pool']}: {len(reps)} replicas, mode {caps['mode']}, slots {caps['slots']}")
tasks = [post("/v1/tasks", {"prompt": f"Story {i}: once upon a time", "max_tokens": TOKENS, "ignore_eos": True}) for i in range(N)]
print("replicas of the tasks:", sorted(t["replica"] for t in tasks))
results, firsts, threads = [], [], []
for t in tasks:
    f = threading.Event()
    firsts.append(f)
    th = threading.Thread(target=stream, args=(t, results, f))
    th.start()
    threads.append(th)
for f in firsts:
    f.wait(600)
victim = tasks[0]["replica"]
port = int(reps[victim]["url"].rsplit(":", 1)[1])
pid = engine_pid(port)
print(f"every stream has its first token; SIGKILL replica {victim} (engine pid {pid}, port {port})")
os.kill(pid, signal.SIGKILL)
for th in threads:
    th.join()
ok = True
for r in sorted(results, key=lambda r: r["replica"]):
    kind, data = r["end"] or ("none", {})
    if r["replica"] == victim:
        good = kind == "error"
    else:
        good = kind == "end" and data.get("tokens_out") == TOKENS
    ok &= good
    print(f"  replica {r['replica']}: {r['tokens']} token events, {kind} {data.get('code', data.get('tokens_out'))} {'ok' if good else 'WRONG'}")
deadline = time.time() + 300
while time.time() < deadline:
    st = get("/v1/capabilities")["replicas"][victim]["state"]
    if st == "ready":
        break
    time.sleep(0.5)
print(f"replica {victim} after its restart: {st}")
again = post("/v1/tasks", {"prompt": "after", "max_tokens": 16, "ignore_eos": True})
out = []
stream(again, out, threading.Event())
print(f"a task after the restart: replica {out[0]['replica']}, {out[0]['end'][0]}")
ok &= st == "ready" and out[0]["end"][0] == "end"
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
