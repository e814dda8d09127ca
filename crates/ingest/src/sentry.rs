//! Sentry's ingest formats: the envelope (`/api/<project>/envelope/`) and
//! the legacy store endpoint (`/api/<project>/store/`), and an event turned
//! into what `fraiseql_capture_error` / `fraiseql_capture_message` store.
//!
//! Grouping uses the event's structured frames directly
//! (`fraiseql_fingerprint::frames_fingerprint`, with the SDK's own `in_app`
//! flags), never a re-parse of text; the stack trace is also rendered as
//! text in the platform's own format, for display and the group's culprit.
//! A `transaction` becomes OTLP/JSON spans, which the extension stores with
//! its OTLP path.
use fraiseql_fingerprint::{custom_fingerprint, frames_fingerprint, message_fingerprint};
use serde_json::{json, Map, Value};

/// What one envelope item (or a store request) asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Event(Box<Capture>),
    /// an OTLP/JSON ExportTraceServiceRequest
    Spans(Value),
    /// an item type not stored (session, client_report, attachment...)
    Skipped(String),
}

/// One occurrence, as the SQL capture functions take it.
#[derive(Debug, Clone, PartialEq)]
pub struct Capture {
    /// 32 lowercase hex digits
    pub event_id: String,
    /// no exception: `fraiseql_capture_message`
    pub is_message: bool,
    pub exception_type: String,
    pub message: String,
    pub stack_trace: Option<String>,
    /// the group key, final (custom fingerprints applied)
    pub fingerprint: String,
    pub context: Value,
    pub environment: Option<String>,
    pub severity: String,
    pub release: Option<String>,
    pub trace_id: Option<String>,
    pub span_id: Option<String>,
    /// seconds since the epoch
    pub timestamp: Option<f64>,
}

/// The parts of `X-Sentry-Auth` (or the query string, or the envelope's
/// DSN) that name the key.
pub fn key_from_auth_header(v: &str) -> Option<String> {
    let v = v.trim();
    let v = v.strip_prefix("Sentry ").or_else(|| v.strip_prefix("sentry ")).unwrap_or(v);
    v.split(',').find_map(|kv| {
        let (k, val) = kv.trim().split_once('=')?;
        (k.trim() == "sentry_key").then(|| val.trim().trim_matches('"').to_string())
    })
}

/// The public key of a DSN (`http://<key>@host/<project>`), and its project id.
pub fn key_from_dsn(dsn: &str) -> Option<(String, String)> {
    let rest = dsn.split_once("://")?.1;
    let (userinfo, hostpath) = rest.split_once('@')?;
    let key = userinfo.split(':').next()?.to_string();
    let project = hostpath.trim_end_matches('/').rsplit('/').next()?.to_string();
    Some((key, project))
}

#[derive(Debug)]
pub struct Envelope {
    pub header: Value,
    pub items: Vec<(String, Value, Vec<u8>)>,
}

/// Envelope framing: a header line, then items, each a header line and a
/// payload of the header's `length` bytes, or up to the next newline when
/// it has none.
pub fn parse_envelope(body: &[u8]) -> Result<Envelope, String> {
    let (first, mut rest) = split_line(body);
    if first.len() > 64 * 1024 {
        return Err("envelope header line over 64 kB".into());
    }
    let header: Value = parse_json(first).map_err(|e| format!("envelope header: {e}"))?;
    if !header.is_object() {
        return Err("envelope header is not an object".into());
    }
    let mut items = Vec::new();
    while !rest.is_empty() {
        let (line, after) = split_line(rest);
        if line.iter().all(|c| c.is_ascii_whitespace()) {
            rest = after;
            continue;
        }
        if line.len() > 64 * 1024 {
            return Err("item header line over 64 kB".into());
        }
        let ih: Value = parse_json(line).map_err(|e| format!("item header {}: {e}", items.len() + 1))?;
        let ty = ih
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("item header {} has no type", items.len() + 1))?
            .to_string();
        let (payload, next) = match ih.get("length") {
            Some(Value::Number(n)) => {
                let n = n.as_u64().ok_or("item length is not a count")? as usize;
                if n > after.len() {
                    return Err(format!("item {} is cut short ({} of {n} bytes)", items.len() + 1, after.len()));
                }
                let next = &after[n..];
                // the newline after a payload is optional at the end
                let next = next.strip_prefix(b"\n").unwrap_or(next);
                (&after[..n], next)
            }
            Some(Value::Null) | None => split_line(after),
            Some(_) => return Err("item length is not a number".into()),
        };
        items.push((ty, ih, payload.to_vec()));
        rest = next;
        if items.len() > 1000 {
            return Err("too many items".into());
        }
    }
    Ok(Envelope { header, items })
}

fn split_line(b: &[u8]) -> (&[u8], &[u8]) {
    match b.iter().position(|c| *c == b'\n') {
        Some(i) => (&b[..i], &b[i + 1..]),
        None => (b, &[]),
    }
}

