#!/usr/bin/env python3
"""Provisioned engine vs the same binary launched by hand, side by side.

Usage: hand_vs_provisioned.py XTASK PROFILE [RUNS] [TOKENS]

1. `XTASK provision --profile PROFILE --json` (timed): build/model are cache
   hits by now; this measures provision's own work plus engine start.
2. Streaming decode tokens/s and prompt tokens/s against the provisioned engine.
3. GPU memory in use (nvidia-smi), then `XTASK engine down`.
4. The same llama-server binary, model and flags launched by hand on a free
   port, ready time with a 1 ms /health poll, and the same decode measurement.
Prints one JSON object. Standard library only.
"""
import http.client, json, os, socket, subprocess, sys, time

xtask, profile = sys.argv[1], sys.argv[2]  # `--measure HOST:PORT` measures a running server only
runs = int(sys.argv[3]) if len(sys.argv) > 3 else 5
tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 256
PROMPT = "Write a long story about a lighthouse keeper who finds a map:\n"


def stream(host, port):
    """One streaming /completion; returns (decode tok/s after the first token, prompt tok/s, token ids)."""
    c = http.client.HTTPConnection(host, port, timeout=600)
    body = json.dumps({"prompt": PROMPT, "n_predict": tokens, "temperature": 0.0, "seed": 42,
                       "stream": True, "cache_prompt": False, "ignore_eos": True})
    t0 = time.perf_counter()
    c.request("POST", "/completion", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"/completion answered {r.status}: {r.read()[:500]!r}")
    first, n, ids, final = None, 0, [], None
    buf = b""
    raw = b""
    while True:
        chunk = r.read1(65536)
        if not chunk:
            break
        buf += chunk
        raw = (raw + chunk)[-2000:]
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if not line.startswith(b"data: "):
                continue
            v = json.loads(line[6:])
            if v.get("stop"):
                final = v
                continue
            if first is None:
                first = time.perf_counter()
            n += 1
            ids.extend(v.get("tokens", []))
    end = time.perf_counter()
    if final is None:
        raise RuntimeError(f"no final frame after {n} tokens; last bytes: {raw[-500:]!r}")
    t = final["timings"]
    return {"client_decode_tok_s": (n - 1) / (end - first), "engine_decode_tok_s": t["predicted_per_second"],
            "prompt_tok_s": t["prompt_per_second"], "ttft_ms": (first - t0) * 1000, "tokens": n, "ids": ids}


def measure(host, port):
    stream(host, port)  # warm-up
    rs = [stream(host, port) for _ in range(runs)]
    med = lambda k: sorted(r[k] for r in rs)[len(rs) // 2]
    return {"client_decode_tok_s_median": med("client_decode_tok_s"), "engine_decode_tok_s_median": med("engine_decode_tok_s"),
            "prompt_tok_s_median": med("prompt_tok_s"), "ttft_ms_median": med("ttft_ms"),
            "deterministic": all(r["ids"] == rs[0]["ids"] for r in rs), "first_ids": rs[0]["ids"][:16]}


def gpu_mem():
    try:
        return subprocess.check_output(["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader"], text=True).strip()
    except Exception as e:  # noqa: BLE001
        return f"n/a ({e})"


if xtask == "--measure":
    h, p = profile.split(":")
    print(json.dumps({"server": profile, "runs": runs, "tokens": tokens, **measure(h, int(p))}, indent=2))
    sys.exit(0)

out = {"profile": profile, "runs": runs, "tokens": tokens}
t = time.perf_counter()
prov = json.loads(subprocess.check_output([xtask, "provision", "--profile", profile, "--json"]))
out["provision_wall_ms"] = (time.perf_counter() - t) * 1000
out["provision_ready_ms"] = prov.get("ready_ms")
handoff = json.load(open(prov["handoff"]))
host, port = prov["url"].split("//")[1].split(":")
try:
    out["provisioned"] = measure(host, int(port))
except Exception as e:  # noqa: BLE001
    log = open(prov["log"], errors="replace").read().splitlines()[-40:]
    print(json.dumps({"error": str(e), "engine_log_tail": log}, indent=2))
    subprocess.call([xtask, "engine", "down", "--pool", prov["pool_id"]])
    sys.exit(1)
out["gpu_memory_with_engine"] = gpu_mem()
subprocess.check_call([xtask, "engine", "down", "--pool", prov["pool_id"]], stdout=subprocess.DEVNULL)

build = json.loads(subprocess.check_output([xtask, "engine", "build", "--profile", profile, "--json"]))
binary = build["binary"]
s = socket.socket(); s.bind(("127.0.0.1", 0)); free = s.getsockname()[1]; s.close()
argv = [binary, "-m", handoff["model"]["path"], "--port", str(free)] + handoff["flags"]
t = time.perf_counter()
p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
while True:
    try:
        c = http.client.HTTPConnection("127.0.0.1", free, timeout=1)
        c.request("GET", "/health")
        if c.getresponse().status == 200:
            break
    except OSError:
        pass
    time.sleep(0.001)
out["hand_ready_ms"] = (time.perf_counter() - t) * 1000
out["hand"] = measure("127.0.0.1", free)
p.terminate(); p.wait()
out["hand_argv"] = argv
out["ratio_provisioned_over_hand_decode"] = out["provisioned"]["engine_decode_tok_s_median"] / out["hand"]["engine_decode_tok_s_median"]
out["same_tokens_provisioned_and_hand"] = out["provisioned"]["first_ids"] == out["hand"]["first_ids"]
print(json.dumps(out, indent=2))
