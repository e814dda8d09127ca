//! Spans: OTLP/JSON ingestion (`ExportTraceServiceRequest`) and single spans
//! from SQL, stored in monitoring.traces.
//!
//! OTLP/JSON differs from the generic protobuf JSON mapping in ways exporters
//! rely on: ids are hex (any case), 64-bit integers may be strings or
//! numbers, enums may be integers or their names. A malformed span is rejected
//! with a reason while the valid ones are stored (OTLP partial success).
use crate::capture::normalize_id;
use crate::error::ObsError;
use pgrx::prelude::*;
use serde_json::{Map, Value};

/// One span, ready to insert.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SpanRow {
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: Option<String>,
    pub name: String,
    pub start_us: i64,
    pub end_us: i64,
    pub status_code: i32,
    pub status_message: Option<String>,
    pub attributes: Value,
    pub events: Value,
    pub links: Value,
    pub resource: Value,
    pub environment: Option<String>,
    pub service_name: Option<String>,
    pub kind: &'static str,
    pub scope: Value,
}

impl SpanRow {
    pub fn duration_ms(&self) -> f64 {
        (self.end_us - self.start_us) as f64 / 1000.0
    }

    /// Bounds what one span may store, whoever sends it (a capture-only
    /// role, an exporter on the network). Names are cut, attribute lists
    /// capped at OpenTelemetry's own default limits (128 attributes, events
    /// and links; what was dropped is counted under `_fraiseql_truncated`),
    /// long values clipped, NUL characters (which text and jsonb refuse, and
    /// which would fail the whole batch) removed. A span still larger than
    /// `MAX_SPAN_BYTES` is rejected, alone.
    pub fn bound(&mut self) -> Result<(), String> {
        cut(&mut self.name, MAX_NAME_BYTES);
        if self.name.is_empty() {
            return Err("name is missing".into());
        }
        if let Some(m) = &mut self.status_message {
            *m = crate::capture::clip_text(&m.replace('\0', ""), MAX_VALUE_BYTES).into_owned();
        }
        for (field, max) in [
            (&mut self.environment, crate::capture::MAX_ENVIRONMENT_BYTES),
            (&mut self.service_name, MAX_SERVICE_BYTES),
        ] {
            if let Some(v) = field {
                cut(v, max);
            }
        }
        let mut dropped = Map::new();
        let mut count = |what: &str, n: usize| {
            if n > 0 {
                dropped.insert(what.into(), Value::from(n));
            }
        };
        count("attributes", bound_value(&mut self.attributes, 0));
        count("resource attributes", bound_value(&mut self.resource, 0));
        bound_value(&mut self.scope, 0);
        for (list, what) in [(&mut self.events, "events"), (&mut self.links, "links")] {
            if let Value::Array(a) = list {
                count(what, a.len().saturating_sub(MAX_ITEMS));
                a.truncate(MAX_ITEMS);
                let mut inner = 0;
                for item in a.iter_mut() {
                    inner += bound_value(item, 0);
                }
                count(&format!("{what} attributes"), inner);
            }
        }
        if !dropped.is_empty() {
            if let Value::Object(m) = &mut self.attributes {
                m.insert("_fraiseql_truncated".into(), Value::Object(dropped));
            }
        }
        let size = [
            &self.attributes,
            &self.events,
            &self.links,
            &self.resource,
            &self.scope,
        ]
        .iter()
        .map(|v| v.to_string().len())
        .sum::<usize>();
        if size > MAX_SPAN_BYTES {
            return Err(format!(
                "span is too large ({size} bytes of attributes, events, links and resource; at most {MAX_SPAN_BYTES})"
            ));
        }
        Ok(())
    }
}

const MAX_NAME_BYTES: usize = 1024;
const MAX_SERVICE_BYTES: usize = 200;
const MAX_VALUE_BYTES: usize = 4096;
/// OpenTelemetry's default span limits: attributes, events, links
const MAX_ITEMS: usize = 128;
const MAX_DEPTH: usize = 8;
const MAX_SPAN_BYTES: usize = 256 * 1024;

