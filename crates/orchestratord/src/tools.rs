//! Forced tool calls that hold with any model.
//!
//! llama-server turns `tools` into a template section and a tool-call
//! grammar only for chat templates that describe tools; for the others
//! (the default model's among them) `tool_choice: "required"` gives free
//! text, and it ignores a `tool_choice` that names a function. So when a
//! request forces a call (`required`, or one named function), the
//! orchestrator asks the engine for the call itself, constrained by
//! llama-server's own JSON-schema grammar (`response_format: json_schema`):
//! the arguments of the named function (its `parameters` schema), or, for
//! `required` over several tools, `{"name", "arguments"}` with one branch
//! per tool. The tools are described to the model in a system message. The
//! answer is a valid call by construction; this module puts it in OpenAI's
//! `tool_calls` shape (streamed: the arguments as `tool_calls` deltas as
//! they are generated). `auto` and `none` go to llama-server untouched.

use crate::errors::ApiError;
use serde_json::{json, Map, Value};

/// A function tool (OpenAI's `{"type": "function", "function": {…}}`).
#[derive(Clone, Debug, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: String,
    pub parameters: Value,
}

/// `tool_choice`.
#[derive(Clone, Debug, PartialEq)]
pub enum Choice {
    Auto,
    None,
    Required,
    Named(String),
}

/// Read OpenAI's `tools`.
pub fn read_tools(v: &Value) -> Result<Vec<Tool>, ApiError> {
    let list = v
        .as_array()
        .ok_or_else(|| ApiError::invalid("tools", "`tools` must be a list"))?;
    if list.len() > crate::limits::TOOLS {
        return Err(ApiError::invalid(
            "tools",
            format!("at most {} tools per request", crate::limits::TOOLS),
        ));
    }
    let mut out: Vec<Tool> = Vec::new();
    for (i, t) in list.iter().enumerate() {
        if t["type"] != "function" {
            return Err(ApiError::invalid(
                format!("tools[{i}].type"),
                "only tools of type `function` are served",
            ));
        }
        let f = &t["function"];
        let name = f["name"].as_str().unwrap_or("");
        crate::limits::check_tool_name(&format!("tools[{i}].function.name"), name)?;
        if out.iter().any(|o| o.name == name) {
            return Err(ApiError::invalid(
                format!("tools[{i}].function.name"),
                format!("two tools are named `{name}`"),
            ));
        }
        let field = format!("tools[{i}].function.parameters");
        let parameters = match &f["parameters"] {
            Value::Null => json!({"type": "object", "properties": {}}),
            // Function arguments are an object: a call streamed or not gives
            // one, so a schema of another type is refused, never half-served.
            p @ Value::Object(o)
                if o.get("type").is_none_or(|t| t == "object") && !o.contains_key("enum") =>
            {
                crate::limits::check_schema(&field, p)?;
                p.clone()
            }
            Value::Object(_) => {
                return Err(ApiError::invalid(
                    field,
                    "`parameters` must be an object schema (`\"type\": \"object\"`): a function's arguments are a JSON object",
                ))
            }
            _ => {
                return Err(ApiError::invalid(
                    field,
                    "`parameters` must be a JSON Schema object",
                ))
            }
        };
        out.push(Tool {
            name: name.into(),
            description: f["description"].as_str().unwrap_or("").into(),
            parameters,
        });
    }
    Ok(out)
}

/// Read OpenAI's `tool_choice` against the tools.
pub fn read_choice(v: Option<&Value>, tools: &[Tool]) -> Result<Choice, ApiError> {
    let c = match v {
        None | Some(Value::Null) => Choice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Choice::Auto,
            "none" => Choice::None,
            "required" => Choice::Required,
            _ => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    "tool_choice is `auto`, `none`, `required` or {\"type\": \"function\", \"function\": {\"name\": …}}",
                ))
            }
        },
        Some(o) if o["type"] == "function" && o["function"]["name"].is_string() => {
            Choice::Named(o["function"]["name"].as_str().unwrap_or("").into())
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "tool_choice",
                "tool_choice is `auto`, `none`, `required` or {\"type\": \"function\", \"function\": {\"name\": …}}",
            ))
        }
    };
    match &c {
        Choice::Required if tools.is_empty() => Err(ApiError::invalid(
            "tool_choice",
            "tool_choice `required` needs `tools`",
        )),
        Choice::Named(n) if !tools.iter().any(|t| &t.name == n) => Err(ApiError::invalid(
            "tool_choice",
            format!(
                "tool_choice names `{}`, which is not among the tools",
                llorch_types::excerpt(n, 64)
            ),
        )),
        _ => Ok(c),
    }
}

