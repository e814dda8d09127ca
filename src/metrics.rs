//! Metrics: argument checks for the recorder functions (sql/telemetry.sql)
//! and the Prometheus text exposition.
use crate::error::ObsError;
use pgrx::prelude::*;
use serde_json::{Map, Value};
use std::fmt::Write;

/// Checks a metric update; returns the labels with every value as a string
/// (Prometheus label values are strings), so {"code": 200} and
/// {"code": "200"} are one series.
pub fn check(
    name: &str,
    kind: &str,
    value: f64,
    labels: Option<&Value>,
) -> Result<Map<String, Value>, ObsError> {
    if name.trim().is_empty() {
        return Err(ObsError::MissingArgument { argument: "name" });
    }
    if name.len() > 200 {
        return Err(ObsError::invalid("name", "must be at most 200 bytes"));
    }
    if !value.is_finite() {
        return Err(ObsError::invalid(
            "value",
            format!("must be a finite number, got {value}"),
        ));
    }
    if kind == "counter" && value < 0.0 {
        return Err(ObsError::invalid(
            "value",
            "of a counter increment must not be negative (counters only go up)",
        ));
    }
    let mut out = Map::new();
    match labels {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            if m.len() > 32 {
                return Err(ObsError::invalid("labels", "must have at most 32 labels"));
            }
            for (k, v) in m {
                if k.is_empty() {
                    return Err(ObsError::invalid(
                        "labels",
                        "must not have an empty label name",
                    ));
                }
                let s = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    Value::Null => continue,
                    _ => {
                        return Err(ObsError::invalid(
                            "labels",
                            format!("must be a flat object: label \"{k}\" is {v}"),
                        ))
                    }
                };
                out.insert(k.clone(), Value::String(s));
            }
        }
        Some(other) => {
            return Err(ObsError::invalid(
                "labels",
                format!("must be a JSON object, got {other}"),
            ))
        }
    }
    Ok(out)
}

#[pg_extern(immutable, parallel_safe)]
fn _fraiseql_check_metric(
    name: Option<&str>,
    kind: &str,
    value: Option<f64>,
    labels: Option<pgrx::JsonB>,
) -> pgrx::JsonB {
    let name = name.unwrap_or_else(|| ObsError::MissingArgument { argument: "name" }.report());
    let value = value.unwrap_or_else(|| ObsError::MissingArgument { argument: "value" }.report());
    let labels =
        check(name, kind, value, labels.as_ref().map(|l| &l.0)).unwrap_or_else(|e| e.report());
    pgrx::JsonB(Value::Object(labels))
}

/// Adds one observation to per-bucket (non-cumulative) counts.
#[pg_extern(immutable, parallel_safe)]
fn _fraiseql_bucket_add(
    counts: Option<Vec<Option<i64>>>,
    buckets: Option<Vec<Option<f64>>>,
    value: f64,
) -> Vec<i64> {
    let bounds: Vec<f64> = buckets.unwrap_or_default().into_iter().flatten().collect();
    let mut c: Vec<i64> = counts
        .unwrap_or_default()
        .into_iter()
        .map(|x| x.unwrap_or(0))
        .collect();
    c.resize(bounds.len(), 0);
    if let Some(i) = bounds.iter().position(|b| value <= *b) {
        c[i] += 1;
    }
    c
}

/// A metric name as Prometheus accepts it: [a-zA-Z_:][a-zA-Z0-9_:]*
pub fn sanitize_name(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.starts_with(|c: char| c.is_ascii_digit()) || s.is_empty() {
        s.insert(0, '_');
    }
    s
}

/// A label name: [a-zA-Z_][a-zA-Z0-9_]*, and not starting with "__" (reserved).
pub fn sanitize_label(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.starts_with(|c: char| c.is_ascii_digit()) || s.is_empty() {
        s.insert(0, '_');
    }
    while s.starts_with("__") {
        s.remove(0);
    }
    s
}