/// Events and transactions one envelope may carry (an SDK sends one).
pub const MAX_EVENTS_PER_ENVELOPE: usize = 100;

/// What an envelope holds, item by item (each parsed, mapped and its
/// parsed form dropped before the next).
pub fn envelope_items(env: &Envelope) -> Vec<Result<Item, String>> {
    let events = env.items.iter().filter(|(ty, _, _)| ty == "event" || ty == "transaction").count();
    if events > MAX_EVENTS_PER_ENVELOPE {
        return vec![Err(format!("more than {MAX_EVENTS_PER_ENVELOPE} events in one envelope"))];
    }
    // the header's event id is the event's only when there is one event
    let event_id = env.header.get("event_id").and_then(Value::as_str).filter(|_| events == 1);
    env.items
        .iter()
        .map(|(ty, _, payload)| match ty.as_str() {
            "event" | "transaction" => {
                let mut v: Value = parse_json(payload).map_err(|e| format!("{ty} item: {e}"))?;
                if let (Some(id), Some(o)) = (event_id, v.as_object_mut()) {
                    o.entry("event_id").or_insert_with(|| json!(id));
                }
                if ty == "event" {
                    event(&v).map(|c| Item::Event(Box::new(c)))
                } else {
                    transaction(&v).map(Item::Spans)
                }
            }
            other => Ok(Item::Skipped(other.to_string())),
        })
        .collect()
}

/// A store request's body: one event (or transaction).
pub fn store_item(body: &[u8]) -> Result<Item, String> {
    let v: Value = parse_json(body).map_err(|e| format!("event: {e}"))?;
    if v.get("type").and_then(Value::as_str) == Some("transaction") {
        return transaction(&v).map(Item::Spans);
    }
    event(&v).map(|c| Item::Event(Box::new(c)))
}

// ---------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------

/// A text without NUL characters (PostgreSQL's text cannot hold them).
fn clean(s: &str) -> String {
    s.replace('\u{0}', "")
}

/// Every string in a JSON value without NUL characters.
fn clean_value(v: Value) -> Value {
    match v {
        Value::String(s) if s.contains('\u{0}') => Value::String(clean(&s)),
        Value::Array(a) => Value::Array(a.into_iter().map(clean_value).collect()),
        Value::Object(o) => Value::Object(
            o.into_iter()
                .map(|(k, v)| (if k.contains('\u{0}') { clean(&k) } else { k }, clean_value(v)))
                .collect(),
        ),
        other => other,
    }
}