/// A call the request forces, and how it is asked of the engine.
#[derive(Clone, Debug)]
pub struct Forced {
    /// One function (named, or the only tool): the engine writes its arguments.
    pub only: Option<Tool>,
    /// Several tools under `required`: the engine writes `{"name", "arguments"}`.
    pub tools: Vec<Tool>,
}

impl Forced {
    /// The forced call of a `tool_choice`, if it forces one.
    pub fn of(choice: &Choice, tools: &[Tool]) -> Option<Forced> {
        match choice {
            Choice::Named(n) => Some(Forced {
                only: tools.iter().find(|t| &t.name == n).cloned(),
                tools: Vec::new(),
            }),
            Choice::Required if tools.len() == 1 => Some(Forced {
                only: Some(tools[0].clone()),
                tools: Vec::new(),
            }),
            Choice::Required => Some(Forced {
                only: None,
                tools: tools.to_vec(),
            }),
            _ => None,
        }
    }

    /// The system text that tells the model what to call.
    pub fn instruction(&self) -> String {
        match &self.only {
            Some(t) => format!(
                "Call the function `{}`{}. Reply with only its arguments: one JSON object that follows this JSON Schema: {}",
                t.name,
                if t.description.is_empty() { String::new() } else { format!(" ({})", t.description) },
                t.parameters
            ),
            None => {
                let list: Vec<Value> = self
                    .tools
                    .iter()
                    .map(|t| json!({"name": t.name, "description": t.description, "parameters": t.parameters}))
                    .collect();
                format!(
                    "Call one of these functions. Reply with only one JSON object {{\"name\": <the function's name>, \"arguments\": <its arguments>}}. The functions: {}",
                    Value::Array(list)
                )
            }
        }
    }

