//! The status page's HTML, rendered on the server from a snapshot (so it
//! reads without its script too); `app.js` renders the same tables from each
//! pushed snapshot with DOM text nodes. Every value is escaped here: pool
//! ids, model names, reasons and log lines are attacker-controlled text.

use serde_json::Value;
use std::fmt::Write;

pub const APP_JS: &str = include_str!("app.js");
pub const APP_CSS: &str = include_str!("app.css");

/// `text` safe in HTML text and in a double-quoted attribute.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A JSON value as table text (`–` for null).
fn text(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "–".into(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.1}"),
            _ => n.to_string(),
        },
        Some(v) => v.to_string(),
    }
}

fn cell(out: &mut String, class: &str, v: &str) {
    let _ = write!(out, "<td class=\"{}\">{}</td>", esc(class), esc(v));
}

fn head(out: &mut String, names: &[&str]) {
    out.push_str("<thead><tr>");
    for n in names {
        let _ = write!(out, "<th>{}</th>", esc(n));
    }
    out.push_str("</tr></thead>");
}

/// Seconds as `1h 2m`, `3m 4s`, `5s`.
pub fn ago(s: Option<f64>) -> String {
    let Some(s) = s.filter(|s| s.is_finite() && *s >= 0.0) else {
        return "–".into();
    };
    let s = s.round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        _ => format!("{}h {}m", s / 3600, (s % 3600) / 60),
    }
}

pub const POOL_COLUMNS: &[&str] = &[
    "pool",
    "state",
    "mode",
    "replicas",
    "slots",
    "capacity",
    "queued",
    "running",
    "tokens/s (1 min)",
    "ready for",
    "idle unload in",
    "engine log",
];
pub const REPLICA_COLUMNS: &[&str] = &[
    "pool", "replica", "state", "devices", "queued", "running", "restarts", "tokens",
];
pub const ENGINE_COLUMNS: &[&str] = &[
    "pool",
    "fingerprint",
    "llama.cpp",
    "model",
    "model sha256",
    "system_fingerprint",
    "sandbox",
];
pub const REQUEST_COLUMNS: &[&str] = &[
    "ended",
    "API",
    "pool",
    "replica",
    "status",
    "prompt tokens",
    "tokens",
    "queue wait ms",
    "TTFT ms",
    "tokens/s",
];
pub const EVENT_COLUMNS: &[&str] = &["at", "pool", "replica", "from", "to"];

fn arr<'a>(v: &'a Value, k: &str) -> &'a [Value] {
    v.get(k)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// ISO-like UTC time of a Unix millisecond count.
fn clock(ms: Option<&Value>) -> String {
    let Some(ms) = ms.and_then(Value::as_u64) else {
        return "–".into();
    };
    let s = ms / 1000;
    format!("{:02}:{:02}:{:02}Z", (s / 3600) % 24, (s / 60) % 60, s % 60)
}

fn pools(out: &mut String, snap: &Value) {
    out.push_str("<table id=\"pools\">");
    head(out, POOL_COLUMNS);
    out.push_str("<tbody>");
    for p in arr(snap, "pools") {
        let id = text(p.get("id"));
        let mut state = text(p.get("state"));
        if let Some(r) = p.get("failed_reason").and_then(Value::as_str) {
            state = format!("{state}: {r}");
        }
        let reps = arr(p, "replicas");
        let replicas = reps
            .iter()
            .map(|r| text(r.get("state")))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = write!(
            out,
            "<tr data-pool=\"{}\" data-state=\"{}\">",
            esc(&id),
            esc(&text(p.get("state")))
        );
        cell(out, "id", &id);
        cell(out, "state", &state);
        cell(out, "mode", &text(p.get("mode")));
        cell(out, "replicas", &format!("{} ({replicas})", reps.len()));
        cell(out, "slots", &text(p.get("slots")));
        cell(out, "capacity", &text(p.get("capacity")));
        cell(out, "queued", &text(p.get("queue_depth")));
        cell(out, "running", &text(p.get("running")));
        cell(out, "rate", &text(p.get("tokens_per_s")));
        cell(
            out,
            "ready-for",
            &ago(p.get("ready_for_s").and_then(Value::as_f64)),
        );
        cell(
            out,
            "unload-in",
            &ago(p.get("idle_unload_in_s").and_then(Value::as_f64)),
        );
        let _ = write!(
            out,
            "<td class=\"log\"><button type=\"button\" data-log=\"{}\">show</button></td></tr>",
            esc(&id)
        );
    }
    out.push_str("</tbody></table>");
}