fn text<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// A Sentry list: `{"values": [...]}` or a bare array.
fn values(v: Option<&Value>) -> Vec<&Value> {
    match v {
        Some(Value::Array(a)) => a.iter().collect(),
        Some(Value::Object(o)) => o.get("values").and_then(Value::as_array).map(|a| a.iter().collect()).unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// 32 lowercase hex digits, from the event's id (dashes allowed) or new.
pub fn event_id(v: Option<&str>) -> Result<String, String> {
    match v {
        Some(id) => {
            let hex: String = id.chars().filter(|c| *c != '-').collect::<String>().to_ascii_lowercase();
            if hex.len() == 32 && hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                Ok(hex)
            } else {
                Err(format!("event_id {id:?} is not a UUID"))
            }
        }
        None => Ok(new_id()),
    }
}

fn new_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut out = String::with_capacity(32);
    for i in 0..2u64 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(i);
        h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

/// Seconds since the epoch, from a number or an RFC 3339 text.
pub fn timestamp(v: Option<&Value>) -> Option<f64> {
    match v? {
        Value::Number(n) => n.as_f64().filter(|f| f.is_finite()),
        Value::String(s) => rfc3339(s),
        _ => None,
    }
}

/// "2026-12-07T10:11:12.345Z" / "+01:00" / no zone (UTC) -> seconds.
/// Anything else (or a year beyond 9999) is None: never a panic or an overflow.
fn rfc3339(s: &str) -> Option<f64> {
    let s = s.trim();
    if !s.is_ascii() {
        return None;
    }
    let (date, time) = s.split_once(['T', 't', ' '])?;
    let mut d = date.split('-');
    let (y, m, day): (i64, i64, i64) = (d.next()?.parse().ok()?, d.next()?.parse().ok()?, d.next()?.parse().ok()?);
    if d.next().is_some() || !(1..=9999).contains(&y) {
        return None;
    }
    let (clock, offset) = if let Some(c) = time.strip_suffix('Z').or_else(|| time.strip_suffix('z')) {
        (c, 0i64)
    } else if let Some(i) = time.rfind(['+', '-']) {
        let (c, o) = time.split_at(i);
        let sign = if o.starts_with('-') { -1 } else { 1 };
        let o = &o[1..];
        let (oh, om) = match o.split_once(':') {
            Some(p) => p,
            None if o.len() == 4 => o.split_at(2),
            None => (o, "0"),
        };
        let (oh, om): (i64, i64) = (oh.parse().ok()?, om.parse().ok()?);
        if !(0..=23).contains(&oh) || !(0..=59).contains(&om) {
            return None;
        }
        (c, sign * (oh * 3600 + om * 60))
    } else {
        (time, 0)
    };
    let mut c = clock.split(':');
    let (hh, mm): (i64, i64) = (c.next()?.parse().ok()?, c.next()?.parse().ok()?);
    let ss: f64 = c.next().unwrap_or("0").parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || !(0..=23).contains(&hh) || !(0..=59).contains(&mm) || !(0.0..61.0).contains(&ss) {
        return None;
    }
    // days from civil (Howard Hinnant); every value is small here
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = if y2 >= 0 { y2 } else { y2 - 399 } / 400;
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some((days * 86400 + hh * 3600 + mm * 60 - offset) as f64 + ss)
}

/// JSON nested deeper than this is refused before it is parsed: parsing,
/// scrubbing and storing nested values recurse.
pub const MAX_JSON_DEPTH: usize = 64;

/// Whether JSON text nests deeper than `max` (a scan of its brackets,
/// strings skipped): no parse, no allocation.
pub fn too_deep(b: &[u8], max: usize) -> bool {
    let (mut depth, mut in_str, mut esc) = (0usize, false, false);
    for &c in b {
        if in_str {
            if esc {
                esc = false;
            } else if c == b'\\' {
                esc = true;
            } else if c == b'"' {
                in_str = false;
            }
            continue;
        }
        match c {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Parses JSON within MAX_JSON_DEPTH.
pub fn parse_json(b: &[u8]) -> Result<Value, String> {
    if too_deep(b, MAX_JSON_DEPTH) {
        return Err(format!("JSON nested deeper than {MAX_JSON_DEPTH} levels"));
    }
    serde_json::from_slice(b).map_err(|e| e.to_string())
}

fn severity(level: Option<&str>) -> &'static str {
    match level.map(str::to_ascii_lowercase).as_deref() {
        Some("fatal") | Some("critical") => "critical",
        Some("warning") | Some("warn") => "warning",
        Some("info") | Some("log") => "info",
        Some("debug") => "debug",
        _ => "error",
    }
}

/// One frame, as grouping and the rendered text see it.
struct FrameView {
    module: String,
    function: String,
    file: String,
    line: Option<u64>,
    col: Option<u64>,
    in_app: bool,
}

fn frame_view(f: &Value) -> FrameView {
    let file = text(f, "abs_path").or_else(|| text(f, "filename")).unwrap_or("?").to_string();
    let module = text(f, "module").map(str::to_string).unwrap_or_else(|| {
        let base = file.split(['?', '#']).next().unwrap_or(&file);
        let base = base.rsplit(['/', '\\']).next().unwrap_or(base);
        base.rsplit_once('.').map(|(b, _)| b).filter(|b| !b.is_empty()).unwrap_or(base).to_string()
    });
    FrameView {
        module: clean(&module),
        function: clean(text(f, "function").unwrap_or("?")),
        file: clean(&file),
        line: f.get("lineno").and_then(Value::as_u64),
        col: f.get("colno").and_then(Value::as_u64),
        // frames the SDK did not mark count as the application's
        in_app: f.get("in_app").and_then(Value::as_bool).unwrap_or(true),
    }
}

/// The frames (outermost first) of an exception, or of the thread that
/// raised it when the exception carries none.
fn frames_of<'a>(exc: &'a Value, event: &'a Value) -> Vec<&'a Value> {
    let own = exc.get("stacktrace").and_then(|s| s.get("frames")).and_then(Value::as_array);
    if let Some(f) = own {
        return f.iter().collect();
    }
    let tid = exc.get("thread_id");
    for t in values(event.get("threads")) {
        if tid.is_some() && t.get("id") == tid || tid.is_none() && t.get("crashed").and_then(Value::as_bool) == Some(true) {
            if let Some(f) = t.get("stacktrace").and_then(|s| s.get("frames")).and_then(Value::as_array) {
                return f.iter().collect();
            }
        }
    }
    Vec::new()
}

/// The frames as text in the platform's own format (what a capture over
/// SQL would carry): Python tracebacks outermost first; V8-style "at"
/// lines, innermost first, for the rest; Java's for java.
fn render(platform: &str, exc_type: &str, message: &str, frames: &[FrameView]) -> String {
    let mut out = String::new();
    match platform {
        "python" => {
            out.push_str("Traceback (most recent call last):\n");
            for f in frames {
                out.push_str(&format!("  File \"{}\", line {}, in {}\n", f.file, f.line.unwrap_or(0), f.function));
            }
            out.push_str(&format!("{exc_type}: {message}"));
        }
        "java" => {
            out.push_str(&format!("{exc_type}: {message}\n"));
            for f in frames.iter().rev() {
                let file = f.file.rsplit(['/', '\\']).next().unwrap_or(&f.file);
                out.push_str(&format!("\tat {}.{}({}:{})\n", f.module, f.function, file, f.line.unwrap_or(0)));
            }
        }
        _ => {
            out.push_str(&format!("{exc_type}: {message}\n"));
            for f in frames.iter().rev() {
                out.push_str(&format!(
                    "    at {} ({}:{}:{})\n",
                    f.function,
                    f.file,
                    f.line.unwrap_or(0),
                    f.col.unwrap_or(0)
                ));
            }
        }
    }
    out.trim_end().to_string()
}

/// The event's message: (shown text, grouping template).
fn event_message(e: &Value) -> (Option<String>, Option<String>) {
    let le = e.get("logentry").filter(|v| v.is_object()).or_else(|| e.get("message").filter(|v| v.is_object()));
    let (formatted, template) = match le {
        Some(l) => (text(l, "formatted").map(str::to_string), text(l, "message").map(str::to_string)),
        None => (None, None),
    };
    let plain = e.get("message").and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string);
    let shown = formatted.clone().or_else(|| template.clone()).or_else(|| plain.clone());
    let template = template.or(plain).or(formatted);
    (shown.map(|s| clean(&s)), template.map(|s| clean(&s)))
}

/// Tags as an object (Sentry sends an object or a list of pairs).
fn tags(v: Option<&Value>) -> Option<Value> {
    match v? {
        Value::Object(o) => Some(Value::Object(o.clone())),
        Value::Array(a) => {
            let mut m = Map::new();
            for p in a {
                if let Some([k, v]) = p.as_array().map(Vec::as_slice) {
                    if let Some(k) = k.as_str() {
                        m.insert(k.to_string(), v.clone());
                    }
                }
            }
            Some(Value::Object(m))
        }
        _ => None,
    }
}

fn hex_id(v: Option<&str>, len: usize) -> Option<String> {
    let s = v?.trim().to_ascii_lowercase();
    (s.len() == len && s.bytes().all(|c| c.is_ascii_hexdigit()) && s.bytes().any(|c| c != b'0')).then_some(s)
}

/// Breadcrumbs kept with an occurrence (the most recent).
const BREADCRUMBS: usize = 50;

/// A Sentry event as a capture.
pub fn event(e: &Value) -> Result<Capture, String> {
    if !e.is_object() {
        return Err("event is not an object".into());
    }
    let event_id = event_id(e.get("event_id").and_then(Value::as_str))?;
    let platform = text(e, "platform").unwrap_or("other");
    let exceptions = values(e.get("exception"));
    // the chain is oldest first: the last value is the one thrown
    let thrown = exceptions.last().copied();
    let (shown, template) = event_message(e);
    let mut context = Map::new();
    let (is_message, exception_type, message, stack_trace, default_fp) = match thrown {
        Some(x) => {
            // a message the SDK gave a stack trace (attachStacktrace): its
            // "exception" is synthetic, and it reads as the message it is
            let synthetic = x.pointer("/mechanism/synthetic").and_then(Value::as_bool) == Some(true);
            let ty = if synthetic { "Message".to_string() } else { clean(text(x, "type").unwrap_or("Error")) };
            let ty = if ty.trim().is_empty() { "Error".to_string() } else { ty };
            // `raise ValueError()`, a bare `assert`: no message; it reads as
            // its type, as Sentry shows it
            let value = clean(text(x, "value").or(shown.as_deref()).unwrap_or(""));
            let value = if value.trim().is_empty() { ty.clone() } else { value };
            let frames: Vec<FrameView> = frames_of(x, e).into_iter().map(frame_view).collect();
            let fp = frames_fingerprint(
                &ty,
                &value,
                &frames.iter().map(|f| (f.module.as_str(), f.function.as_str(), f.in_app)).collect::<Vec<_>>(),
            );
            let st = (!frames.is_empty()).then(|| render(platform, &ty, &value, &frames));
            if exceptions.len() > 1 {
                context.insert(
                    "exception_chain".into(),
                    Value::Array(
                        exceptions
                            .iter()
                            .map(|x| json!({"type": text(x, "type"), "value": text(x, "value"), "module": text(x, "module")}))
                            .collect(),
                    ),
                );
            }
            if let Some(m) = x.get("mechanism") {
                context.insert("mechanism".into(), m.clone());
            }
            (false, ty, value, st, fp)
        }
        None => {
            let shown = shown.unwrap_or_else(|| "<no message>".to_string());
            let fp = message_fingerprint(template.as_deref().unwrap_or(&shown));
            (true, "Message".to_string(), shown, None, fp)
        }
    };
    // a custom fingerprint, with {{ default }} standing for ours
    let fingerprint = match e.get("fingerprint").and_then(Value::as_array) {
        Some(parts) => {
            let parts: Vec<String> = parts
                .iter()
                .map(|p| match p {
                    Value::String(s) => clean(s),
                    other => other.to_string(),
                })
                .collect();
            custom_fingerprint(&default_fp, &parts).unwrap_or(default_fp)
        }
        None => default_fp,
    };
    if let Some(u) = e.get("user").filter(|u| u.is_object()) {
        context.insert("user".into(), u.clone());
    }
    if let Some(t) = tags(e.get("tags")) {
        context.insert("tags".into(), t);
    }
    for key in ["request", "contexts", "extra", "modules"] {
        if let Some(v) = e.get(key).filter(|v| v.is_object()) {
            context.insert(key.into(), v.clone());
        }
    }
    let crumbs = values(e.get("breadcrumbs"));
    if !crumbs.is_empty() {
        let from = crumbs.len().saturating_sub(BREADCRUMBS);
        context.insert("breadcrumbs".into(), Value::Array(crumbs[from..].iter().map(|c| (*c).clone()).collect()));
    }
    let mut sentry = Map::new();
    sentry.insert("event_id".into(), json!(event_id));
    sentry.insert("platform".into(), json!(platform));
    for key in ["logger", "server_name", "transaction", "dist"] {
        if let Some(v) = text(e, key) {
            sentry.insert(key.into(), json!(v));
        }
    }
    if let Some(sdk) = e.get("sdk").filter(|s| s.is_object()) {
        sentry.insert("sdk".into(), json!({"name": text(sdk, "name"), "version": text(sdk, "version")}));
    }
    if is_message {
        if let Some(t) = &template {
            sentry.insert("message_template".into(), json!(t));
        }
    }
    context.insert("sentry".into(), Value::Object(sentry));
    let trace = e.get("contexts").and_then(|c| c.get("trace"));
    Ok(Capture {
        event_id,
        is_message,
        exception_type,
        message,
        stack_trace,
        fingerprint,
        context: clean_value(Value::Object(context)),
        environment: text(e, "environment").map(clean),
        severity: severity(text(e, "level")).to_string(),
        release: text(e, "release").map(clean),
        trace_id: trace.and_then(|t| hex_id(text(t, "trace_id"), 32)),
        span_id: trace.and_then(|t| hex_id(text(t, "span_id"), 16)),
        timestamp: timestamp(e.get("timestamp")),
    })
}

// ---------------------------------------------------------------------------
// Transactions -> OTLP/JSON spans
// ---------------------------------------------------------------------------

fn nanos(secs: f64) -> String {
    format!("{}", (secs * 1e9).round() as i128)
}

fn attr(k: &str, v: &Value) -> Value {
    let value = match v {
        Value::String(s) => json!({"stringValue": clean(s)}),
        Value::Bool(b) => json!({"boolValue": b}),
        Value::Number(n) if n.is_i64() => json!({"intValue": n.to_string()}),
        Value::Number(n) => json!({"doubleValue": n.as_f64()}),
        other => json!({"stringValue": other.to_string()}),
    };
    json!({"key": k, "value": value})
}

/// OTLP status: unset, or error for any Sentry status but ok.
fn status(s: Option<&str>) -> Value {
    match s {
        None | Some("ok") => json!({"code": 0}),
        Some(other) => json!({"code": 2, "message": other}),
    }
}

fn otlp_span(
    trace_id: &str,
    span_id: &str,
    parent: Option<String>,
    name: &str,
    kind: u8,
    start: f64,
    end: f64,
    st: Option<&str>,
    mut attrs: Vec<Value>,
    op: Option<&str>,
) -> Value {
    if let Some(op) = op {
        attrs.push(attr("sentry.op", &json!(op)));
    }
    let mut s = json!({
        "traceId": trace_id,
        "spanId": span_id,
        "name": clean(name),
        "kind": kind,
        "startTimeUnixNano": nanos(start),
        "endTimeUnixNano": nanos(end),
        "attributes": attrs,
        "status": status(st),
    });
    if let Some(p) = parent {
        s["parentSpanId"] = json!(p);
    }
    s
}

/// Child spans kept from one transaction (Sentry's SDKs keep 1,000).
pub const MAX_SPANS_PER_TRANSACTION: usize = 1000;

/// A transaction event as an OTLP/JSON ExportTraceServiceRequest: the
/// transaction is the root span (kind server), its spans its children.
pub fn transaction(e: &Value) -> Result<Value, String> {
    let trace = e.get("contexts").and_then(|c| c.get("trace")).ok_or("transaction has no contexts.trace")?;
    let trace_id = hex_id(text(trace, "trace_id"), 32).ok_or("transaction has no valid trace_id")?;
    let root_id = hex_id(text(trace, "span_id"), 16).ok_or("transaction has no valid span_id")?;
    let start = timestamp(e.get("start_timestamp")).ok_or("transaction has no start_timestamp")?;
    let end = timestamp(e.get("timestamp")).ok_or("transaction has no timestamp")?;
    let name = text(e, "transaction").unwrap_or("<unlabeled transaction>");
    let mut root_attrs = Vec::new();
    if let Some(t) = tags(e.get("tags")).and_then(|t| t.as_object().cloned()) {
        for (k, v) in t {
            root_attrs.push(attr(&k, &v));
        }
    }
    if let Some(r) = text(e, "release") {
        root_attrs.push(attr("service.version", &json!(r)));
    }
    let mut spans = vec![otlp_span(
        &trace_id,
        &root_id,
        hex_id(text(trace, "parent_span_id"), 16),
        name,
        2,
        start,
        end,
        text(trace, "status"),
        root_attrs,
        text(trace, "op"),
    )];
    if let Some(children) = e.get("spans").and_then(Value::as_array) {
        for s in children.iter().take(MAX_SPANS_PER_TRANSACTION) {
            let (Some(id), Some(st), Some(en)) = (
                hex_id(text(s, "span_id"), 16),
                timestamp(s.get("start_timestamp")),
                timestamp(s.get("timestamp")),
            ) else {
                continue;
            };
            let mut attrs = Vec::new();
            if let Some(d) = s.get("data").and_then(Value::as_object) {
                for (k, v) in d.iter().take(64) {
                    attrs.push(attr(k, v));
                }
            }
            let name = text(s, "description").or(text(s, "op")).unwrap_or("span");
            spans.push(otlp_span(
                &hex_id(text(s, "trace_id"), 32).unwrap_or_else(|| trace_id.clone()),
                &id,
                hex_id(text(s, "parent_span_id"), 16).or_else(|| Some(root_id.clone())),
                name,
                1,
                st,
                en,
                text(s, "status"),
                attrs,
                text(s, "op"),
            ));
        }
    }
    let mut resource = vec![attr(
        "service.name",
        &json!(e.get("contexts").and_then(|c| c.get("app")).and_then(|a| text(a, "app_name")).or(text(e, "server_name")).unwrap_or("sentry")),
    )];
    if let Some(env) = text(e, "environment") {
        resource.push(attr("deployment.environment", &json!(env)));
    }
    Ok(json!({
        "resourceSpans": [{
            "resource": {"attributes": resource},
            "scopeSpans": [{"scope": {"name": "sentry"}, "spans": spans}],
        }]
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn python_event() -> Value {
        json!({
            "event_id": "9ec79c33ec9942ab8353589fcb2e04dc",
            "platform": "python",
            "level": "error",
            "timestamp": "2026-12-07T10:00:00.5Z",
            "release": "shop@1.4.2",
            "environment": "production",
            "user": {"id": "42", "email": "a@example.com"},
            "tags": {"region": "eu"},
            "contexts": {"trace": {"trace_id": "0af7651916cd43dd8448eb211c80319c", "span_id": "b7ad6b7169203331"}},
            "breadcrumbs": {"values": [{"message": "login"}]},
            "exception": {"values": [
                {"type": "KeyError", "value": "'cart'"},
                {"type": "ValueError", "value": "invalid literal for int() with base 10: 'x'", "module": "builtins",
                 "stacktrace": {"frames": [
                    {"filename": "django/core/handlers/base.py", "abs_path": "/usr/lib/python3/site-packages/django/core/handlers/base.py", "module": "django.core.handlers.base", "function": "_get_response", "lineno": 197, "in_app": false},
                    {"filename": "app/views.py", "abs_path": "/srv/app/views.py", "module": "app.views", "function": "checkout", "lineno": 42, "in_app": true},
                    {"filename": "app/cart.py", "abs_path": "/srv/app/cart.py", "module": "app.cart", "function": "total", "lineno": 7, "in_app": true}
                 ]}}
            ]}
        })
    }

    #[test]
    fn an_exception_event() {
        let c = event(&python_event()).unwrap();
        assert!(!c.is_message);
        assert_eq!(c.exception_type, "ValueError");
        assert_eq!(c.message, "invalid literal for int() with base 10: 'x'");
        assert_eq!(c.severity, "error");
        assert_eq!(c.release.as_deref(), Some("shop@1.4.2"));
        assert_eq!(c.trace_id.as_deref(), Some("0af7651916cd43dd8448eb211c80319c"));
        assert_eq!(c.span_id.as_deref(), Some("b7ad6b7169203331"));
        assert_eq!(c.timestamp, Some(1796637600.5));
        assert_eq!(c.context["user"]["id"], "42");
        assert_eq!(c.context["tags"]["region"], "eu");
        assert_eq!(c.context["exception_chain"][0]["type"], "KeyError");
        let st = c.stack_trace.unwrap();
        assert!(st.starts_with("Traceback (most recent call last):\n  File \"/usr/lib/python3/site-packages/"), "{st}");
        assert!(st.ends_with("in total\nValueError: invalid literal for int() with base 10: 'x'"), "{st}");
        // grouping: the in-app frames; another message, line or library frame changes nothing
        let mut other = python_event();
        other["exception"]["values"][1]["value"] = json!("invalid literal for int() with base 10: 'y'");
        other["exception"]["values"][1]["stacktrace"]["frames"][1]["lineno"] = json!(99);
        other["exception"]["values"][1]["stacktrace"]["frames"][0]["function"] = json!("other");
        assert_eq!(event(&other).unwrap().fingerprint, c.fingerprint);
        let mut moved = python_event();
        moved["exception"]["values"][1]["stacktrace"]["frames"][2]["function"] = json!("subtotal");
        assert_ne!(event(&moved).unwrap().fingerprint, c.fingerprint);
    }

    #[test]
    fn messages_group_by_their_template() {
        let a = json!({"logentry": {"message": "User %s not found", "formatted": "User 17 not found", "params": ["17"]}, "level": "warning"});
        let b = json!({"logentry": {"message": "User %s not found", "formatted": "User bob not found", "params": ["bob"]}});
        let (ca, cb) = (event(&a).unwrap(), event(&b).unwrap());
        assert!(ca.is_message);
        assert_eq!(ca.message, "User 17 not found");
        assert_eq!(ca.severity, "warning");
        assert_eq!(ca.fingerprint, cb.fingerprint);
        assert_eq!(ca.event_id.len(), 32);
        assert_ne!(ca.event_id, cb.event_id);
        let plain = event(&json!({"message": "cache miss storm"})).unwrap();
        assert_eq!(plain.message, "cache miss storm");
    }

    #[test]
    fn a_message_with_a_synthetic_stack_trace_reads_as_a_message() {
        let e = json!({"message": "disk almost full", "exception": {"values": [{"value": "disk almost full",
            "mechanism": {"type": "generic", "synthetic": true},
            "stacktrace": {"frames": [{"function": "check", "filename": "/srv/app/disk.js", "lineno": 3, "in_app": true}]}}]}});
        let c = event(&e).unwrap();
        assert_eq!(c.exception_type, "Message");
        assert_eq!(c.message, "disk almost full");
        assert!(c.stack_trace.unwrap().contains("at check"));
    }

    #[test]
    fn exceptions_without_a_message_read_as_their_type() {
        let c = event(&json!({"exception": {"values": [{"type": "AssertionError", "value": ""}]}})).unwrap();
        assert_eq!(c.message, "AssertionError");
        let c = event(&json!({"exception": {"values": [{"type": " "}]}})).unwrap();
        assert_eq!((c.exception_type.as_str(), c.message.as_str()), ("Error", "Error"));
    }

    #[test]
    fn custom_fingerprints() {
        let mut e = python_event();
        e["fingerprint"] = json!(["payment-gateway"]);
        assert_eq!(event(&e).unwrap().fingerprint, "payment-gateway");
        let base = event(&python_event()).unwrap().fingerprint;
        e["fingerprint"] = json!(["{{ default }}", "tenant-a"]);
        let a = event(&e).unwrap().fingerprint;
        e["fingerprint"] = json!(["{{ default }}", "tenant-b"]);
        assert_ne!(a, event(&e).unwrap().fingerprint);
        assert_ne!(a, base);
    }

    #[test]
    fn nul_characters_are_removed() {
        let e = json!({"exception": {"values": [{"type": "E\u{0}rr", "value": "a\u{0}b"}]}, "extra": {"k\u{0}": "v\u{0}"}});
        let c = event(&e).unwrap();
        assert_eq!(c.exception_type, "Err");
        assert_eq!(c.message, "ab");
        assert_eq!(c.context["extra"]["k"], "v");
    }

    #[test]
    fn bad_events() {
        assert!(event(&json!([1])).is_err());
        assert!(event(&json!({"event_id": "nope"})).is_err());
        assert_eq!(event_id(Some("9EC79C33-EC99-42AB-8353-589FCB2E04DC")).unwrap(), "9ec79c33ec9942ab8353589fcb2e04dc");
    }

    #[test]
    fn envelopes_with_and_without_lengths() {
        let ev = python_event().to_string();
        let body = format!(
            "{{\"event_id\":\"9ec79c33ec9942ab8353589fcb2e04dc\",\"dsn\":\"http://abc@127.0.0.1:1/7\"}}\n{{\"type\":\"event\",\"length\":{}}}\n{}\n{{\"type\":\"session\"}}\n{{\"started\":\"x\"}}\n{{\"type\":\"attachment\",\"length\":3}}\na\nb",
            ev.len(),
            ev
        );
        let env = parse_envelope(body.as_bytes()).unwrap();
        assert_eq!(env.items.len(), 3);
        assert_eq!(env.items[2].2, b"a\nb");
        let items = envelope_items(&env);
        assert!(matches!(&items[0], Ok(Item::Event(c)) if c.exception_type == "ValueError"));
        assert_eq!(items[1], Ok(Item::Skipped("session".into())));
        assert_eq!(key_from_dsn("http://abc@127.0.0.1:1/7"), Some(("abc".into(), "7".into())));
        // truncated, malformed
        assert!(parse_envelope(&body.as_bytes()[..body.len() / 2]).is_err() || envelope_items(&parse_envelope(&body.as_bytes()[..body.len() / 2]).unwrap()).iter().any(|r| r.is_err()));
        assert!(parse_envelope(b"not json\n").is_err());
        assert!(parse_envelope(b"{}\n{\"length\":2}\nab").is_err());
        assert!(parse_envelope(b"{}\n{\"type\":\"event\",\"length\":99}\nab").is_err());
        // an envelope with a header only
        assert_eq!(parse_envelope(b"{}").unwrap().items.len(), 0);
    }

    #[test]
    fn auth_headers() {
        assert_eq!(
            key_from_auth_header("Sentry sentry_key=abc, sentry_version=7, sentry_client=sentry.python/2.0").as_deref(),
            Some("abc")
        );
        assert_eq!(key_from_auth_header("Sentry sentry_version=7"), None);
    }

    #[test]
    fn transactions_become_spans() {
        let t = json!({
            "type": "transaction", "transaction": "GET /cart", "environment": "production",
            "start_timestamp": 1796637600.0, "timestamp": 1796637600.25,
            "contexts": {"trace": {"trace_id": "0af7651916cd43dd8448eb211c80319c", "span_id": "b7ad6b7169203331", "op": "http.server", "status": "ok"}},
            "spans": [{"span_id": "00f067aa0ba902b7", "op": "db", "description": "SELECT 1", "start_timestamp": 1796637600.1, "timestamp": 1796637600.2, "status": "internal_error"}]
        });
        let r = transaction(&t).unwrap();
        let spans = &r["resourceSpans"][0]["scopeSpans"][0]["spans"];
        assert_eq!(spans.as_array().unwrap().len(), 2);
        assert_eq!(spans[0]["name"], "GET /cart");
        assert_eq!(spans[0]["startTimeUnixNano"], "1796637600000000000");
        assert_eq!(spans[1]["parentSpanId"], "b7ad6b7169203331");
        assert_eq!(spans[1]["status"]["code"], 2);
        assert!(transaction(&json!({"contexts": {}})).is_err());
    }

    #[test]
    fn hostile_timestamps_and_nesting() {
        for t in ["2026-01-01T10:00:00+1é", "999999999999999999-01-01T00:00:00Z", "2026-01-01T00:00:00+99999999999999999:00",
                  "2026-01-01T99:00:00Z", "é", "2026-01-01T00:00:00+", "2026-01-01T00:00:00+0530"] {
            let _ = rfc3339(t);
        }
        assert_eq!(rfc3339("2026-01-01T00:00:00+0530"), rfc3339("2025-12-31T18:30:00Z"));
        let deep = format!("{{\"message\":\"x\",\"extra\":{{\"a\":{}1{}}}}}", "[".repeat(200), "]".repeat(200));
        assert!(store_item(deep.as_bytes()).unwrap_err().contains("nested deeper"));
        // brackets inside strings do not count
        let s = format!("{{\"message\":\"{}\"}}", "[".repeat(200));
        assert!(store_item(s.as_bytes()).is_ok());
        assert!(!too_deep(br#"{"a":"\\\"[[[["}"#, 2));
    }

    #[test]
    fn several_events_keep_their_own_ids() {
        let e = r#"{"message":"a"}"#;
        let body = format!("{{\"event_id\":\"9ec79c33ec9942ab8353589fcb2e04dc\"}}\n{{\"type\":\"event\"}}\n{e}\n{{\"type\":\"event\"}}\n{e}\n");
        let items = envelope_items(&parse_envelope(body.as_bytes()).unwrap());
        let ids: Vec<String> = items.iter().map(|i| match i { Ok(Item::Event(c)) => c.event_id.clone(), _ => panic!() }).collect();
        assert_ne!(ids[0], ids[1]);
        assert_ne!(ids[0], "9ec79c33ec9942ab8353589fcb2e04dc");
        let many = format!("{{}}\n{}", format!("{{\"type\":\"event\"}}\n{e}\n").repeat(101));
        assert!(envelope_items(&parse_envelope(many.as_bytes()).unwrap())[0].is_err());
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(rfc3339("1970-01-01T01:00:00+01:00"), Some(0.0));
        assert_eq!(rfc3339("2000-03-01T00:00:00"), Some(951868800.0));
        assert_eq!(rfc3339("garbage"), None);
        assert_eq!(timestamp(Some(&json!(12.5))), Some(12.5));
    }
}
