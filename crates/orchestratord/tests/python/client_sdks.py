"""The clients people point at a local server, against the orchestrator:
the official `openai` and `anthropic` SDKs and `langchain-openai` (pinned in
tests/client_api.rs). Every answer comes from the real engine; a failed check
raises, and the last line is "all ok" only when every check passed."""

import json
import os
import sys

import anthropic
import jsonschema
import openai
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI, OpenAIEmbeddings

BASE = os.environ["LLORCH_BASE_URL"]
MODEL = os.environ["LLORCH_MODEL"]
EMBED = os.environ["LLORCH_EMBED_MODEL"]
N_EMBD = int(os.environ["LLORCH_N_EMBD"])

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
]
ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok:", what)


oa = openai.OpenAI(base_url=BASE + "/v1", api_key="unused", max_retries=0)

# A forced tool call (tool_choice names the function): arguments that parse and validate.
r = oa.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=80,
                               tool_choice={"type": "function", "function": {"name": "get_weather"}})
call = r.choices[0].message.tool_calls[0]
args = json.loads(call.function.arguments)
jsonschema.validate(args, WEATHER)
check(call.function.name == "get_weather" and r.choices[0].finish_reason == "tool_calls",
      f"forced tool call get_weather({call.function.arguments})")

# The same call streamed: the deltas reassemble to the non-streamed call.
name, arguments, ids = "", "", set()
with oa.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=80, stream=True,
                                tool_choice={"type": "function", "function": {"name": "get_weather"}}) as s:
    for chunk in s:
        for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            name += tc.function.name or ""
            arguments += tc.function.arguments or ""
            if tc.id:
                ids.add(tc.id)
check((name, arguments) == ("get_weather", call.function.arguments) and len(ids) == 1,
      "streamed tool call equals the non-streamed one")

# `required` over two tools: one valid call of one of them.
r = oa.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=80)
call = r.choices[0].message.tool_calls[0]
schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[call.function.name]
jsonschema.validate(json.loads(call.function.arguments), schema)
check(True, f"required tool call {call.function.name}({call.function.arguments})")

# Structured output: a json_schema response that validates.
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
r = oa.chat.completions.create(model=MODEL, max_tokens=80,
                               messages=[{"role": "user", "content": "Describe a person as JSON."}],
                               response_format={"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": PERSON}})
jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
check(True, f"json_schema answer {r.choices[0].message.content!r}")

# Embeddings: the model's width, the same vectors twice.
e1 = oa.embeddings.create(model=EMBED, input=["the cat sat", "on the mat"])
e2 = oa.embeddings.create(model=EMBED, input=["the cat sat", "on the mat"])
check(len(e1.data) == 2 and all(len(d.embedding) == N_EMBD for d in e1.data), f"embeddings of width n_embd={N_EMBD}")
check([d.embedding for d in e1.data] == [d.embedding for d in e2.data], "embeddings are deterministic")
check(e1.usage.prompt_tokens > 0, "embeddings report usage")

# Responses: plain and streamed.
r = oa.responses.create(model=MODEL, input="Say hello.", instructions="Be brief.", max_output_tokens=16)
check(r.output_text.strip() != "", f"responses.create: {r.output_text!r}")
deltas, final = "", None
with oa.responses.stream(model=MODEL, input="Say hello.", instructions="Be brief.", max_output_tokens=16) as s:
    for ev in s:
        if ev.type == "response.output_text.delta":
            deltas += ev.delta
    final = s.get_final_response()
check(deltas == final.output_text == r.output_text, "streamed response equals the plain one")

# Errors arrive as the SDK's exception types.
try:
    oa.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    check(False, "unknown tool refused")
except openai.BadRequestError as ex:
    check("nope" in str(ex), "an unknown tool_choice is openai.BadRequestError")
try:
    oa.embeddings.create(model=MODEL, input="x")
    check(False, "embeddings from a chat pool refused")
except openai.BadRequestError as ex:
    check("serves generation" in str(ex), "embeddings from a chat pool is openai.BadRequestError")

# Anthropic's SDK: plain, streamed, a forced tool_use block, typed errors.
an = anthropic.Anthropic(base_url=BASE, api_key="unused", max_retries=0)
m = an.messages.create(model=MODEL, max_tokens=24, system="Be brief.", messages=[{"role": "user", "content": "Say hello."}])
check(m.content[0].type == "text" and m.content[0].text.strip() != "", f"messages.create: {m.content[0].text!r}")
with an.messages.stream(model=MODEL, max_tokens=24, system="Be brief.", messages=[{"role": "user", "content": "Say hello."}]) as s:
    streamed = "".join(s.text_stream)
check(streamed == m.content[0].text, "messages.stream equals messages.create")
m = an.messages.create(model=MODEL, max_tokens=80, messages=ASK,
                       tools=[{"name": "get_weather", "description": "The weather in a city", "input_schema": WEATHER}],
                       tool_choice={"type": "tool", "name": "get_weather"})
block = m.content[0]
jsonschema.validate(block.input, WEATHER)
check(block.type == "tool_use" and block.name == "get_weather" and m.stop_reason == "tool_use", f"tool_use block {block.input}")
try:
    an.messages.create(model="no-such-model", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    check(False, "unknown model refused")
except anthropic.NotFoundError as ex:
    check(ex.body["error"]["type"] == "not_found_error", "an unknown model is anthropic.NotFoundError")
try:
    an.messages.create(model=MODEL, max_tokens=8, temperature=5, messages=[{"role": "user", "content": "x"}])
    check(False, "temperature 5 refused")
except anthropic.BadRequestError as ex:
    check(ex.body["error"]["type"] == "invalid_request_error", "a bad temperature is anthropic.BadRequestError")

# langchain-openai: a bound tool is called; documents are embedded.


@tool
def get_weather(city: str, unit: str) -> str:
    """The weather in a city (unit: celsius or fahrenheit)."""
    return "sunny"


llm = ChatOpenAI(base_url=BASE + "/v1", api_key="unused", model=MODEL, max_tokens=80, max_retries=0)
msg = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Paris, in celsius?")
check(len(msg.tool_calls) == 1 and msg.tool_calls[0]["name"] == "get_weather" and "city" in msg.tool_calls[0]["args"],
      f"langchain bind_tools: {msg.tool_calls[0]['args']}")
emb = OpenAIEmbeddings(base_url=BASE + "/v1", api_key="unused", model=EMBED, check_embedding_ctx_length=False)
vecs = emb.embed_documents(["the cat sat", "on the mat"])
check(len(vecs) == 2 and all(len(v) == N_EMBD for v in vecs), "langchain OpenAIEmbeddings embeds two documents")

print("all ok")
sys.stdout.flush()
