# Cancel -> slot idle, llama-server addressed directly vs through the orchestrator,
# alternating, 6 runs each (docs/bench.md). Usage: start an engine with
# `cargo xtask provision --pool exp2` and `orchestratord --pool exp2 --addr
# 127.0.0.1:18556`, then: python3 docs/cancel_latency.py ENGINE_URL
import socket, json, time, urllib.request, sys
url=sys.argv[1]; orch="http://127.0.0.1:18556"
port=int(url.rsplit(':',1)[1])
def idle(): return not json.load(urllib.request.urlopen(url+"/slots"))[0]["is_processing"]
def wait_idle(t0):
    while not idle(): time.sleep(0.002)
    return (time.time()-t0)*1000
def direct():
    body=json.dumps({"prompt":"Count slowly:","n_predict":2000,"ignore_eos":True,"stream":True,"cache_prompt":False}).encode()
    s=socket.create_connection(("127.0.0.1",port))
    s.sendall(b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"%len(body)+body)
    buf=b""
    while b"data: " not in buf: buf+=s.recv(4096)
    t0=time.time(); s.close(); return wait_idle(t0)
def orchd():
    req=urllib.request.Request(orch+"/v1/tasks",data=json.dumps({"prompt":"Count slowly:","max_tokens":2000,"ignore_eos":True}).encode(),headers={"content-type":"application/json"})
    tid=json.load(urllib.request.urlopen(req))["task_id"]
    r=urllib.request.urlopen(orch+f"/v1/tasks/{tid}/stream")
    buf=b""
    while b"event: token" not in buf: buf+=r.read1(4096)
    t0=time.time()
    urllib.request.urlopen(urllib.request.Request(orch+f"/v1/tasks/{tid}/cancel",data=b"{}",headers={"content-type":"application/json"}))
    ms=wait_idle(t0); r.read(); return ms
d=[];o=[]
for i in range(6):
    d.append(direct()); time.sleep(0.3); o.append(orchd()); time.sleep(0.3)
d.sort(); o.sort()
print("direct ms", [round(x) for x in d], "median", round((d[2]+d[3])/2))
print("orch   ms", [round(x) for x in o], "median", round((o[2]+o[3])/2))
