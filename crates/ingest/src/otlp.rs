//! OTLP/HTTP in protobuf: requests decoded into their OTLP/JSON form (so
//! one path stores both encodings), responses encoded.
//!
//! The decoder is driven by a table of the OTLP messages used here
//! (opentelemetry-proto v1: common, resource, trace, metrics, logs): each
//! field's number, its JSON name and its kind. The JSON mapping is the one
//! OTLP/JSON specifies: trace and span ids as hex, 64-bit integers as
//! decimal strings, enums as numbers, bytes (other than ids) as base64.
//! Unknown fields are skipped, as protobuf requires; a message that is not
//! valid wire format, or nests deeper than MAX_DEPTH, is refused.
use serde_json::{json, Map, Value};

/// AnyValue can nest (arrays, key-value lists): a request nesting deeper is refused.
const MAX_DEPTH: usize = 32;
/// Values in one packed repeated field (bucket counts, bounds).
const MAX_PACKED: usize = 1024;

#[derive(Clone, Copy)]
enum Kind {
    Str,
    /// bytes shown as hex (trace and span ids)
    Hex,
    /// bytes shown as base64
    Bytes,
    Bool,
    /// int32/uint32/enum varint, shown as a number
    Int,
    /// int64/uint64 varint, shown as a string
    Int64,
    /// sint32 (zigzag)
    SInt,
    Fixed64,
    SFixed64,
    Fixed32,
    Double,
    Msg(&'static [Field]),
}

struct Field {
    num: u32,
    name: &'static str,
    kind: Kind,
    repeated: bool,
}

const fn f(num: u32, name: &'static str, kind: Kind) -> Field {
    Field { num, name, kind, repeated: false }
}
const fn r(num: u32, name: &'static str, kind: Kind) -> Field {
    Field { num, name, kind, repeated: true }
}

use Kind::*;

static ANY_VALUE: [Field; 7] = [
    f(1, "stringValue", Str),
    f(2, "boolValue", Bool),
    f(3, "intValue", Int64),
    f(4, "doubleValue", Double),
    f(5, "arrayValue", Msg(&ARRAY_VALUE)),
    f(6, "kvlistValue", Msg(&KV_LIST)),
    f(7, "bytesValue", Bytes),
];
static ARRAY_VALUE: [Field; 1] = [r(1, "values", Msg(&ANY_VALUE))];
static KV_LIST: [Field; 1] = [r(1, "values", Msg(&KEY_VALUE))];
static KEY_VALUE: [Field; 2] = [f(1, "key", Str), f(2, "value", Msg(&ANY_VALUE))];
static SCOPE: [Field; 4] = [
    f(1, "name", Str),
    f(2, "version", Str),
    r(3, "attributes", Msg(&KEY_VALUE)),
    f(4, "droppedAttributesCount", Int),
];
static RESOURCE: [Field; 2] = [r(1, "attributes", Msg(&KEY_VALUE)), f(2, "droppedAttributesCount", Int)];

// trace.proto
static TRACES_REQUEST: [Field; 1] = [r(1, "resourceSpans", Msg(&RESOURCE_SPANS))];
static RESOURCE_SPANS: [Field; 3] = [
    f(1, "resource", Msg(&RESOURCE)),
    r(2, "scopeSpans", Msg(&SCOPE_SPANS)),
    f(3, "schemaUrl", Str),
];
static SCOPE_SPANS: [Field; 3] = [f(1, "scope", Msg(&SCOPE)), r(2, "spans", Msg(&SPAN)), f(3, "schemaUrl", Str)];
static SPAN: [Field; 16] = [
    f(1, "traceId", Hex),
    f(2, "spanId", Hex),
    f(3, "traceState", Str),
    f(4, "parentSpanId", Hex),
    f(16, "flags", Fixed32),
    f(5, "name", Str),
    f(6, "kind", Int),
    f(7, "startTimeUnixNano", Fixed64),
    f(8, "endTimeUnixNano", Fixed64),
    r(9, "attributes", Msg(&KEY_VALUE)),
    f(10, "droppedAttributesCount", Int),
    r(11, "events", Msg(&SPAN_EVENT)),
    f(12, "droppedEventsCount", Int),
    r(13, "links", Msg(&SPAN_LINK)),
    f(14, "droppedLinksCount", Int),
    f(15, "status", Msg(&STATUS)),
];
static SPAN_EVENT: [Field; 4] = [
    f(1, "timeUnixNano", Fixed64),
    f(2, "name", Str),
    r(3, "attributes", Msg(&KEY_VALUE)),
    f(4, "droppedAttributesCount", Int),
];
static SPAN_LINK: [Field; 6] = [
    f(1, "traceId", Hex),
    f(2, "spanId", Hex),
    f(3, "traceState", Str),
    r(4, "attributes", Msg(&KEY_VALUE)),
    f(5, "droppedAttributesCount", Int),
    f(6, "flags", Fixed32),
];
static STATUS: [Field; 2] = [f(2, "message", Str), f(3, "code", Int)];

// metrics.proto
static METRICS_REQUEST: [Field; 1] = [r(1, "resourceMetrics", Msg(&RESOURCE_METRICS))];
static RESOURCE_METRICS: [Field; 3] = [
    f(1, "resource", Msg(&RESOURCE)),
    r(2, "scopeMetrics", Msg(&SCOPE_METRICS)),
    f(3, "schemaUrl", Str),
];
static SCOPE_METRICS: [Field; 3] = [f(1, "scope", Msg(&SCOPE)), r(2, "metrics", Msg(&METRIC)), f(3, "schemaUrl", Str)];
static METRIC: [Field; 8] = [
    f(1, "name", Str),
    f(2, "description", Str),
    f(3, "unit", Str),
    f(5, "gauge", Msg(&GAUGE)),
    f(7, "sum", Msg(&SUM)),
    f(9, "histogram", Msg(&HISTOGRAM)),
    f(10, "exponentialHistogram", Msg(&EXP_HISTOGRAM)),
    f(11, "summary", Msg(&SUMMARY)),
];
static GAUGE: [Field; 1] = [r(1, "dataPoints", Msg(&NUMBER_POINT))];
static SUM: [Field; 3] = [
    r(1, "dataPoints", Msg(&NUMBER_POINT)),
    f(2, "aggregationTemporality", Int),
    f(3, "isMonotonic", Bool),
];
static HISTOGRAM: [Field; 2] = [r(1, "dataPoints", Msg(&HISTOGRAM_POINT)), f(2, "aggregationTemporality", Int)];
static EXP_HISTOGRAM: [Field; 2] = [r(1, "dataPoints", Msg(&EXP_POINT)), f(2, "aggregationTemporality", Int)];
static SUMMARY: [Field; 1] = [r(1, "dataPoints", Msg(&SUMMARY_POINT))];
static NUMBER_POINT: [Field; 6] = [
    r(7, "attributes", Msg(&KEY_VALUE)),
    f(2, "startTimeUnixNano", Fixed64),
    f(3, "timeUnixNano", Fixed64),
    f(4, "asDouble", Double),
    f(6, "asInt", SFixed64),
    f(8, "flags", Int),
];
static HISTOGRAM_POINT: [Field; 10] = [
    r(9, "attributes", Msg(&KEY_VALUE)),
    f(2, "startTimeUnixNano", Fixed64),
    f(3, "timeUnixNano", Fixed64),
    f(4, "count", Fixed64),
    f(5, "sum", Double),
    r(6, "bucketCounts", Fixed64),
    r(7, "explicitBounds", Double),
    f(10, "flags", Int),
    f(11, "min", Double),
    f(12, "max", Double),
];
static EXP_POINT: [Field; 13] = [
    r(1, "attributes", Msg(&KEY_VALUE)),
    f(2, "startTimeUnixNano", Fixed64),
    f(3, "timeUnixNano", Fixed64),
    f(4, "count", Fixed64),
    f(5, "sum", Double),
    f(6, "scale", SInt),
    f(7, "zeroCount", Fixed64),
    f(8, "positive", Msg(&EXP_BUCKETS)),
    f(9, "negative", Msg(&EXP_BUCKETS)),
    f(10, "flags", Int),
    f(12, "min", Double),
    f(13, "max", Double),
    f(14, "zeroThreshold", Double),
];
static EXP_BUCKETS: [Field; 2] = [f(1, "offset", SInt), r(2, "bucketCounts", Int64)];
static SUMMARY_POINT: [Field; 7] = [
    r(7, "attributes", Msg(&KEY_VALUE)),
    f(2, "startTimeUnixNano", Fixed64),
    f(3, "timeUnixNano", Fixed64),
    f(4, "count", Fixed64),
    f(5, "sum", Double),
    r(6, "quantileValues", Msg(&QUANTILE)),
    f(8, "flags", Int),
];
static QUANTILE: [Field; 2] = [f(1, "quantile", Double), f(2, "value", Double)];

// logs.proto
static LOGS_REQUEST: [Field; 1] = [r(1, "resourceLogs", Msg(&RESOURCE_LOGS))];
static RESOURCE_LOGS: [Field; 3] = [
    f(1, "resource", Msg(&RESOURCE)),
    r(2, "scopeLogs", Msg(&SCOPE_LOGS)),
    f(3, "schemaUrl", Str),
];
static SCOPE_LOGS: [Field; 3] = [f(1, "scope", Msg(&SCOPE)), r(2, "logRecords", Msg(&LOG_RECORD)), f(3, "schemaUrl", Str)];
static LOG_RECORD: [Field; 11] = [
    f(1, "timeUnixNano", Fixed64),
    f(11, "observedTimeUnixNano", Fixed64),
    f(2, "severityNumber", Int),
    f(3, "severityText", Str),
    f(5, "body", Msg(&ANY_VALUE)),
    r(6, "attributes", Msg(&KEY_VALUE)),
    f(7, "droppedAttributesCount", Int),
    f(8, "flags", Fixed32),
    f(9, "traceId", Hex),
    f(10, "spanId", Hex),
    f(12, "eventName", Str),
];

/// Which request a path takes.
#[derive(Clone, Copy)]
pub enum Signal {
    Traces,
    Metrics,
    Logs,
}

impl Signal {
    fn schema(&self) -> &'static [Field] {
        match self {
            Signal::Traces => &TRACES_REQUEST,
            Signal::Metrics => &METRICS_REQUEST,
            Signal::Logs => &LOGS_REQUEST,
        }
    }
}