/// Cuts a string to at most `max` bytes on a character boundary, NULs removed.
fn cut(s: &mut String, max: usize) {
    if s.contains('\0') {
        *s = s.replace('\0', "");
    }
    if s.len() > max {
        let mut i = max;
        while !s.is_char_boundary(i) {
            i -= 1;
        }
        s.truncate(i);
    }
}

/// Bounds a JSON value in place: objects and arrays to MAX_ITEMS entries,
/// nesting to MAX_DEPTH, strings (keys too) to MAX_VALUE_BYTES without NULs.
/// Returns how many entries were dropped.
fn bound_value(v: &mut Value, depth: usize) -> usize {
    match v {
        Value::String(s) => {
            if s.len() > MAX_VALUE_BYTES || s.contains('\0') {
                *s = crate::capture::clip_text(&s.replace('\0', ""), MAX_VALUE_BYTES).into_owned();
            }
            0
        }
        Value::Array(a) => {
            if depth >= MAX_DEPTH {
                let n = a.len();
                a.clear();
                return n;
            }
            let mut n = a.len().saturating_sub(MAX_ITEMS);
            a.truncate(MAX_ITEMS);
            for x in a.iter_mut() {
                n += bound_value(x, depth + 1);
            }
            n
        }
        Value::Object(m) => {
            if depth >= MAX_DEPTH {
                let n = m.len();
                m.clear();
                return n;
            }
            let mut n = 0;
            let old = std::mem::take(m);
            for (mut k, mut x) in old {
                if m.len() >= MAX_ITEMS {
                    n += 1;
                    continue;
                }
                cut(&mut k, MAX_VALUE_BYTES);
                n += bound_value(&mut x, depth + 1);
                m.insert(k, x);
            }
            n
        }
        _ => 0,
    }
}

#[derive(Debug, Default)]
pub struct Parsed {
    pub spans: Vec<SpanRow>,
    pub rejected: Vec<String>,
}

const KINDS: [&str; 6] = [
    "unspecified",
    "internal",
    "server",
    "client",
    "producer",
    "consumer",
];

fn kind_of(v: Option<&Value>) -> Result<&'static str, String> {
    match v {
        None | Some(Value::Null) => Ok("unspecified"),
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|i| KINDS.get(i as usize).copied())
            .ok_or_else(|| format!("unknown span kind {n}")),
        Some(Value::String(s)) => {
            let k = s
                .strip_prefix("SPAN_KIND_")
                .unwrap_or(s)
                .to_ascii_lowercase();
            KINDS
                .iter()
                .find(|x| **x == k)
                .copied()
                .ok_or_else(|| format!("unknown span kind \"{s}\""))
        }
        Some(other) => Err(format!("unknown span kind {other}")),
    }
}

fn status_code_of(v: Option<&Value>) -> Result<i32, String> {
    match v {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(c @ 0..=2) => Ok(c as i32),
            _ => Err(format!("unknown status code {n}")),
        },
        Some(Value::String(s)) => match s.as_str() {
            "STATUS_CODE_UNSET" | "UNSET" => Ok(0),
            "STATUS_CODE_OK" | "OK" => Ok(1),
            "STATUS_CODE_ERROR" | "ERROR" => Ok(2),
            _ => Err(format!("unknown status code \"{s}\"")),
        },
        Some(other) => Err(format!("unknown status code {other}")),
    }
}

/// A fixed64 / int64 given as a JSON string or number.
fn u64_of(v: Option<&Value>, what: &str) -> Result<u64, String> {
    match v {
        Some(Value::String(s)) => s
            .trim()
            .parse::<u64>()
            .map_err(|_| format!("{what} is not an integer: \"{s}\"")),
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| format!("{what} is not a non-negative integer: {n}")),
        None | Some(Value::Null) => Err(format!("{what} is missing")),
        Some(other) => Err(format!("{what} is not an integer: {other}")),
    }
}