fn escape_label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Go-style float formatting as Prometheus prints it.
fn num(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else if v == v.trunc() && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

pub struct Series {
    pub name: String,
    pub kind: String,
    pub labels: Map<String, Value>,
    pub environment: String,
    pub help: Option<String>,
    pub value: Option<f64>,
    pub buckets: Vec<f64>,
    pub bucket_counts: Vec<i64>,
    pub obs_count: i64,
    pub obs_sum: f64,
}

fn label_block(labels: &[(String, String)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape_label_value(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

/// A series' labels as exposed: sanitized names, its environment, sorted.
fn exposed_labels(s: &Series) -> Vec<(String, String)> {
    let mut labels: Vec<(String, String)> = s
        .labels
        .iter()
        .map(|(k, v)| {
            (
                sanitize_label(k),
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string()),
            )
        })
        .filter(|(k, _)| k != "le" && k != "environment")
        .collect();
    labels.push(("environment".into(), s.environment.clone()));
    labels.sort();
    labels.dedup_by(|a, b| a.0 == b.0);
    labels
}

/// Series that are one once exposed (names or label names that differ only
/// in characters Prometheus does not allow, as `http.requests` and
/// `http_requests`) become one series: a scrape with the same series twice
/// is refused by Prometheus. Counters and histograms of the same buckets
/// add up; of two gauges, or histograms of other buckets, the first (by
/// recorded name) is kept. `series` is sorted by exposed name.
fn merge_same_series(series: Vec<Series>, exposed: &impl Fn(&Series) -> String) -> Vec<Series> {
    let mut out: Vec<Series> = Vec::with_capacity(series.len());
    let mut index: std::collections::HashMap<(String, String, Vec<(String, String)>), usize> =
        std::collections::HashMap::new();
    for s in series {
        let key = (exposed(&s), s.kind.clone(), exposed_labels(&s));
        match index.get(&key) {
            Some(&i) => {
                let t = &mut out[i];
                match s.kind.as_str() {
                    "counter" => t.value = Some(t.value.unwrap_or(0.0) + s.value.unwrap_or(0.0)),
                    "histogram" if t.buckets == s.buckets => {
                        t.bucket_counts.resize(t.buckets.len(), 0);
                        for (i, c) in s.bucket_counts.iter().enumerate() {
                            if let Some(x) = t.bucket_counts.get_mut(i) {
                                *x = x.saturating_add(*c);
                            }
                        }
                        t.obs_count = t.obs_count.saturating_add(s.obs_count);
                        t.obs_sum += s.obs_sum;
                    }
                    _ => {}
                }
            }
            None => {
                index.insert(key, out.len());
                out.push(s);
            }
        }
    }
    out
}

/// The text exposition format (version 0.0.4) of all series.
pub fn exposition(mut series: Vec<Series>) -> String {
    // counters are exposed as <name>_total
    let exposed = |s: &Series| {
        let n = sanitize_name(&s.name);
        if s.kind == "counter" && !n.ends_with("_total") {
            format!("{n}_total")
        } else {
            n
        }
    };
    series.sort_by(|a, b| {
        exposed(a)
            .cmp(&exposed(b))
            .then(a.environment.cmp(&b.environment))
            .then(a.name.cmp(&b.name))
    });
    let series = merge_same_series(series, &exposed);
    // One family per exposed name: the first series' type (series are
    // sorted) wins, and a series of another type under the same name is
    // left out (not expressible). A histogram's samples are <name>_bucket,
    // _sum and _count: any series exposed under one of those names (of
    // another histogram too) would be a second series of the same name,
    // which promtool refuses, so it is left out as well.
    let mut family_kind: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    for s in &series {
        family_kind.entry(exposed(s)).or_insert_with(|| s.kind.clone());
    }
    let histograms: std::collections::HashSet<&str> = family_kind
        .iter()
        .filter(|(_, k)| k.as_str() == "histogram")
        .map(|(n, _)| n.as_str())
        .collect();
    let taken = |name: &str| {
        ["_bucket", "_sum", "_count"]
            .iter()
            .any(|suffix| name.strip_suffix(suffix).is_some_and(|h| histograms.contains(h)))
    };
    let series: Vec<Series> = series
        .into_iter()
        .filter(|s| {
            let n = exposed(s);
            family_kind.get(&n) == Some(&s.kind) && !taken(&n)
        })
        .collect();
    let mut out = String::new();
    let mut current: Option<(String, String)> = None;
    for s in &series {
        let name = exposed(s);
        // text format 0.0.4: HELP/TYPE name the samples' own name (<name>_total
        // for a counter), unlike OpenMetrics
        let family = name.clone();
        match &current {
            Some((f, k)) if *f == family && *k == s.kind => {}
            Some((f, _)) if *f == family => continue, // same name, other type: not expressible; skipped
            _ => {
                let help = s.help.clone().unwrap_or_else(|| s.name.clone());
                let _ = writeln!(out, "# HELP {family} {}", escape_help(&help));
                let _ = writeln!(out, "# TYPE {family} {}", s.kind);
                current = Some((family.clone(), s.kind.clone()));
            }
        }
        let labels = exposed_labels(s);
        match s.kind.as_str() {
            "histogram" => {
                let mut cumulative = 0i64;
                for (i, b) in s.buckets.iter().enumerate() {
                    cumulative = cumulative.saturating_add(s.bucket_counts.get(i).copied().unwrap_or(0).max(0));
                    let mut l = labels.clone();
                    l.push(("le".into(), num(*b)));
                    let _ = writeln!(out, "{name}_bucket{} {cumulative}", label_block(&l));
                }
                // the +Inf bucket holds every observation: never fewer than
                // the finite buckets, whatever a sender claimed
                let count = s.obs_count.max(cumulative);
                let mut l = labels.clone();
                l.push(("le".into(), "+Inf".into()));
                let _ = writeln!(out, "{name}_bucket{} {count}", label_block(&l));
                let _ = writeln!(out, "{name}_sum{} {}", label_block(&labels), num(s.obs_sum));
                let _ = writeln!(out, "{name}_count{} {count}", label_block(&labels));
            }
            _ => {
                let _ = writeln!(
                    out,
                    "{name}{} {}",
                    label_block(&labels),
                    num(s.value.unwrap_or(0.0))
                );
            }
        }
    }
    out
}

/// Every metric series in the Prometheus text format, for a scrape endpoint
/// (e.g. `psql -Atc 'SELECT fraiseql_metrics_prometheus()'` behind a small
/// HTTP handler, or the postgres datasource).
#[pg_extern(stable)]
fn _fraiseql_metrics_prometheus() -> String {
    let sql = format!(
        "SELECT metric_name, metric_type, labels, environment, help, value, buckets,
                bucket_counts, coalesce(obs_count, 0), coalesce(obs_sum, 0)
           FROM {}.v_metric_series",
        crate::extension::schema()
    );
    let rows = Spi::connect(|c| {
        let t = c.select(&sql, None, &[])?;
        let mut out = Vec::new();
        for r in t {
            out.push(Series {
                name: r.get::<String>(1)?.unwrap_or_default(),
                kind: r.get::<String>(2)?.unwrap_or_default(),
                labels: match r.get::<pgrx::JsonB>(3)? {
                    Some(pgrx::JsonB(Value::Object(m))) => m,
                    _ => Map::new(),
                },
                environment: r.get::<String>(4)?.unwrap_or_default(),
                help: r.get::<String>(5)?,
                value: r.get::<f64>(6)?,
                buckets: r
                    .get::<Vec<Option<f64>>>(7)?
                    .unwrap_or_default()
                    .into_iter()
                    .flatten()
                    .collect(),
                bucket_counts: r
                    .get::<Vec<Option<i64>>>(8)?
                    .unwrap_or_default()
                    .into_iter()
                    .map(|x| x.unwrap_or(0))
                    .collect(),
                obs_count: r.get::<i64>(9)?.unwrap_or(0),
                obs_sum: r.get::<f64>(10)?.unwrap_or(0.0),
            });
        }
        Ok::<_, pgrx::spi::Error>(out)
    })
    .unwrap_or_else(|e| pgrx::error!("fraiseql_obs: could not read metric series: {e}"));
    exposition(rows)
}

/// This backend's counter stripe (metric series): its backend slot, unique
/// among live sessions, so concurrent updates of one hot series never share a row.
#[pg_extern(volatile, parallel_safe)]
fn _fraiseql_stripe() -> i32 {
    unsafe { pg_sys::MyBackendId }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_escapes() {
        assert_eq!(
            sanitize_name("graphql.requests.total"),
            "graphql_requests_total"
        );
        assert_eq!(sanitize_name("9lives"), "_9lives");
        assert_eq!(sanitize_label("__x"), "_x");
        assert_eq!(sanitize_label("a-b"), "a_b");
        assert_eq!(escape_label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn checks() {
        assert!(check("x", "counter", f64::NAN, None).is_err());
        assert!(check("x", "counter", -1.0, None).is_err());
        assert!(check("x", "gauge", -1.0, None).is_ok());
        assert!(check("x", "gauge", 1.0, Some(&serde_json::json!({"a": {"b": 1}}))).is_err());
        assert!(check("x", "gauge", 1.0, Some(&serde_json::json!([1]))).is_err());
        let l = check(
            "x",
            "gauge",
            1.0,
            Some(&serde_json::json!({"code": 200, "ok": true})),
        )
        .unwrap();
        assert_eq!(l["code"], "200");
    }

    #[test]
    fn histogram_exposition() {
        let s = Series {
            name: "req.duration_ms".into(),
            kind: "histogram".into(),
            labels: serde_json::from_str(r#"{"op": "get"}"#).unwrap(),
            environment: "production".into(),
            help: None,
            value: None,
            buckets: vec![10.0, 100.0],
            bucket_counts: vec![2, 1],
            obs_count: 4,
            obs_sum: 555.5,
        };
        let text = exposition(vec![s]);
        assert!(text.contains("# TYPE req_duration_ms histogram"));
        assert!(text
            .contains("req_duration_ms_bucket{environment=\"production\",op=\"get\",le=\"10\"} 2"));
        assert!(text.contains("le=\"100\"} 3"));
        assert!(text.contains("le=\"+Inf\"} 4"));
        assert!(text.contains("req_duration_ms_sum{environment=\"production\",op=\"get\"} 555.5"));
    }
}