/// Values (fields, list items) one request may decode into: each becomes a
/// JSON value of tens of bytes, from as little as one byte of input.
const MAX_VALUES: usize = 400_000;

/// A protobuf request in its OTLP/JSON form.
pub fn decode(signal: Signal, bytes: &[u8]) -> Result<Value, String> {
    let mut budget = MAX_VALUES;
    message(bytes, signal.schema(), 0, &mut budget)
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let byte = *self.b.get(self.pos).ok_or("truncated varint")?;
            self.pos += 1;
            v |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.b.len()).ok_or("truncated field")?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn fixed64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().map_err(|_| "truncated fixed64")?))
    }
    fn fixed32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().map_err(|_| "truncated fixed32")?))
    }
}

fn hex(b: &[u8]) -> String {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(H[(x >> 4) as usize] as char);
        s.push(H[(x & 15) as usize] as char);
    }
    s
}

fn base64(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(b.len().div_ceil(3) * 4);
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

fn double(bits: u64) -> Value {
    let d = f64::from_bits(bits);
    // JSON has no NaN or infinity: OTLP/JSON writes them as strings
    if d.is_finite() {
        json!(d)
    } else if d.is_nan() {
        json!("NaN")
    } else if d > 0.0 {
        json!("Infinity")
    } else {
        json!("-Infinity")
    }
}

/// One scalar of a kind, read from the wire (wire type already checked).
fn scalar(rd: &mut Reader, kind: Kind, wire: u64) -> Result<Value, String> {
    Ok(match (kind, wire) {
        (Int, 0) => json!(rd.varint()? as i64 as i32 as i64),
        (Int64, 0) => json!((rd.varint()? as i64).to_string()),
        (SInt, 0) => {
            let v = rd.varint()?;
            json!(((v >> 1) as i64) ^ -((v & 1) as i64))
        }
        (Bool, 0) => json!(rd.varint()? != 0),
        (Fixed64, 1) => json!(rd.fixed64()?.to_string()),
        (SFixed64, 1) => json!((rd.fixed64()? as i64).to_string()),
        (Double, 1) => double(rd.fixed64()?),
        (Fixed32, 5) => json!(rd.fixed32()?),
        _ => return Err("field has the wrong wire type".into()),
    })
}

fn wire_of(kind: Kind) -> u64 {
    match kind {
        Int | Int64 | SInt | Bool => 0,
        Fixed64 | SFixed64 | Double => 1,
        Fixed32 => 5,
        Str | Hex | Bytes | Msg(_) => 2,
    }
}

fn message(b: &[u8], schema: &'static [Field], depth: usize, budget: &mut usize) -> Result<Value, String> {
    if depth > MAX_DEPTH {
        return Err("message nested too deeply".into());
    }
    let mut out = Map::new();
    let mut rd = Reader { b, pos: 0 };
    while rd.pos < b.len() {
        let key = rd.varint()?;
        let (num, wire) = ((key >> 3) as u32, key & 7);
        if num == 0 {
            return Err("field number 0".into());
        }
        let Some(field) = schema.iter().find(|f| f.num == num) else {
            // unknown: skip it by its wire type
            match wire {
                0 => {
                    rd.varint()?;
                }
                1 => {
                    rd.take(8)?;
                }
                2 => {
                    let n = rd.varint()? as usize;
                    rd.take(n)?;
                }
                5 => {
                    rd.take(4)?;
                }
                _ => return Err(format!("unsupported wire type {wire}")),
            }
            continue;
        };
        let mut values: Vec<Value> = Vec::new();
        match (field.kind, wire) {
            (Str, 2) => {
                let n = rd.varint()? as usize;
                let s = std::str::from_utf8(rd.take(n)?).map_err(|_| format!("field {} is not UTF-8", field.name))?;
                values.push(json!(s));
            }
            (Hex, 2) => {
                let n = rd.varint()? as usize;
                values.push(json!(hex(rd.take(n)?)));
            }
            (Bytes, 2) => {
                let n = rd.varint()? as usize;
                values.push(json!(base64(rd.take(n)?)));
            }
            (Msg(sub), 2) => {
                let n = rd.varint()? as usize;
                values.push(message(rd.take(n)?, sub, depth + 1, budget)?);
            }
            // a packed repeated scalar
            (k, 2) if field.repeated => {
                let n = rd.varint()? as usize;
                let mut inner = Reader { b: rd.take(n)?, pos: 0 };
                while inner.pos < inner.b.len() {
                    // each value is a JSON value (tens of bytes) decoded from
                    // as little as one byte: a long packed list is refused
                    if values.len() >= MAX_PACKED {
                        return Err(format!("field {} has more than {MAX_PACKED} values", field.name));
                    }
                    values.push(scalar(&mut inner, k, wire_of(k))?);
                }
            }
            (k, w) => values.push(scalar(&mut rd, k, w)?),
        }
        *budget = budget
            .checked_sub(values.len())
            .ok_or_else(|| format!("the request decodes into more than {MAX_VALUES} values"))?;
        if field.repeated {
            let e = out.entry(field.name).or_insert_with(|| Value::Array(Vec::new()));
            if let Value::Array(a) = e {
                a.extend(values);
            }
        } else if let Some(v) = values.pop() {
            // the last one wins, as protobuf says
            out.insert(field.name.into(), v);
        }
    }
    Ok(Value::Object(out))
}

// ---------------------------------------------------------------------------
// Responses: Export{Trace,Metrics,Logs}ServiceResponse { partial_success = 1 {
// rejected_<things> = 1 (int64), error_message = 2 } }
// ---------------------------------------------------------------------------

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// The protobuf response: empty when nothing was rejected.
pub fn response(rejected: i64, message: &str) -> Vec<u8> {
    if rejected == 0 && message.is_empty() {
        return Vec::new();
    }
    let mut inner = Vec::new();
    if rejected != 0 {
        inner.push(0x08);
        put_varint(&mut inner, rejected as u64);
    }
    if !message.is_empty() {
        inner.push(0x12);
        put_varint(&mut inner, message.len() as u64);
        inner.extend_from_slice(message.as_bytes());
    }
    let mut out = vec![0x0a];
    put_varint(&mut out, inner.len() as u64);
    out.extend(inner);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(num: u32, wire: u32) -> u8 {
        (num << 3 | wire) as u8
    }
    fn ld(num: u32, body: &[u8]) -> Vec<u8> {
        let mut v = vec![key(num, 2)];
        put_varint(&mut v, body.len() as u64);
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn a_span_request() {
        let mut span = Vec::new();
        span.extend(ld(1, &[0xab; 16]));
        span.extend(ld(2, &[0x01; 8]));
        span.extend(ld(5, b"GET /"));
        span.extend([key(6, 0), 2]);
        span.push(key(7, 1));
        span.extend(1_000u64.to_le_bytes());
        span.push(key(8, 1));
        span.extend(2_000u64.to_le_bytes());
        let attr_val = ld(1, b"shop");
        let kv = [ld(1, b"service.name"), ld(2, &attr_val)].concat();
        let resource = ld(1, &kv);
        let status = [vec![key(3, 0), 2], ld(2, b"boom")].concat();
        span.extend(ld(15, &status));
        // an unknown field is skipped
        span.extend([0xa0, 0x01, 5]); // field 20, varint
        let scope_spans = ld(2, &span);
        let rs = [ld(1, &resource), ld(2, &scope_spans)].concat();
        let req = ld(1, &rs);
        let v = decode(Signal::Traces, &req).unwrap();
        let s = &v["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(s["traceId"], "abababababababababababababababab");
        assert_eq!(s["spanId"], "0101010101010101");
        assert_eq!(s["name"], "GET /");
        assert_eq!(s["kind"], 2);
        assert_eq!(s["startTimeUnixNano"], "1000");
        assert_eq!(s["status"]["code"], 2);
        assert_eq!(s["status"]["message"], "boom");
        assert_eq!(v["resourceSpans"][0]["resource"]["attributes"][0]["value"]["stringValue"], "shop");
    }

    #[test]
    fn packed_and_signed_fields() {
        // histogram point: packed fixed64 bucket counts, packed doubles
        let counts: Vec<u8> = [1u64, 2, 3].iter().flat_map(|c| c.to_le_bytes()).collect();
        let bounds: Vec<u8> = [0.5f64, 1.0].iter().flat_map(|b| b.to_bits().to_le_bytes()).collect();
        let point = [ld(6, &counts), ld(7, &bounds)].concat();
        let hist = ld(1, &point);
        let metric = [ld(1, b"latency"), ld(9, &hist)].concat();
        let req = ld(1, &ld(2, &ld(2, &metric)));
        let v = decode(Signal::Metrics, &req).unwrap();
        let p = &v["resourceMetrics"][0]["scopeMetrics"][0]["metrics"][0]["histogram"]["dataPoints"][0];
        assert_eq!(p["bucketCounts"], json!(["1", "2", "3"]));
        assert_eq!(p["explicitBounds"], json!([0.5, 1.0]));
        // sint32 zigzag: -3 is 5
        let buckets = [vec![key(1, 0), 5]].concat();
        let v = message(&buckets, &EXP_BUCKETS, 0, &mut 100).unwrap();
        assert_eq!(v["offset"], -3);
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(decode(Signal::Traces, &[0x0a, 0x05, 0x01]).is_err()); // cut short
        assert!(decode(Signal::Traces, &[0x0a]).is_err());
        assert!(decode(Signal::Traces, &[0xff; 12]).is_err()); // endless varint
        assert!(decode(Signal::Traces, &[0x08, 0x01]).is_err()); // wrong wire type
        assert!(decode(Signal::Traces, &[0x00]).is_err()); // field 0
        // deep nesting of AnyValue arrays
        let mut v = ld(1, b"x");
        for _ in 0..100 {
            v = ld(5, &ld(1, &v));
        }
        assert!(message(&v, &ANY_VALUE, 0, &mut 1_000_000).is_err());
        // a string that is not UTF-8
        let span = ld(5, &[0xff, 0xfe]);
        assert!(decode(Signal::Traces, &ld(1, &ld(2, &ld(2, &span)))).is_err());
        assert_eq!(decode(Signal::Traces, &[]).unwrap(), json!({}));
    }

    #[test]
    fn responses() {
        assert!(response(0, "").is_empty());
        assert_eq!(response(2, "x"), vec![0x0a, 0x05, 0x08, 0x02, 0x12, 0x01, b'x']);
        assert_eq!(base64(b"any carnal pleas"), "YW55IGNhcm5hbCBwbGVhcw==");
    }
}

// ---------------------------------------------------------------------------
// What the extension stores from a request (OTLP/JSON form, either encoding)
// ---------------------------------------------------------------------------

/// A resource's or data point's attributes as a flat object of plain values.
pub fn attributes(v: Option<&Value>) -> Map<String, Value> {
    let mut m = Map::new();
    for kv in v.and_then(Value::as_array).into_iter().flatten() {
        if let (Some(k), Some(val)) = (kv.get("key").and_then(Value::as_str), kv.get("value")) {
            m.insert(k.to_string(), any_value(val));
        }
    }
    m
}

/// An AnyValue as plain JSON.
fn any_value(v: &Value) -> Value {
    if let Some(s) = v.get("stringValue") {
        return s.clone();
    }
    if let Some(b) = v.get("boolValue") {
        return b.clone();
    }
    if let Some(i) = v.get("intValue") {
        return match i {
            Value::String(s) => s.parse::<i64>().map(Value::from).unwrap_or_else(|_| i.clone()),
            other => other.clone(),
        };
    }
    if let Some(d) = v.get("doubleValue") {
        return d.clone();
    }
    if let Some(a) = v.get("arrayValue") {
        return Value::Array(a.get("values").and_then(Value::as_array).into_iter().flatten().map(any_value).collect());
    }
    if let Some(kv) = v.get("kvlistValue") {
        return Value::Object(attributes(kv.get("values")));
    }
    if let Some(b) = v.get("bytesValue") {
        return b.clone();
    }
    Value::Null
}

fn u64_of(v: Option<&Value>) -> Option<u64> {
    match v? {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

fn f64_of(v: Option<&Value>) -> Option<f64> {
    match v? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => match s.as_str() {
            "NaN" => Some(f64::NAN),
            "Infinity" => Some(f64::INFINITY),
            "-Infinity" => Some(f64::NEG_INFINITY),
            other => other.parse().ok(),
        },
        _ => None,
    }
}

fn text_of(m: &Map<String, Value>, key: &str) -> Option<String> {
    match m.get(key)? {
        Value::String(s) if !s.is_empty() => Some(s.replace('\u{0}', "")),
        Value::Null | Value::String(_) => None,
        other => Some(other.to_string()),
    }
}

fn environment_of(resource: &Map<String, Value>) -> Option<String> {
    text_of(resource, "deployment.environment.name").or_else(|| text_of(resource, "deployment.environment"))
}

/// What a logs request gives: the error records as captures; the others are
/// not stored (counted).
#[derive(Debug, Default)]
pub struct Logs {
    pub captures: Vec<crate::sentry::Capture>,
    pub not_errors: usize,
}

/// Log records of severity ERROR or above (severity_number >= 17, or a
/// severity text saying so) that carry an exception (`exception.type` or
/// `exception.message`, OpenTelemetry's semantic conventions) become
/// captures joined to their trace. The event id is a hash of the record, so
/// an exporter that retries a batch stores each record once.
pub fn logs(req: &Value) -> Logs {
    use sha2::Digest;
    let mut out = Logs::default();
    for rl in req.get("resourceLogs").and_then(Value::as_array).into_iter().flatten() {
        let resource = attributes(rl.get("resource").and_then(|r| r.get("attributes")));
        for sl in rl.get("scopeLogs").and_then(Value::as_array).into_iter().flatten() {
            let scope = sl.get("scope").and_then(|s| s.get("name")).and_then(Value::as_str);
            for rec in sl.get("logRecords").and_then(Value::as_array).into_iter().flatten() {
                let attrs = attributes(rec.get("attributes"));
                let sev = rec.get("severityNumber").and_then(Value::as_i64).unwrap_or(0);
                let sev_text = rec.get("severityText").and_then(Value::as_str).unwrap_or("").to_ascii_uppercase();
                let is_error = sev >= 17 || (sev == 0 && matches!(sev_text.as_str(), "ERROR" | "FATAL" | "CRITICAL"));
                let ty = text_of(&attrs, "exception.type");
                let msg = text_of(&attrs, "exception.message");
                if !is_error || (ty.is_none() && msg.is_none()) {
                    out.not_errors += 1;
                    continue;
                }
                let body = rec.get("body").map(any_value).and_then(|b| match b {
                    Value::String(s) => Some(s),
                    Value::Null => None,
                    other => Some(other.to_string()),
                });
                if out.captures.len() >= MAX_LOG_RECORDS {
                    out.not_errors += 1;
                    continue;
                }
                let exception_type = ty.unwrap_or_else(|| "Error".into());
                // an exception without a message reads as its type (as Sentry shows it)
                let message = msg
                    .or(body.clone())
                    .map(|m| m.replace('\u{0}', ""))
                    .filter(|m| !m.trim().is_empty())
                    .unwrap_or_else(|| exception_type.clone());
                let stack = text_of(&attrs, "exception.stacktrace");
                let fingerprint = fraiseql_fingerprint::default_fingerprint(&exception_type, &message, stack.as_deref());
                let ns = u64_of(rec.get("timeUnixNano")).filter(|n| *n > 0).or_else(|| u64_of(rec.get("observedTimeUnixNano")));
                let mut h = sha2::Sha256::new();
                h.update(serde_json::to_vec(rec).unwrap_or_default());
                h.update(serde_json::to_vec(&resource).unwrap_or_default());
                let event_id = hex(&h.finalize()[..16]);
                let mut otel = Map::new();
                otel.insert("attributes".into(), Value::Object(attrs.clone()));
                otel.insert("resource".into(), Value::Object(resource.clone()));
                if let Some(s) = scope {
                    otel.insert("scope".into(), json!(s));
                }
                if let Some(b) = body {
                    otel.insert("body".into(), json!(b));
                }
                if !sev_text.is_empty() {
                    otel.insert("severity_text".into(), json!(sev_text));
                }
                let mut context = Map::new();
                context.insert("otel".into(), Value::Object(otel));
                if let Some(u) = text_of(&attrs, "enduser.id").or_else(|| text_of(&attrs, "user.id")) {
                    context.insert("user".into(), json!({ "id": u }));
                }
                let id = |k: &str, len: usize| {
                    rec.get(k)
                        .and_then(Value::as_str)
                        .map(str::to_ascii_lowercase)
                        .filter(|s| s.len() == len && s.bytes().all(|c| c.is_ascii_hexdigit()) && s.bytes().any(|c| c != b'0'))
                };
                out.captures.push(crate::sentry::Capture {
                    event_id,
                    is_message: false,
                    exception_type: exception_type.replace('\u{0}', ""),
                    message,
                    stack_trace: stack,
                    fingerprint,
                    context: Value::Object(context),
                    environment: environment_of(&resource),
                    severity: if sev >= 21 || sev_text == "FATAL" { "critical" } else { "error" }.into(),
                    release: text_of(&resource, "service.version"),
                    trace_id: id("traceId", 32),
                    span_id: id("spanId", 16),
                    timestamp: ns.map(|n| n as f64 / 1e9),
                });
            }
        }
    }
    out
}

/// One metric data point, as the extension's metric state takes it.
#[derive(Debug, Clone, PartialEq)]
pub enum Point {
    /// a sum: monotonic ones are counters, the others gauges; a delta is
    /// added to what came before, a cumulative value replaces it
    Sum { name: String, labels: Map<String, Value>, environment: Option<String>, stream: String, start_ns: u64, time_ns: u64, value: f64, delta: bool, monotonic: bool },
    Gauge { name: String, labels: Map<String, Value>, environment: Option<String>, value: f64 },
    /// explicit bounds (the last bucket is +Inf); counts per bucket
    Histogram { name: String, labels: Map<String, Value>, environment: Option<String>, stream: String, start_ns: u64, time_ns: u64, bounds: Vec<f64>, counts: Vec<u64>, sum: f64, count: u64, delta: bool },
}

/// Data points one request may carry (more are rejected).
pub const MAX_POINTS: usize = 10_000;
/// Log records one request may carry (more are rejected).
pub const MAX_LOG_RECORDS: usize = 5_000;

/// A metric or label name: printable, no NUL or control character (a NUL
/// in a text value makes PostgreSQL's unique checks and equality disagree),
/// at most 200 bytes.
fn valid_name(n: &str) -> bool {
    !n.is_empty() && n.len() <= 200 && !n.chars().any(char::is_control)
}

/// A label value as stored: text without NUL or control characters, at
/// most 1 kB.
fn label_value(v: &Value) -> Option<Value> {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Null => return None,
        other => other.to_string(),
    };
    let s: String = s.chars().filter(|c| !c.is_control()).collect();
    if s.len() > 1024 {
        return None;
    }
    Some(Value::String(s))
}

/// The identity of the process that sent a point: its resource's attributes
/// (service.instance.id included), hashed. Cumulative points are turned into
/// deltas per stream, so two replicas of a service count apart.
fn stream_of(resource: &Map<String, Value>) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(serde_json::to_vec(resource).unwrap_or_default());
    hex(&h.finalize()[..12])
}

/// The data points of a metrics request, and what was rejected.
pub fn metrics(req: &Value) -> (Vec<Point>, Vec<String>) {
    let mut points = Vec::new();
    let mut rejected = Vec::new();
    for rm in req.get("resourceMetrics").and_then(Value::as_array).into_iter().flatten() {
        let resource = attributes(rm.get("resource").and_then(|r| r.get("attributes")));
        let env = environment_of(&resource).filter(|e| valid_name(e) && e.len() <= 64);
        let job = text_of(&resource, "service.name").filter(|j| valid_name(j));
        let stream = stream_of(&resource);
        for sm in rm.get("scopeMetrics").and_then(Value::as_array).into_iter().flatten() {
            for m in sm.get("metrics").and_then(Value::as_array).into_iter().flatten() {
                if points.len() + rejected.len() >= MAX_POINTS {
                    rejected.push(format!("more than {MAX_POINTS} points in one request"));
                    return (points, rejected);
                }
                let Some(name) = m.get("name").and_then(Value::as_str).filter(|n| valid_name(n)) else {
                    rejected.push("a metric without a valid name (1 to 200 printable bytes)".into());
                    continue;
                };
                let labels_of = |p: &Value| {
                    let mut l = Map::new();
                    for (k, v) in attributes(p.get("attributes")) {
                        if let (true, Some(v)) = (valid_name(&k), label_value(&v)) {
                            l.insert(k, v);
                        }
                    }
                    if let Some(j) = &job {
                        l.entry("job").or_insert_with(|| json!(j));
                    }
                    l
                };
                let dps = |kind: &str| -> Vec<&Value> {
                    m.get(kind).and_then(|k| k.get("dataPoints")).and_then(Value::as_array).into_iter().flatten().collect()
                };
                let number = |p: &Value| f64_of(p.get("asDouble")).or_else(|| f64_of(p.get("asInt")));
                let delta_of = |kind: &str| m.get(kind).and_then(|k| k.get("aggregationTemporality")).and_then(Value::as_i64) == Some(1);
                if m.get("gauge").is_some() {
                    for p in dps("gauge") {
                        if points.len() + rejected.len() >= MAX_POINTS {
                            rejected.push(format!("more than {MAX_POINTS} points in one request"));
                            return (points, rejected);
                        }
                        match number(p) {
                            Some(v) if v.is_finite() => points.push(Point::Gauge { name: name.into(), labels: labels_of(p), environment: env.clone(), value: v }),
                            _ => rejected.push(format!("{name}: a point without a finite value")),
                        }
                    }
                } else if let Some(sum) = m.get("sum") {
                    let monotonic = sum.get("isMonotonic").and_then(Value::as_bool).unwrap_or(false);
                    let delta = delta_of("sum");
                    for p in dps("sum") {
                        if points.len() + rejected.len() >= MAX_POINTS {
                            rejected.push(format!("more than {MAX_POINTS} points in one request"));
                            return (points, rejected);
                        }
                        match number(p) {
                            Some(v) if v.is_finite() && !(monotonic && v < 0.0) => points.push(Point::Sum {
                                name: name.into(),
                                labels: labels_of(p),
                                environment: env.clone(),
                                stream: stream.clone(),
                                start_ns: u64_of(p.get("startTimeUnixNano")).unwrap_or(0),
                                time_ns: u64_of(p.get("timeUnixNano")).unwrap_or(0),
                                value: v,
                                delta,
                                monotonic,
                            }),
                            _ => rejected.push(format!("{name}: a point without a valid value")),
                        }
                    }
                } else if m.get("histogram").is_some() {
                    let delta = delta_of("histogram");
                    for p in dps("histogram") {
                        if points.len() + rejected.len() >= MAX_POINTS {
                            rejected.push(format!("more than {MAX_POINTS} points in one request"));
                            return (points, rejected);
                        }
                        let bounds: Vec<f64> = p.get("explicitBounds").and_then(Value::as_array).into_iter().flatten().filter_map(|b| f64_of(Some(b))).collect();
                        let counts: Vec<u64> = p.get("bucketCounts").and_then(Value::as_array).into_iter().flatten().filter_map(|c| u64_of(Some(c))).collect();
                        if counts.len() != bounds.len() + 1 || bounds.len() > 160 || bounds.iter().any(|b| !b.is_finite()) || bounds.windows(2).any(|w| w[0] >= w[1]) {
                            rejected.push(format!("{name}: bucket counts do not match the bounds"));
                            continue;
                        }
                        let Some(total) = checked_total(&counts, u64_of(p.get("count"))) else {
                            rejected.push(format!("{name}: a count that is not the sum of its buckets, or too large"));
                            continue;
                        };
                        points.push(Point::Histogram {
                            name: name.into(),
                            labels: labels_of(p),
                            environment: env.clone(),
                            stream: stream.clone(),
                            start_ns: u64_of(p.get("startTimeUnixNano")).unwrap_or(0),
                            time_ns: u64_of(p.get("timeUnixNano")).unwrap_or(0),
                            count: total,
                            sum: f64_of(p.get("sum")).filter(|s| s.is_finite()).unwrap_or(0.0),
                            bounds,
                            counts,
                            delta,
                        });
                    }
                } else if m.get("exponentialHistogram").is_some() {
                    let delta = delta_of("exponentialHistogram");
                    for p in dps("exponentialHistogram") {
                        if points.len() + rejected.len() >= MAX_POINTS {
                            rejected.push(format!("more than {MAX_POINTS} points in one request"));
                            return (points, rejected);
                        }
                        match exponential_to_explicit(p).and_then(|(b, c)| checked_total(&c, u64_of(p.get("count"))).map(|t| (b, c, t))) {
                            Some((bounds, counts, total)) => points.push(Point::Histogram {
                                name: name.into(),
                                labels: labels_of(p),
                                environment: env.clone(),
                                stream: stream.clone(),
                                start_ns: u64_of(p.get("startTimeUnixNano")).unwrap_or(0),
                                time_ns: u64_of(p.get("timeUnixNano")).unwrap_or(0),
                                count: total,
                                sum: f64_of(p.get("sum")).filter(|s| s.is_finite()).unwrap_or(0.0),
                                bounds,
                                counts,
                                delta,
                            }),
                            None => rejected.push(format!("{name}: an exponential histogram point out of range")),
                        }
                    }
                } else if m.get("summary").is_some() {
                    // a summary has no Prometheus state here: its parts as gauges
                    for p in dps("summary") {
                        if points.len() + rejected.len() >= MAX_POINTS {
                            rejected.push(format!("more than {MAX_POINTS} points in one request"));
                            return (points, rejected);
                        }
                        let labels = labels_of(p);
                        for (suffix, v) in [("_sum", f64_of(p.get("sum"))), ("_count", u64_of(p.get("count")).map(|c| c as f64))] {
                            if let Some(v) = v.filter(|v| v.is_finite()) {
                                points.push(Point::Gauge { name: format!("{name}{suffix}"), labels: labels.clone(), environment: env.clone(), value: v });
                            }
                        }
                        for q in p.get("quantileValues").and_then(Value::as_array).into_iter().flatten() {
                            if points.len() + rejected.len() >= MAX_POINTS {
                                rejected.push(format!("more than {MAX_POINTS} points in one request"));
                                return (points, rejected);
                            }
                            if let (Some(qq), Some(v)) = (f64_of(q.get("quantile")), f64_of(q.get("value")).filter(|v| v.is_finite())) {
                                let mut l = labels.clone();
                                l.insert("quantile".into(), json!(qq.to_string()));
                                points.push(Point::Gauge { name: name.into(), labels: l, environment: env.clone(), value: v });
                            }
                        }
                    }
                } else {
                    rejected.push(format!("{name}: no data"));
                }
            }
        }
    }
    (points, rejected)
}

/// The total of a histogram's buckets, which must equal its count (when
/// given) and stay far from overflowing the exported counters.
fn checked_total(counts: &[u64], count: Option<u64>) -> Option<u64> {
    let total = counts.iter().try_fold(0u64, |a, c| a.checked_add(*c))?;
    if total > i64::MAX as u64 / 1024 || count.is_some_and(|c| c != total) {
        return None;
    }
    Some(total)
}

/// An exponential histogram's positive buckets as explicit upper bounds
/// (base = 2^(2^-scale); bucket i holds (base^i, base^(i+1)]), with the zero
/// bucket and the negative values counted in the first one. At most 160
/// buckets (wider histograms are refused).
fn exponential_to_explicit(p: &Value) -> Option<(Vec<f64>, Vec<u64>)> {
    let scale = p.get("scale").and_then(Value::as_i64).unwrap_or(0);
    if !(-10..=20).contains(&scale) {
        return None;
    }
    let base = 2f64.powf(2f64.powi(-(scale as i32)));
    let pos = p.get("positive");
    let offset = pos.and_then(|b| b.get("offset")).and_then(Value::as_i64).unwrap_or(0);
    let counts: Vec<u64> = pos.and_then(|b| b.get("bucketCounts")).and_then(Value::as_array).into_iter().flatten().filter_map(|c| u64_of(Some(c))).collect();
    let negative = p
        .get("negative")
        .and_then(|b| b.get("bucketCounts"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .try_fold(0u64, |a, c| a.checked_add(u64_of(Some(c))?))?;
    let zero = u64_of(p.get("zeroCount")).unwrap_or(0);
    if counts.len() > 160 {
        return None;
    }
    let mut bounds = Vec::with_capacity(counts.len() + 1);
    let mut out = Vec::with_capacity(counts.len() + 2);
    // (.., base^offset]: zero and negative values
    if offset.abs() >= 100_000 {
        return None;
    }
    let lowest = base.powi(offset as i32);
    if !lowest.is_finite() {
        return None;
    }
    bounds.push(lowest);
    out.push(zero.checked_add(negative)?);
    for (i, c) in counts.iter().enumerate() {
        let exp = offset.checked_add(i as i64 + 1).filter(|e| e.abs() < 100_000)?;
        let ub = base.powi(exp as i32);
        if !ub.is_finite() || ub <= *bounds.last()? {
            return None;
        }
        bounds.push(ub);
        out.push(*c);
    }
    out.push(0); // (last bound, +Inf)
    Some((bounds, out))
}

#[cfg(test)]
mod mapping_tests {
    use super::*;

    #[test]
    fn error_logs_become_captures() {
        let req = json!({"resourceLogs": [{
            "resource": {"attributes": [
                {"key": "service.name", "value": {"stringValue": "shop"}},
                {"key": "service.version", "value": {"stringValue": "1.2.3"}},
                {"key": "deployment.environment", "value": {"stringValue": "staging"}}]},
            "scopeLogs": [{"scope": {"name": "app"}, "logRecords": [
                {"timeUnixNano": "1796637600000000000", "severityNumber": 17, "severityText": "ERROR",
                 "body": {"stringValue": "checkout failed"},
                 "traceId": "0af7651916cd43dd8448eb211c80319c", "spanId": "b7ad6b7169203331",
                 "attributes": [
                    {"key": "exception.type", "value": {"stringValue": "ValueError"}},
                    {"key": "exception.message", "value": {"stringValue": "bad cart 17"}},
                    {"key": "exception.stacktrace", "value": {"stringValue": "Traceback (most recent call last):\n  File \"/srv/app/x.py\", line 3, in f\nValueError: bad cart 17"}}]},
                {"severityNumber": 9, "body": {"stringValue": "hello"}},
                {"severityNumber": 17, "body": {"stringValue": "no exception attributes"}}
            ]}]}]});
        let l = logs(&req);
        assert_eq!(l.not_errors, 2);
        let c = &l.captures[0];
        assert_eq!(c.exception_type, "ValueError");
        assert_eq!(c.message, "bad cart 17");
        assert_eq!(c.environment.as_deref(), Some("staging"));
        assert_eq!(c.release.as_deref(), Some("1.2.3"));
        assert_eq!(c.trace_id.as_deref(), Some("0af7651916cd43dd8448eb211c80319c"));
        assert_eq!(c.timestamp, Some(1796637600.0));
        assert_eq!(c.context["otel"]["body"], "checkout failed");
        // the same record, the same id (a retried batch is stored once)
        assert_eq!(logs(&req).captures[0].event_id, c.event_id);
    }

    #[test]
    fn hostile_metrics_are_rejected() {
        let req = json!({"resourceMetrics": [{"scopeMetrics": [{"metrics": [
            {"name": "a\u{0}b", "gauge": {"dataPoints": [{"asDouble": 1.0}]}},
            {"name": "h", "histogram": {"aggregationTemporality": 1, "dataPoints": [
                {"bucketCounts": [i64::MAX.to_string(), i64::MAX.to_string(), "0"], "explicitBounds": [0.1, 0.5]},
                {"bucketCounts": ["1", "1", "0"], "explicitBounds": [0.1, 0.5], "count": "1"}]}},
            {"name": "e", "exponentialHistogram": {"aggregationTemporality": 1, "dataPoints": [
                {"scale": 0, "zeroCount": u64::MAX.to_string(), "negative": {"bucketCounts": ["1"]}, "positive": {"offset": 2147483647, "bucketCounts": ["1"]}}]}},
            {"name": "ok", "gauge": {"dataPoints": [{"asDouble": 1.0, "attributes": [{"key": "k\u{0}", "value": {"stringValue": "v"}}, {"key": "good", "value": {"stringValue": "v\u{0}w"}}]}]}}
        ]}]}]});
        let (points, rejected) = metrics(&req);
        assert_eq!(rejected.len(), 4, "{rejected:?}");
        assert!(matches!(&points[..], [Point::Gauge { labels, .. }] if labels.len() == 1 && labels["good"] == json!("vw")));
    }

    #[test]
    fn streams_tell_replicas_apart() {
        let one = |instance: &str| json!({"resourceMetrics": [{"resource": {"attributes": [
            {"key": "service.name", "value": {"stringValue": "shop"}},
            {"key": "service.instance.id", "value": {"stringValue": instance}}]},
            "scopeMetrics": [{"metrics": [{"name": "c", "sum": {"aggregationTemporality": 2, "isMonotonic": true, "dataPoints": [{"asInt": "1"}]}}]}]}]});
        let s = |p: &Point| match p { Point::Sum { stream, .. } => stream.clone(), _ => panic!() };
        assert_ne!(s(&metrics(&one("a")).0[0]), s(&metrics(&one("b")).0[0]));
        assert_eq!(s(&metrics(&one("a")).0[0]), s(&metrics(&one("a")).0[0]));
    }

    #[test]
    fn metric_kinds() {
        let req = json!({"resourceMetrics": [{
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "shop"}}]},
            "scopeMetrics": [{"metrics": [
                {"name": "requests", "sum": {"aggregationTemporality": 2, "isMonotonic": true,
                    "dataPoints": [{"asInt": "7", "startTimeUnixNano": "5", "attributes": [{"key": "code", "value": {"intValue": "200"}}]}]}},
                {"name": "temp", "gauge": {"dataPoints": [{"asDouble": 21.5}]}},
                {"name": "latency", "histogram": {"aggregationTemporality": 1, "dataPoints": [
                    {"bucketCounts": ["1", "2", "0"], "explicitBounds": [0.1, 0.5], "sum": 0.7, "count": "3"},
                    {"bucketCounts": ["1"], "explicitBounds": [0.1, 0.5]}]}},
                {"name": "size", "exponentialHistogram": {"aggregationTemporality": 1, "dataPoints": [
                    {"scale": 0, "zeroCount": "1", "positive": {"offset": 0, "bucketCounts": ["2", "3"]}, "count": "6", "sum": 9.0}]}},
                {"name": "rpc", "summary": {"dataPoints": [{"sum": 3.0, "count": "2", "quantileValues": [{"quantile": 0.5, "value": 1.0}]}]}}
            ]}]}]});
        let (points, rejected) = metrics(&req);
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        assert!(matches!(&points[0], Point::Sum { value, monotonic: true, delta: false, labels, start_ns: 5, .. }
            if *value == 7.0 && labels["code"] == json!("200") && labels["job"] == json!("shop")));
        assert!(matches!(&points[1], Point::Gauge { value, .. } if *value == 21.5));
        assert!(matches!(&points[2], Point::Histogram { counts, count: 3, delta: true, .. } if counts == &vec![1, 2, 0]));
        // (the second histogram point, whose counts do not match its bounds, is the rejected one)
        // exponential, scale 0: bounds 1, 2, 4
        assert!(matches!(&points[3], Point::Histogram { bounds, counts, .. } if bounds == &vec![1.0, 2.0, 4.0] && counts == &vec![1, 2, 3, 0]));
        assert_eq!(points.len(), 7);
    }
}
