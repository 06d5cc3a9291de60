"""The official `openai` Python client against llama-orch's orchestrator.

Run by crates/llorch-stack/tests/api.rs (openai_python_sdk), which starts the
orchestrator and passes LLORCH_BASE_URL, LLORCH_MODEL and LLORCH_ENGINE_URL.
Every check raises on failure; the script prints one line per check.
"""
import os
import time
import urllib.request
import json

import openai

base = os.environ["LLORCH_BASE_URL"]
model = os.environ["LLORCH_MODEL"]
engine = os.environ["LLORCH_ENGINE_URL"]
client = openai.OpenAI(base_url=base + "/v1", api_key="any-key-on-loopback", max_retries=0)

ids = [m.id for m in client.models.list().data]
assert model in ids, ids
print("ok models:", ids)

msgs = [{"role": "user", "content": "Name three colors."}]
r = client.chat.completions.create(model=model, messages=msgs, max_tokens=16, seed=3)
text = r.choices[0].message.content
assert r.object == "chat.completion" and text, r
assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, r.usage
assert r.choices[0].finish_reason in ("stop", "length"), r.choices[0].finish_reason
assert r.system_fingerprint.startswith("fp_"), r.system_fingerprint
print("ok chat:", repr(text), r.usage)

again = client.chat.completions.create(model=model, messages=msgs, max_tokens=16, seed=3)
assert again.choices[0].message.content == text, (again.choices[0].message.content, text)
print("ok same seed, same content")

parts, usage, roles, finish = [], None, [], None
stream = client.chat.completions.create(
    model=model, messages=msgs, max_tokens=16, seed=3, stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.role:
            roles.append(c.delta.role)
        if c.delta.content:
            parts.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
assert "".join(parts) == text, ("".join(parts), text)
assert roles == ["assistant"], roles
assert usage is not None and usage.completion_tokens == r.usage.completion_tokens, usage
assert finish == r.choices[0].finish_reason, finish
print("ok chat stream with usage")

t = client.completions.create(model=model, prompt="The sky is", max_tokens=5)
assert t.object == "text_completion" and t.choices[0].text and t.usage.completion_tokens == 5, t
print("ok completion:", repr(t.choices[0].text))

try:
    client.chat.completions.create(model=model, messages=msgs, n=2)
    raise AssertionError("n=2 was accepted")
except openai.BadRequestError as e:
    print("ok BadRequestError:", e.status_code)
try:
    client.chat.completions.create(model="no-such-model", messages=msgs)
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as e:
    print("ok NotFoundError:", e.status_code)


def slots_idle():
    with urllib.request.urlopen(engine + "/slots") as resp:
        return all(not s["is_processing"] for s in json.load(resp))


stream = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Count from one to one thousand."}],
    max_tokens=2000, stream=True,
)
n = 0
for chunk in stream:
    n += 1
    if n >= 3:
        break
stream.close()
t0 = time.monotonic()
while not slots_idle():
    assert time.monotonic() - t0 < 3, "slot still busy 3 s after closing the stream"
    time.sleep(0.01)
print("ok closing a stream early frees the slot after %.0f ms" % ((time.monotonic() - t0) * 1000))
print("all ok")