/// OTLP AnyValue -> plain JSON.
pub fn any_value(v: &Value) -> Value {
    let Value::Object(m) = v else {
        return v.clone();
    };
    if let Some(s) = m.get("stringValue") {
        return s.clone();
    }
    if let Some(b) = m.get("boolValue") {
        return b.clone();
    }
    if let Some(i) = m.get("intValue") {
        return match i {
            Value::String(s) => s
                .parse::<i64>()
                .map(Value::from)
                .unwrap_or_else(|_| Value::String(s.clone())),
            other => other.clone(),
        };
    }
    if let Some(d) = m.get("doubleValue") {
        return d.clone();
    }
    if let Some(a) = m.get("arrayValue") {
        let values = a
            .get("values")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        return Value::Array(values.iter().map(any_value).collect());
    }
    if let Some(kv) = m.get("kvlistValue") {
        return Value::Object(key_values(kv.get("values")));
    }
    if let Some(b) = m.get("bytesValue") {
        return b.clone();
    }
    Value::Null
}

/// OTLP KeyValue list -> JSON object.
pub fn key_values(v: Option<&Value>) -> Map<String, Value> {
    let mut out = Map::new();
    if let Some(Value::Array(items)) = v {
        for kv in items {
            if let Some(k) = kv.get("key").and_then(Value::as_str) {
                out.insert(
                    k.to_string(),
                    kv.get("value").map(any_value).unwrap_or(Value::Null),
                );
            }
        }
    }
    out
}

fn hex_id(v: Option<&Value>, kind: &'static str, what: &str) -> Result<Option<String>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => normalize_id(s, kind)
            .map(Some)
            .map_err(|e| format!("{what}: {}", strip_prefix(&e))),
        Some(other) => Err(format!("{what} is not a string: {other}")),
    }
}

fn strip_prefix(e: &ObsError) -> String {
    e.to_string()
        .trim_start_matches("fraiseql_obs: ")
        .to_string()
}

/// RFC 3339 UTC timestamp (microseconds) from Unix microseconds.
pub fn rfc3339_from_unix_us(us: i64) -> String {
    let secs = us.div_euclid(1_000_000);
    let micros = us.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // civil_from_days (H. Hinnant)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

fn span_of(
    span: &Value,
    resource: &Value,
    service: &Option<String>,
    env: &Option<String>,
    scope: &Value,
) -> Result<SpanRow, String> {
    let obj = span.as_object().ok_or("span is not an object")?;
    let trace_id =
        hex_id(obj.get("traceId"), "trace_id", "traceId")?.ok_or("traceId is missing")?;
    let span_id = hex_id(obj.get("spanId"), "span_id", "spanId")?.ok_or("spanId is missing")?;
    let parent_span_id = hex_id(obj.get("parentSpanId"), "span_id", "parentSpanId")?;
    let name = obj.get("name").and_then(Value::as_str).unwrap_or("");
    if name.is_empty() {
        return Err("name is missing".into());
    }
    let start = u64_of(obj.get("startTimeUnixNano"), "startTimeUnixNano")?;
    let end = u64_of(obj.get("endTimeUnixNano"), "endTimeUnixNano")?;
    if end < start {
        return Err(format!(
            "endTimeUnixNano ({end}) is before startTimeUnixNano ({start})"
        ));
    }
    let status = obj.get("status");
    let status_code = status_code_of(status.and_then(|s| s.get("code")))?;
    let status_message = status
        .and_then(|s| s.get("message"))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string);
    let mut events = Vec::new();
    if let Some(Value::Array(evs)) = obj.get("events") {
        for e in evs {
            let t = u64_of(e.get("timeUnixNano"), "event timeUnixNano")?;
            events.push(serde_json::json!({
                "time": rfc3339_from_unix_us((t / 1000) as i64),
                "name": e.get("name").and_then(Value::as_str).unwrap_or(""),
                "attributes": Value::Object(key_values(e.get("attributes"))),
            }));
        }
    }
    let mut links = Vec::new();
    if let Some(Value::Array(ls)) = obj.get("links") {
        for l in ls {
            let lt = hex_id(l.get("traceId"), "trace_id", "link traceId")?
                .ok_or("link traceId is missing")?;
            let ls_ = hex_id(l.get("spanId"), "span_id", "link spanId")?
                .ok_or("link spanId is missing")?;
            links.push(serde_json::json!({
                "trace_id": lt, "span_id": ls_,
                "attributes": Value::Object(key_values(l.get("attributes"))),
            }));
        }
    }
    Ok(SpanRow {
        trace_id,
        span_id,
        parent_span_id,
        name: name.to_string(),
        start_us: (start / 1000) as i64,
        end_us: (end / 1000) as i64,
        status_code,
        status_message,
        attributes: Value::Object(key_values(obj.get("attributes"))),
        events: Value::Array(events),
        links: Value::Array(links),
        resource: resource.clone(),
        environment: env.clone(),
        service_name: service.clone(),
        kind: kind_of(obj.get("kind"))?,
        scope: scope.clone(),
    })
}