fn replicas(out: &mut String, snap: &Value) {
    out.push_str("<table id=\"replicas\">");
    head(out, REPLICA_COLUMNS);
    out.push_str("<tbody>");
    for p in arr(snap, "pools") {
        for r in arr(p, "replicas") {
            let _ = write!(
                out,
                "<tr data-run=\"{}\" data-state=\"{}\">",
                esc(&text(r.get("run_id"))),
                esc(&text(r.get("state")))
            );
            cell(out, "pool", &text(p.get("id")));
            cell(out, "replica", &text(r.get("run_id")));
            cell(out, "state", &text(r.get("state")));
            let devices = arr(r, "devices")
                .iter()
                .map(|d| format!("GPU {d}"))
                .collect::<Vec<_>>()
                .join(", ");
            cell(
                out,
                "devices",
                if devices.is_empty() {
                    "CPU or all"
                } else {
                    &devices
                },
            );
            cell(out, "queued", &text(r.get("queue_depth")));
            cell(out, "running", &text(r.get("running")));
            cell(out, "restarts", &text(r.get("restarts")));
            cell(out, "tokens", &text(r.get("tokens_out")));
            out.push_str("</tr>");
        }
    }
    out.push_str("</tbody></table>");
}

fn engines(out: &mut String, snap: &Value) {
    out.push_str("<table id=\"engines\">");
    head(out, ENGINE_COLUMNS);
    out.push_str("<tbody>");
    for p in arr(snap, "pools") {
        out.push_str("<tr>");
        cell(out, "pool", &text(p.get("id")));
        cell(out, "fingerprint", &text(p.get("fingerprint")));
        cell(out, "pin", &text(p.get("engine_version")));
        let model = p.get("model");
        cell(out, "model", &text(model.and_then(|m| m.get("ref"))));
        cell(out, "digest", &text(model.and_then(|m| m.get("digest"))));
        cell(out, "sysfp", &text(p.get("system_fingerprint")));
        cell(out, "sandbox", &sandbox(p.get("sandbox")));
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
}

/// The engine's sandbox (the handoff's record of it) as one line.
pub fn sandbox(v: Option<&Value>) -> String {
    let Some(o) = v.and_then(Value::as_object) else {
        return "not recorded".into();
    };
    let on = |k: &str| o.get(k).and_then(Value::as_bool).unwrap_or(false);
    let mode = text(o.get("mode"));
    if mode == "off" {
        return "off".into();
    }
    let mut parts = Vec::new();
    if on("filesystem") {
        parts.push(format!("landlock v{}", text(o.get("landlock_abi"))));
    }
    for k in ["seccomp", "no_new_privs", "rlimits"] {
        if on(k) {
            parts.push(k.to_string());
        }
    }
    format!("{mode}: {}", parts.join(", "))
}

fn requests(out: &mut String, snap: &Value) {
    out.push_str("<table id=\"requests\">");
    head(out, REQUEST_COLUMNS);
    out.push_str("<tbody>");
    for r in arr(snap, "requests") {
        let _ = write!(
            out,
            "<tr class=\"request\" data-status=\"{}\">",
            esc(&text(r.get("status")))
        );
        cell(out, "at", &clock(r.get("at_ms")));
        cell(out, "api", &text(r.get("api")));
        cell(out, "pool", &text(r.get("pool")));
        cell(out, "replica", &text(r.get("replica")));
        cell(out, "status", &text(r.get("status")));
        cell(out, "prompt", &text(r.get("prompt_tokens")));
        cell(out, "tokens", &text(r.get("tokens_out")));
        cell(out, "wait", &text(r.get("queue_wait_ms")));
        cell(out, "ttft", &text(r.get("ttft_ms")));
        cell(out, "tps", &text(r.get("tokens_per_s")));
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
}

fn events(out: &mut String, snap: &Value) {
    out.push_str("<table id=\"events\">");
    head(out, EVENT_COLUMNS);
    out.push_str("<tbody>");
    for e in arr(snap, "events") {
        out.push_str("<tr>");
        cell(out, "at", &clock(e.get("at_ms")));
        cell(out, "pool", &text(e.get("pool")));
        cell(out, "replica", &text(e.get("replica")));
        cell(out, "from", &text(e.get("from")));
        cell(out, "to", &text(e.get("to")));
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
}

fn gpus(out: &mut String, snap: &Value) {
    let g = arr(snap, "gpus");
    out.push_str("<p id=\"gpus\">");
    if g.is_empty() {
        out.push_str("no GPU reading (a CPU host, or no nvidia-smi)");
    } else {
        let parts: Vec<String> = g
            .iter()
            .map(|d| {
                format!(
                    "GPU {}: {} of {} MiB used",
                    text(d.get("index")),
                    text(d.get("used_mib")),
                    text(d.get("total_mib"))
                )
            })
            .collect();
        out.push_str(&esc(&parts.join(" · ")));
    }
    out.push_str("</p>");
}

fn document(title: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>{}</title><link rel=\"stylesheet\" href=\"/status/app.css\">\
<script src=\"/status/app.js\" defer></script></head><body>{body}</body></html>\n",
        esc(title)
    )
}

/// The whole page for one snapshot.
pub fn render(snap: &Value) -> String {
    let mut b = String::new();
    let _ = write!(
        b,
        "<header><h1>llama-orch</h1><span id=\"overall\" data-state=\"{0}\">{0}</span>\
<span id=\"live\" data-live=\"no\">not live</span><span id=\"seq\">{1}</span></header>",
        esc(&text(snap.get("state"))),
        esc(&text(snap.get("seq")))
    );
    b.push_str("<main><h2>Pools</h2>");
    pools(&mut b, snap);
    b.push_str("<h2>Replicas</h2>");
    replicas(&mut b, snap);
    b.push_str("<h2>Engines</h2>");
    engines(&mut b, snap);
    gpus(&mut b, snap);
    b.push_str("<h2>Last requests</h2><p class=\"note\">Counts and times only: prompts and outputs are never recorded.</p>");
    requests(&mut b, snap);
    b.push_str("<h2>State changes</h2>");
    events(&mut b, snap);
    b.push_str(
        "<section id=\"log\" hidden><h2 id=\"log-title\">Engine log</h2><pre id=\"log-text\"></pre></section></main>",
    );
    document("llama-orch status", &b)
}

/// The login form (the token off loopback); the script posts it as JSON.
pub fn login() -> String {
    document(
        "llama-orch status: sign in",
        "<main><h1>llama-orch</h1><form id=\"login\"><label>API token \
<input type=\"password\" name=\"token\" autocomplete=\"current-password\" required></label> \
<button type=\"submit\">Sign in</button></form><p id=\"login-error\" hidden></p>\
<p class=\"note\">The token is kept in a cookie for this site only, for the status page only.</p></main>",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hostile_text_is_escaped_everywhere_it_is_shown() {
        let evil = "<script>alert(1)</script><img src=x onerror=\"alert(2)\">'&";
        let snap = json!({
            "seq": 3, "state": evil,
            "pools": [{
                "id": evil, "state": "failed", "failed_reason": evil, "mode": evil,
                "model": {"ref": evil, "digest": evil}, "fingerprint": evil,
                "engine_version": evil, "system_fingerprint": evil, "sandbox": {"mode": evil, "filesystem": true, "landlock_abi": evil},
                "replicas": [{"run_id": evil, "state": evil, "devices": [evil]}],
            }],
            "requests": [{"api": evil, "pool": evil, "status": evil}],
            "events": [{"pool": evil, "from": evil, "to": evil}],
            "gpus": [{"index": evil}],
        });
        let page = render(&snap);
        assert!(!page.contains("<script>alert"), "{page}");
        assert!(!page.contains("<img"), "{page}");
        assert!(!page.contains("onerror=\""), "{page}");
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        // The only script is the page's own file.
        assert_eq!(page.matches("<script").count(), 1);
        assert!(page.contains("<script src=\"/status/app.js\" defer></script>"));
        // No inline handlers or styles at all (the CSP would refuse them).
        assert!(!page.contains(" style="));
    }

    #[test]
    fn an_empty_or_odd_snapshot_still_renders() {
        for snap in [json!({}), json!(null), json!({"pools": 5, "requests": "x"})] {
            let page = render(&snap);
            assert!(page.contains("<table id=\"pools\">"));
        }
        assert_eq!(ago(Some(3725.0)), "1h 2m");
        assert_eq!(ago(Some(f64::NAN)), "–");
        assert_eq!(ago(Some(-1.0)), "–");
        assert_eq!(clock(Some(&json!(3_600_000u64 * 25 + 61_000))), "01:01:01Z");
    }

    #[test]
    fn the_script_never_writes_markup() {
        // The page's script builds the DOM from text nodes only.
        for bad in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!APP_JS.contains(bad), "app.js uses {bad}");
        }
    }
}