    /// The JSON Schema of the engine's answer.
    pub fn schema(&self) -> Value {
        match &self.only {
            Some(t) => t.parameters.clone(),
            None => json!({"anyOf": self.tools.iter().map(|t| json!({
                "type": "object",
                "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })).collect::<Vec<_>>()}),
        }
    }

    /// Rewrite an OpenAI chat body for the engine: the instruction as (or
    /// after) the system message, the schema as `response_format`, no tools.
    pub fn apply(&self, body: &mut Map<String, Value>) {
        for k in [
            "tools",
            "tool_choice",
            "parallel_tool_calls",
            "response_format",
        ] {
            body.remove(k);
        }
        let text = self.instruction();
        if let Some(Value::Array(msgs)) = body.get_mut("messages") {
            let first_is_system = msgs.first().is_some_and(|m| {
                matches!(m["role"].as_str(), Some("system" | "developer"))
                    && m["content"].is_string()
            });
            if first_is_system {
                let c = msgs[0]["content"].as_str().unwrap_or("").to_string();
                msgs[0]["content"] = Value::String(format!("{c}\n\n{text}"));
            } else {
                msgs.insert(0, json!({"role": "system", "content": text}));
            }
        }
        body.insert(
            "response_format".into(),
            json!({"type": "json_schema", "json_schema": {"name": "tool_call", "strict": true, "schema": self.schema()}}),
        );
    }

    /// The call in the engine's answer: the function's name and its
    /// arguments as JSON text; `None` when the answer is not a whole call
    /// (cut by `max_tokens`).
    pub fn call(&self, content: &str) -> Option<(String, String)> {
        let v: Value = serde_json::from_str(content.trim()).ok()?;
        match &self.only {
            Some(t) => v
                .is_object()
                .then(|| (t.name.clone(), content.trim().to_string())),
            None => {
                let name = v["name"].as_str()?;
                self.tools.iter().find(|t| t.name == name)?;
                Some((name.to_string(), v["arguments"].to_string()))
            }
        }
    }

    /// A non-streamed chat completion: its content becomes `tool_calls`.
    pub fn edit_response(&self, v: &mut Value, call_id: &str) {
        for c in v["choices"].as_array_mut().into_iter().flatten() {
            let content = c["message"]["content"].as_str().unwrap_or("").to_string();
            if let Some((name, args)) = self.call(&content) {
                c["message"]["content"] = Value::Null;
                c["message"]["tool_calls"] = json!([{"id": call_id, "type": "function",
                    "function": {"name": name, "arguments": args}}]);
                if c["finish_reason"] == "stop" {
                    c["finish_reason"] = json!("tool_calls");
                }
            }
        }
    }

    /// Edits a streamed chat completion chunk by chunk.
    pub fn stream_editor(&self, call_id: String) -> StreamEditor {
        StreamEditor {
            forced: self.clone(),
            call_id,
            started: false,
            text: String::new(),
        }
    }
}

/// The state of a streamed forced call.
pub struct StreamEditor {
    forced: Forced,
    call_id: String,
    started: bool,
    /// The answer so far (several tools: sent whole at the end).
    text: String,
}

impl StreamEditor {
    /// One chunk in, the chunks to send out.
    pub fn chunk(&mut self, mut v: Value) -> Vec<Value> {
        let Some(c) = v["choices"].get_mut(0) else {
            return vec![v];
        };
        let piece = c["delta"]["content"].as_str().unwrap_or("").to_string();
        let finish = c["finish_reason"].as_str().map(str::to_string);
        if let Some(d) = c["delta"].as_object_mut() {
            d.remove("content");
        }
        let mut out = Vec::new();
        if !piece.is_empty() {
            self.text.push_str(&piece);
            if let Some(t) = &self.forced.only {
                let mut call = json!({"index": 0, "function": {"arguments": piece}});
                if !self.started {
                    self.started = true;
                    call["id"] = json!(self.call_id);
                    call["type"] = json!("function");
                    call["function"]["name"] = json!(t.name);
                }
                c["delta"]["tool_calls"] = json!([call]);
            }
        }
        match finish.as_deref() {
            Some(f) if self.forced.only.is_none() => {
                // Several tools: the whole call, then the finish; a call cut
                // by `max_tokens` (or any other end) is the text so far, as
                // the non-streamed answer gives it.
                let mut head = v.clone();
                head["choices"][0]["finish_reason"] = Value::Null;
                match self.forced.call(&self.text).filter(|_| f == "stop") {
                    Some((name, args)) => {
                        head["choices"][0]["delta"] = json!({"tool_calls": [{"index": 0, "id": self.call_id, "type": "function",
                            "function": {"name": name, "arguments": args}}]});
                        v["choices"][0]["finish_reason"] = json!("tool_calls");
                    }
                    None => head["choices"][0]["delta"] = json!({"content": self.text}),
                }
                out.push(head);
                out.push(v);
            }
            Some("stop") => {
                v["choices"][0]["finish_reason"] = json!("tool_calls");
                out.push(v);
            }
            _ => {
                let empty = v["choices"][0]["delta"]
                    .as_object()
                    .is_some_and(|d| d.is_empty());
                if !(empty && !piece.is_empty() && self.forced.only.is_none()) {
                    out.push(v);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools() -> Vec<Tool> {
        read_tools(&json!([
            {"type": "function", "function": {"name": "get_weather", "description": "the weather",
             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "get_time"}}
        ]))
        .unwrap()
    }

    #[test]
    fn tools_and_choices_are_checked() {
        let t = tools();
        assert_eq!(t[1].parameters["type"], "object");
        assert_eq!(read_choice(None, &t).unwrap(), Choice::Auto);
        assert_eq!(
            read_choice(
                Some(&json!({"type": "function", "function": {"name": "get_time"}})),
                &t
            )
            .unwrap(),
            Choice::Named("get_time".into())
        );
        let e = read_choice(
            Some(&json!({"type": "function", "function": {"name": "nope"}})),
            &t,
        )
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("tool_choice"));
        assert!(read_choice(Some(&json!("sometimes")), &t).is_err());
        assert!(read_choice(Some(&json!("required")), &[]).is_err());
        let e = read_tools(&json!([{"type": "retrieval"}])).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("tools[0].type"));
        let e =
            read_tools(&json!([{"type": "function", "function": {"name": "a b"}}])).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("tools[0].function.name"));
        let dup = json!([{"type": "function", "function": {"name": "a"}}, {"type": "function", "function": {"name": "a"}}]);
        assert!(read_tools(&dup).is_err());
        assert!(read_tools(&json!(vec![
            json!({"type": "function", "function": {"name": "a"}});
            200
        ]))
        .is_err());
    }

    #[test]
    fn a_named_call_is_its_arguments_and_several_tools_name_themselves() {
        let t = tools();
        let named = Forced::of(&Choice::Named("get_weather".into()), &t).unwrap();
        assert_eq!(named.schema()["required"], json!(["city"]));
        assert_eq!(
            named.call(" {\"city\": \"Paris\"}\n"),
            Some(("get_weather".into(), "{\"city\": \"Paris\"}".into()))
        );
        assert_eq!(named.call("{\"city\": \"Par"), None);
        let any = Forced::of(&Choice::Required, &t).unwrap();
        assert_eq!(any.schema()["anyOf"].as_array().unwrap().len(), 2);
        assert_eq!(
            any.call(r#"{"name": "get_time", "arguments": {}}"#),
            Some(("get_time".into(), "{}".into()))
        );
        assert_eq!(any.call(r#"{"name": "other", "arguments": {}}"#), None);
        assert!(Forced::of(&Choice::Auto, &t).is_none());
        assert!(Forced::of(&Choice::Required, &t[..1])
            .unwrap()
            .only
            .is_some());
    }

    #[test]
    fn the_engine_body_carries_the_schema_and_the_instruction() {
        let t = tools();
        let f = Forced::of(&Choice::Named("get_weather".into()), &t).unwrap();
        let mut b = json!({"messages": [{"role": "user", "content": "hi"}], "tools": [], "tool_choice": "required"})
            .as_object()
            .unwrap()
            .clone();
        f.apply(&mut b);
        assert!(!b.contains_key("tools") && !b.contains_key("tool_choice"));
        assert_eq!(b["messages"][0]["role"], "system");
        assert!(b["messages"][0]["content"]
            .as_str()
            .unwrap()
            .contains("get_weather"));
        assert_eq!(
            b["response_format"]["json_schema"]["schema"]["required"],
            json!(["city"])
        );
        let mut b = json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]})
            .as_object()
            .unwrap()
            .clone();
        f.apply(&mut b);
        assert_eq!(b["messages"].as_array().unwrap().len(), 2);
        assert!(b["messages"][0]["content"]
            .as_str()
            .unwrap()
            .starts_with("Be brief.\n\nCall"));
    }

    #[test]
    fn streamed_calls_reassemble_to_the_whole_call() {
        let t = tools();
        let chunk = |content: Option<&str>, finish: Option<&str>| json!({"choices": [{"index": 0, "delta": match content { Some(c) => json!({"content": c}), None => json!({"role": "assistant", "content": null}) }, "finish_reason": finish}]});
        for (f, pieces, want_name, want_args) in [
            (
                Forced::of(&Choice::Named("get_weather".into()), &t).unwrap(),
                vec!["{\"city\"", ": \"Paris\"}"],
                "get_weather",
                "{\"city\": \"Paris\"}",
            ),
            (
                Forced::of(&Choice::Required, &t).unwrap(),
                vec!["{\"name\": \"get_time\",", " \"arguments\": {}}"],
                "get_time",
                "{}",
            ),
        ] {
            let mut ed = f.stream_editor("call_1".into());
            let mut out = ed.chunk(chunk(None, None));
            for p in pieces {
                out.extend(ed.chunk(chunk(Some(p), None)));
            }
            out.extend(
                ed.chunk(json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})),
            );
            let (mut name, mut args, mut id) = (String::new(), String::new(), String::new());
            for o in &out {
                assert!(
                    o["choices"][0]["delta"]
                        .get("content")
                        .is_none_or(Value::is_null),
                    "{o}"
                );
                for c in o["choices"][0]["delta"]["tool_calls"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    name.push_str(c["function"]["name"].as_str().unwrap_or(""));
                    args.push_str(c["function"]["arguments"].as_str().unwrap_or(""));
                    id.push_str(c["id"].as_str().unwrap_or(""));
                }
            }
            assert_eq!(
                (name.as_str(), args.as_str(), id.as_str()),
                (want_name, want_args, "call_1")
            );
            assert_eq!(
                out.last().unwrap()["choices"][0]["finish_reason"],
                "tool_calls"
            );
        }
    }

    #[test]
    fn a_streamed_call_over_several_tools_cut_by_max_tokens_gives_its_text_as_plain_does() {
        let t = tools();
        let f = Forced::of(&Choice::Required, &t).unwrap();
        let mut e = f.stream_editor("call_1".into());
        let chunk = |content: &str, finish: Value| json!({"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]});
        let mut out = Vec::new();
        out.extend(e.chunk(chunk("{\"name\": \"get_wea", Value::Null)));
        out.extend(e.chunk(chunk("ther\", \"argu", Value::Null)));
        out.extend(e.chunk(chunk("", json!("length"))));
        let text: String = out
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, "{\"name\": \"get_weather\", \"argu");
        assert_eq!(out.last().unwrap()["choices"][0]["finish_reason"], "length");
        // The non-streamed answer of the same cut call: the same text.
        let mut v = json!({"choices": [{"index": 0, "message": {"content": text.clone()}, "finish_reason": "length"}]});
        f.edit_response(&mut v, "call_1");
        assert_eq!(v["choices"][0]["message"]["content"], json!(text));
    }
}