/// Parses an ExportTraceServiceRequest. Err only when the request as a whole
/// is malformed; bad spans are listed in `rejected`.
pub fn parse_export_request(payload: &Value) -> Result<Parsed, String> {
    let obj = payload
        .as_object()
        .ok_or("payload must be a JSON object (an OTLP ExportTraceServiceRequest)")?;
    let mut out = Parsed::default();
    let resource_spans = match obj.get("resourceSpans") {
        None | Some(Value::Null) => return Ok(out),
        Some(Value::Array(a)) => a,
        Some(_) => return Err("resourceSpans must be an array".into()),
    };
    for rs in resource_spans {
        let res_attrs = key_values(rs.get("resource").and_then(|r| r.get("attributes")));
        let service = res_attrs
            .get("service.name")
            .and_then(Value::as_str)
            .map(str::to_string);
        let env = res_attrs
            .get("deployment.environment.name")
            .or_else(|| res_attrs.get("deployment.environment"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let resource = Value::Object(res_attrs);
        let scope_spans = rs
            .get("scopeSpans")
            .or_else(|| rs.get("instrumentationLibrarySpans"));
        let Some(Value::Array(scope_spans)) = scope_spans else {
            continue;
        };
        for ss in scope_spans {
            let scope = ss.get("scope").cloned().unwrap_or(Value::Null);
            let scope = match scope {
                Value::Object(mut m) => {
                    if let Some(a) = m.remove("attributes") {
                        m.insert("attributes".into(), Value::Object(key_values(Some(&a))));
                    }
                    Value::Object(m)
                }
                other => other,
            };
            let Some(Value::Array(spans)) = ss.get("spans") else {
                continue;
            };
            for (i, span) in spans.iter().enumerate() {
                match span_of(span, &resource, &service, &env, &scope)
                    .and_then(|mut row| row.bound().map(|()| row))
                {
                    Ok(row) => out.spans.push(row),
                    Err(why) => {
                        let id = span.get("spanId").and_then(Value::as_str).unwrap_or("?");
                        out.rejected.push(format!("span {i} ({id}): {why}"));
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Inserts spans in one statement; a span already stored (same trace, span
/// and start) is skipped, so exporter retries are harmless. Returns how many
/// were stored.
pub fn insert_spans(rows: &[SpanRow]) -> i64 {
    if rows.is_empty() {
        return 0;
    }
    let env_default = crate::guc::environment();
    let col = |f: &dyn Fn(&SpanRow) -> Option<String>| {
        rows.iter().map(f).collect::<Vec<Option<String>>>()
    };
    let trace = col(&|r| Some(r.trace_id.clone()));
    let span = col(&|r| Some(r.span_id.clone()));
    let parent = col(&|r| r.parent_span_id.clone());
    let name = col(&|r| Some(r.name.clone()));
    let start: Vec<i64> = rows.iter().map(|r| r.start_us).collect();
    let end: Vec<i64> = rows.iter().map(|r| r.end_us).collect();
    let dur: Vec<f64> = rows.iter().map(SpanRow::duration_ms).collect();
    let code: Vec<i32> = rows.iter().map(|r| r.status_code).collect();
    let msg = col(&|r| r.status_message.clone());
    let attrs = col(&|r| Some(r.attributes.to_string()));
    let events = col(&|r| Some(r.events.to_string()));
    let links = col(&|r| Some(r.links.to_string()));
    let resource = col(&|r| Some(r.resource.to_string()));
    let env = col(&|r| Some(r.environment.clone().unwrap_or_else(|| env_default.clone())));
    let service = col(&|r| r.service_name.clone());
    let kind = col(&|r| Some(r.kind.to_string()));
    let scope = col(&|r| {
        if r.scope.is_null() {
            None
        } else {
            Some(r.scope.to_string())
        }
    });
    let sql = "WITH ins AS (
        INSERT INTO monitoring.traces (trace_id, span_id, parent_span_id, operation_name, start_time, end_time,
            duration_ms, status_code, status_message, attributes, events, links, resource, environment,
            service_name, span_kind, scope)
        SELECT t, s, p, n, 'epoch'::timestamptz + st * interval '1 microsecond',
               'epoch'::timestamptz + et * interval '1 microsecond', d, c, m, a::jsonb, e::jsonb, l::jsonb,
               r::jsonb, env, svc, k, sc::jsonb
          FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::int8[], $7::float8[],
                      $8::int4[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[], $14::text[],
                      $15::text[], $16::text[], $17::text[])
               AS u(t, s, p, n, st, et, d, c, m, a, e, l, r, env, svc, k, sc)
        -- the partitions' unique (trace_id, span_id, start_time) index: an
        -- exporter's retry stores nothing twice
        ON CONFLICT DO NOTHING
        RETURNING 1)
      SELECT count(*) FROM ins";
    Spi::get_one_with_args::<i64>(
        sql,
        &[
            trace.into(),
            span.into(),
            parent.into(),
            name.into(),
            start.into(),
            end.into(),
            dur.into(),
            code.into(),
            msg.into(),
            attrs.into(),
            events.into(),
            links.into(),
            resource.into(),
            env.into(),
            service.into(),
            kind.into(),
            scope.into(),
        ],
    )
    .unwrap_or_else(|e| pgrx::error!("fraiseql_obs: could not store spans: {e}"))
    .unwrap_or(0)
}

/// Ingests an OTLP/JSON ExportTraceServiceRequest. Returns
/// {"stored": n, "rejected": m, "partialSuccess": {"rejectedSpans": m, "errorMessage": "..."}}.
#[pg_extern(volatile)]
fn _fraiseql_ingest_otlp_traces(payload: Option<pgrx::JsonB>) -> pgrx::JsonB {
    let Some(pgrx::JsonB(payload)) = payload else {
        ObsError::MissingArgument {
            argument: "payload",
        }
        .report()
    };
    let mut parsed = parse_export_request(&payload)
        .unwrap_or_else(|why| ObsError::invalid("payload", why).report());
    // spans outside the accepted window are rejected one by one
    let refusal = |s: &SpanRow| {
        let day = || crate::time_window::Granularity::Day;
        crate::time_window::refusal(s.start_us, day())
            .map(|why| format!("startTimeUnixNano {why}"))
            .or_else(|| {
                crate::time_window::refusal(s.end_us, day())
                    .map(|why| format!("endTimeUnixNano {why}"))
            })
    };
    let (kept, outside): (Vec<_>, Vec<_>) =
        parsed.spans.into_iter().partition(|s| refusal(s).is_none());
    for s in &outside {
        let why = refusal(s).unwrap_or_default();
        parsed.rejected.push(format!("span {}: {why}", s.span_id));
    }
    parsed.spans = kept;
    let stored = insert_spans(&parsed.spans);
    let rejected = parsed.rejected.len();
    let mut message = parsed
        .rejected
        .iter()
        .take(20)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if rejected > 20 {
        message.push_str(&format!("; and {} more", rejected - 20));
    }
    pgrx::JsonB(serde_json::json!({
        "stored": stored,
        "duplicates": parsed.spans.len() as i64 - stored,
        "rejected": rejected,
        "partialSuccess": if rejected > 0 {
            serde_json::json!({ "rejectedSpans": rejected, "errorMessage": message })
        } else {
            serde_json::json!({})
        },
    }))
}

/// One span from SQL. Ids are hex (any case); times are timestamps.
#[pg_extern(volatile)]
#[allow(clippy::too_many_arguments)]
fn _fraiseql_record_span(
    trace_id: Option<&str>,
    span_id: Option<&str>,
    operation_name: Option<&str>,
    start_time: Option<pgrx::datum::TimestampWithTimeZone>,
    end_time: Option<pgrx::datum::TimestampWithTimeZone>,
    parent_span_id: Option<&str>,
    attributes: Option<pgrx::JsonB>,
    status_code: Option<i32>,
    status_message: Option<&str>,
    span_kind: Option<&str>,
    service_name: Option<&str>,
    environment: Option<&str>,
) -> bool {
    let report = |e: ObsError| -> ! { e.report() };
    let trace_id = normalize_id(
        trace_id.unwrap_or_else(|| {
            report(ObsError::MissingArgument {
                argument: "trace_id",
            })
        }),
        "trace_id",
    )
    .unwrap_or_else(|e| report(e));
    let span_id = normalize_id(
        span_id.unwrap_or_else(|| {
            report(ObsError::MissingArgument {
                argument: "span_id",
            })
        }),
        "span_id",
    )
    .unwrap_or_else(|e| report(e));
    let parent_span_id = parent_span_id
        .filter(|p| !p.is_empty())
        .map(|p| normalize_id(p, "span_id").unwrap_or_else(|e| report(e)));
    let name = operation_name
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| {
            report(ObsError::MissingArgument {
                argument: "operation_name",
            })
        });
    let us = |t: Option<pgrx::datum::TimestampWithTimeZone>, argument: &'static str| -> i64 {
        let t = t.unwrap_or_else(|| report(ObsError::MissingArgument { argument }));
        // PostgreSQL timestamps are microseconds since 2000-01-01
        let pg: i64 = t.into_inner();
        if let Some(why) = crate::time_window::refusal_pg(pg, crate::time_window::Granularity::Day)
        {
            report(ObsError::invalid(argument, why));
        }
        pg + 946_684_800_000_000
    };
    let start = us(start_time, "start_time");
    let end = us(end_time, "end_time");
    if end < start {
        report(ObsError::invalid(
            "end_time",
            "must not be before start_time",
        ));
    }
    let kind = kind_of(span_kind.map(|k| Value::String(k.to_string())).as_ref())
        .unwrap_or_else(|e| report(ObsError::invalid("span_kind", e)));
    let status_code = status_code.unwrap_or(0);
    if !(0..=2).contains(&status_code) {
        report(ObsError::invalid(
            "status_code",
            "must be 0 (unset), 1 (ok) or 2 (error)",
        ));
    }
    let attributes = match attributes.map(|a| a.0) {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(v @ Value::Object(_)) => v,
        Some(_) => report(ObsError::invalid("attributes", "must be a JSON object")),
    };
    let mut row = SpanRow {
        trace_id,
        span_id,
        parent_span_id,
        name: name.to_string(),
        start_us: start,
        end_us: end,
        status_code,
        status_message: status_message.map(str::to_string),
        attributes,
        events: Value::Array(vec![]),
        links: Value::Array(vec![]),
        resource: serde_json::json!({}),
        environment: environment.filter(|e| !e.is_empty()).map(str::to_string),
        service_name: service_name.map(str::to_string),
        kind,
        scope: Value::Null,
    };
    row.bound()
        .unwrap_or_else(|why| report(ObsError::invalid("attributes", why)));
    insert_spans(&[row]) == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn otlp_request() {
        let req = serde_json::json!({
        "resourceSpans": [{
          "resource": {"attributes": [
              {"key": "service.name", "value": {"stringValue": "api"}},
              {"key": "deployment.environment", "value": {"stringValue": "staging"}}]},
          "scopeSpans": [{
            "scope": {"name": "my.lib", "version": "1.0"},
            "spans": [
              {"traceId": "5B8EFFF798038103D269B633813FC60C", "spanId": "EEE19B7EC3C1B174",
               "parentSpanId": "", "name": "GET /orders", "kind": 2,
               "startTimeUnixNano": "1544712660000000000", "endTimeUnixNano": 1544712661000000000u64,
               "attributes": [
                 {"key": "http.status", "value": {"intValue": "200"}},
                 {"key": "ok", "value": {"boolValue": true}},
                 {"key": "ratio", "value": {"doubleValue": 0.5}},
                 {"key": "tags", "value": {"arrayValue": {"values": [{"stringValue": "a"}, {"intValue": 3}]}}},
                 {"key": "nested", "value": {"kvlistValue": {"values": [{"key": "k", "value": {"stringValue": "v"}}]}}}],
               "events": [{"timeUnixNano": "1544712660500000000", "name": "cache miss"}],
               "status": {"code": "STATUS_CODE_ERROR", "message": "boom"}},
              {"traceId": "xyz", "spanId": "EEE19B7EC3C1B175", "name": "bad",
               "startTimeUnixNano": "1", "endTimeUnixNano": "2"},
              {"traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b176", "name": "backwards",
               "startTimeUnixNano": "5", "endTimeUnixNano": "2"},
              {"traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b177", "name": "k",
               "kind": "SPAN_KIND_WHATEVER", "startTimeUnixNano": "1", "endTimeUnixNano": "2"}
            ]}]}]});
        let p = parse_export_request(&req).unwrap();
        assert_eq!(p.spans.len(), 1);
        assert_eq!(p.rejected.len(), 3, "{:?}", p.rejected);
        let s = &p.spans[0];
        assert_eq!(s.trace_id, "5b8efff798038103d269b633813fc60c");
        assert_eq!(s.parent_span_id, None);
        assert_eq!(s.kind, "server");
        assert_eq!(s.status_code, 2);
        assert_eq!(s.duration_ms(), 1000.0);
        assert_eq!(s.service_name.as_deref(), Some("api"));
        assert_eq!(s.environment.as_deref(), Some("staging"));
        assert_eq!(s.attributes["http.status"], 200);
        assert_eq!(s.attributes["tags"], serde_json::json!(["a", 3]));
        assert_eq!(s.attributes["nested"]["k"], "v");
        assert_eq!(s.events[0]["time"], "2018-12-13T14:51:00.500000Z");
        assert!(parse_export_request(&serde_json::json!([1])).is_err());
        assert!(parse_export_request(&serde_json::json!({"resourceSpans": 3})).is_err());
    }

    #[test]
    fn bounded_spans() {
        let mut s = SpanRow {
            name: format!("a\0{}", "é".repeat(1000)),
            status_message: Some("m\0".repeat(10_000)),
            attributes: serde_json::json!({"k\0": "v\0", "big": "x".repeat(10_000),
                "deep": [[[[[[[[[[1]]]]]]]]]]}),
            events: Value::Array(vec![serde_json::json!({"name": "e"}); 500]),
            links: Value::Array(vec![]),
            resource: serde_json::json!({}),
            ..Default::default()
        };
        s.bound().unwrap();
        assert!(s.name.len() <= MAX_NAME_BYTES && !s.name.contains('\0'));
        assert!(s.name.starts_with("aé"));
        assert!(s.status_message.as_ref().unwrap().len() <= MAX_VALUE_BYTES);
        assert!(!s.status_message.as_ref().unwrap().contains('\0'));
        assert_eq!(s.attributes["k"], "v");
        assert!(s.attributes["big"].as_str().unwrap().len() <= MAX_VALUE_BYTES);
        assert_eq!(s.events.as_array().unwrap().len(), MAX_ITEMS);
        assert_eq!(
            s.attributes["_fraiseql_truncated"]["events"],
            500 - MAX_ITEMS
        );
        assert!(
            s.attributes["_fraiseql_truncated"]["attributes"]
                .as_u64()
                .unwrap()
                >= 1
        );
        let mut huge = SpanRow {
            name: "n".into(),
            attributes: Value::Object(
                (0..100)
                    .map(|i| (format!("k{i}"), Value::String("x".repeat(4000))))
                    .collect(),
            ),
            events: Value::Array(
                (0..100)
                    .map(|_| serde_json::json!({"attributes": {"a": "y".repeat(4000)}}))
                    .collect(),
            ),
            ..Default::default()
        };
        assert!(huge.bound().unwrap_err().contains("too large"));
    }

    #[test]
    fn rfc3339() {
        assert_eq!(rfc3339_from_unix_us(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339_from_unix_us(1_709_251_199_999_999),
            "2024-02-29T23:59:59.999999Z"
        );
    }
}
