//! Notification delivery, run by the database worker (or, without it, by
//! `CALL fraiseql_deliver_notifications()`).
//!
//! Capture queues notifications in its own transaction (sql/notification_rules.sql)
//! and wakes the worker at commit. The worker claims due deliveries in one short
//! transaction (a lease, so a crash mid-delivery re-delivers with the same
//! delivery id), sends them with no transaction open (SMTP and HTTP are
//! blocking with bounded timeouts; SIGTERM is checked between items), then
//! records every attempt and schedules retries in another short transaction.
pub mod custom;
pub mod email;
pub mod slack;
pub mod webhook;

use crate::guc;
use crate::shmem;
use pgrx::prelude::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// One claimed delivery.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub delivery_id: String,
    pub config_id: String,
    pub error_id: String,
    pub attempt: i64,
    pub reason: String,
    pub payload: Value,
    pub channel_type: String,
    pub config: Value,
    pub template: Option<String>,
    pub handler: Option<String>,
    pub rule_exists: bool,
}

/// What happened to one attempt.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub ok: bool,
    /// no point retrying (bad configuration, host not allowed, rule deleted)
    pub permanent: bool,
    pub error: Option<String>,
    pub response_code: Option<String>,
    pub recipient: Option<String>,
}

impl Outcome {
    pub fn sent(code: impl Into<String>, recipient: Option<String>) -> Self {
        Outcome {
            ok: true,
            response_code: Some(code.into()),
            recipient,
            ..Default::default()
        }
    }
    pub fn failed(error: impl Into<String>, permanent: bool) -> Self {
        Outcome {
            ok: false,
            permanent,
            error: Some(error.into()),
            ..Default::default()
        }
    }
}

/// The settings a delivery needs, read on the main thread (the network
/// channels run on threads of their own, which never call into PostgreSQL).
#[derive(Clone)]
pub struct Limits {
    pub connect: Duration,
    pub total: Duration,
    pub allowed_hosts: String,
    pub allowed_email_domains: String,
    pub tls_ca_directory: Option<String>,
}

impl Limits {
    pub fn from_settings() -> Self {
        Limits {
            connect: Duration::from_millis(guc::NOTIFY_CONNECT_TIMEOUT_MS.get().max(1) as u64),
            total: Duration::from_millis(guc::NOTIFY_TIMEOUT_MS.get().max(1) as u64),
            allowed_hosts: allowed_hosts(),
            allowed_email_domains: guc::text(&guc::NOTIFY_ALLOWED_EMAIL_DOMAINS).unwrap_or_else(|| "*".into()),
            tls_ca_directory: guc::text(&guc::TLS_CA_DIRECTORY),
        }
    }

    /// A network delivery's deadline, end to end (name lookup, connection,
    /// TLS, every SMTP command): past it the delivery is a failed attempt,
    /// whatever its thread is still waiting for.
    fn deadline(&self) -> Duration {
        self.connect + self.total + Duration::from_millis(500)
    }
}

/// How a value is written into a template.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Escape {
    /// as is (e-mail text, subjects: plain text)
    Plain,
    /// inside a JSON string: quotes, backslashes and control characters
    /// escaped, so a value can never end the string or add a key
    Json,
    /// Slack mrkdwn: `&`, `<`, `>` as Slack documents, so a value can neither
    /// mention (`<!channel>`) nor hide a link (`<http://x|text>`)
    Slack,
}

pub fn escape_json_str(v: &str) -> String {
    let quoted = serde_json::to_string(v).unwrap_or_default();
    quoted[1..quoted.len() - 1].to_string()
}

pub fn escape_slack(v: &str) -> String {
    v.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// {error_type}, {error_message}, ... replaced by the error's fields, in one
/// pass over the template: a placeholder inside a substituted value is text,
/// never expanded again.
pub fn render(template: &str, payload: &Value, escape: Escape) -> String {
    const FIELDS: [&str; 11] = [
        "error_type",
        "error_message",
        "environment",
        "severity",
        "occurrence_count",
        "first_seen",
        "last_seen",
        "error_id",
        "error_fingerprint",
        "release_version",
        "stack_trace",
    ];
    let mut out = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let field = after
            .find('}')
            .map(|close| &after[..close])
            .filter(|f| FIELDS.contains(f));
        match field {
            Some(f) => {
                let v = match payload.get(f) {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Null) | None => String::new(),
                    Some(other) => other.to_string(),
                };
                out.push_str(&match escape {
                    Escape::Plain => v,
                    Escape::Json => escape_json_str(&v),
                    Escape::Slack => escape_slack(&v),
                });
                rest = &after[f.len() + 1..];
            }
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

pub mod destination;

pub fn allowed_hosts() -> String {
    guc::text(&guc::NOTIFY_ALLOWED_HOSTS).unwrap_or_else(|| "*".into())
}

/// Host of an http(s) URL.
pub fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit('@').next()?;
    let host = if authority.starts_with('[') {
        authority.split(']').next()?.trim_start_matches('[')
    } else {
        authority.split(':').next()?
    };
    (!host.is_empty()).then_some(host)
}

/// An error text with any URL reduced to scheme and host: webhook URLs carry
/// secrets in their path (Slack's do) and must not reach the log.
pub fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("http") {
        let (before, from) = rest.split_at(i);
        out.push_str(before);
        if from.starts_with("http://") || from.starts_with("https://") {
            let end = from
                .find(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == ')')
                .unwrap_or(from.len());
            let url = &from[..end];
            let scheme = url.split("://").next().unwrap_or("http");
            out.push_str(&format!("{scheme}://{}/…", url_host(url).unwrap_or("?")));
            rest = &from[end..];
        } else {
            out.push_str("http");
            rest = &from[4..];
        }
    }
    out.push_str(rest);
    out
}

fn parse(items: &Value) -> Vec<Delivery> {
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    items
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| Delivery {
                    delivery_id: s(i, "delivery_id").unwrap_or_default(),
                    config_id: s(i, "config_id").unwrap_or_default(),
                    error_id: s(i, "error_id").unwrap_or_default(),
                    attempt: i.get("attempt").and_then(Value::as_i64).unwrap_or(1),
                    reason: s(i, "reason").unwrap_or_default(),
                    payload: i.get("payload").cloned().unwrap_or(Value::Null),
                    channel_type: s(i, "channel_type").unwrap_or_default(),
                    config: i.get("config").cloned().unwrap_or(json!({})),
                    template: s(i, "template"),
                    handler: s(i, "handler"),
                    rule_exists: i
                        .get("rule_exists")
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Where a delivery runs, and so how the steps that need the database are
/// isolated from one another.
#[derive(Clone, Copy, PartialEq)]
pub enum Runner {
    /// the worker: no transaction is open while sending; pg_notify and a
    /// custom handler each get a transaction of their own
    Worker,
    /// a session (`CALL fraiseql_deliver_notifications()`, without the
    /// worker): inside the procedure's transaction, which holds nothing
    /// while sending (the claim was committed); pg_notify and a custom
    /// handler each in a subtransaction
    Session,
}

impl Runner {
    fn isolated<R>(
        self,
        f: impl FnOnce() -> R + std::panic::UnwindSafe + std::panic::RefUnwindSafe,
    ) -> Result<R, String> {
        match self {
            Runner::Worker => crate::worker::in_transaction(f),
            Runner::Session => crate::worker::in_subtransaction(f),
        }
    }
}

/// Whether a channel goes over the network (and so runs on a thread).
fn is_network(d: &Delivery) -> bool {
    d.rule_exists && matches!(d.channel_type.as_str(), "webhook" | "slack" | "email")
}

/// Where a network delivery goes: the bound on concurrent deliveries is
/// per destination.
fn destination(d: &Delivery) -> String {
    let s = |k: &str| d.config.get(k).and_then(Value::as_str).unwrap_or("");
    // host and port: two services on one host are two destinations
    let authority = |url: &str| {
        let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
        let a = rest.split(['/', '?', '#']).next().unwrap_or("");
        a.rsplit('@').next().unwrap_or("").to_ascii_lowercase()
    };
    match d.channel_type.as_str() {
        "webhook" => authority(s("url")),
        "slack" => authority(s("webhook_url")),
        _ => format!(
            "{}:{}",
            s("smtp_host").to_ascii_lowercase(),
            d.config
                .get("smtp_port")
                .map(Value::to_string)
                .unwrap_or_default()
        ),
    }
}

/// A network delivery, on its thread: no PostgreSQL call in here.
fn send_network(d: &Delivery, limits: &Limits) -> Outcome {
    match d.channel_type.as_str() {
        "webhook" => webhook::send(d, limits),
        "slack" => slack::send(d, limits),
        _ => email::send(d, limits),
    }
}

/// A pg_notify delivery's channel and payload.
fn notify_args(d: &Delivery) -> (String, String) {
    let channel = d
        .config
        .get("channel")
        .and_then(Value::as_str)
        .unwrap_or("fraiseql_obs_errors")
        .to_string();
    let mut payload = d.payload.clone();
    // NOTIFY payloads are limited to 8000 bytes
    if payload.to_string().len() > 7000 {
        payload["stack_trace"] = Value::String("[truncated: see tb_error_log]".into());
        payload["context"] = Value::Null;
    }
    (channel, payload.to_string())
}

fn notify(channel: &str, text: &str) -> Result<(), String> {
    Spi::run_with_args(
        "SELECT pg_catalog.pg_notify($1, $2)",
        &[channel.into(), text.into()],
    )
    .map_err(|e| e.to_string())
}

/// The pg_notify deliveries of a worker's batch, in one transaction, each
/// in a subtransaction of its own (one that fails, a channel name too long,
/// takes no other with it), committed without waiting for the WAL flush: a
/// transaction and an fsync per notification made a storm of new errors
/// cost the worker a millisecond each. (What was sent is recorded by the
/// record step, which is durable; a notification whose commit a crash
/// loses is sent again, at least once as always.)
fn notify_in_one_transaction(items: &[&Delivery]) -> Vec<Outcome> {
    let args: Vec<(String, String)> = items.iter().map(|d| notify_args(d)).collect();
    let n = args.len();
    let done = crate::worker::in_transaction(move || {
        Spi::run("SET LOCAL synchronous_commit = off").map_err(|e| e.to_string())?;
        let mut out = Vec::with_capacity(args.len());
        for (channel, text) in &args {
            pg_sys::check_for_interrupts!();
            out.push(match crate::worker::in_subtransaction(|| notify(channel, text)) {
                Ok(Ok(())) => Ok(channel.clone()),
                Ok(Err(e)) | Err(e) => Err(e),
            });
        }
        Ok::<_, String>(out)
    });
    match done {
        Ok(Ok(v)) => v
            .into_iter()
            .map(|r| match r {
                Ok(channel) => Outcome::sent("notified", Some(channel)),
                Err(e) => Outcome::failed(e, false),
            })
            .collect(),
        Ok(Err(e)) | Err(e) => (0..n).map(|_| Outcome::failed(e.clone(), false)).collect(),
    }
}

/// Sends a delivery that needs the database (pg_notify, custom channels),
/// on the main thread.
fn send_local(d: &Delivery, runner: Runner) -> Outcome {
    if !d.rule_exists {
        return Outcome::failed("the rule was deleted or disabled before delivery", true);
    }
    match d.channel_type.as_str() {
        "pg_notify" => {
            let (channel, text) = notify_args(d);
            let c = channel.clone();
            match runner.isolated(move || notify(&c, &text)) {
                Ok(Ok(())) => Outcome::sent("notified", Some(channel)),
                Ok(Err(e)) | Err(e) => Outcome::failed(e, false),
            }
        }
        _ => {
            let Some(handler) = d.handler.clone() else {
                return Outcome::failed(
                    format!("channel type \"{}\" is not registered", d.channel_type),
                    true,
                );
            };
            let (payload, config) = (d.payload.clone(), d.config.clone());
            match runner.isolated(move || custom::call(&handler, &payload, &config)) {
                Ok(Ok((true, _))) => Outcome::sent("ok", None),
                Ok(Ok((false, e))) => Outcome::failed(
                    e.unwrap_or_else(|| "handler reported failure".into()),
                    false,
                ),
                Ok(Err(e)) | Err(e) => Outcome::failed(format!("handler raised: {e}"), false),
            }
        }
    }
}

/// Threads sending to one destination at once, counting those whose
/// delivery went past its deadline and whose peer still holds them: a hung
/// destination never has more than this many.
const PER_DESTINATION: usize = 2;
/// Sending threads in this process, at most.
const IN_FLIGHT: usize = 16;

static LIVE: std::sync::Mutex<Vec<(String, usize)>> = std::sync::Mutex::new(Vec::new());

fn live_count(dest: &str) -> (usize, usize) {
    let live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    let here = live
        .iter()
        .find(|(d, _)| d == dest)
        .map(|(_, n)| *n)
        .unwrap_or(0);
    (here, live.iter().map(|(_, n)| n).sum())
}

fn live_add(dest: &str, delta: isize) {
    let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    match live.iter_mut().find(|(d, _)| d == dest) {
        Some(e) => e.1 = (e.1 as isize + delta).max(0) as usize,
        None if delta > 0 => live.push((dest.to_string(), delta as usize)),
        None => {}
    }
    live.retain(|(_, n)| *n > 0);
}

/// The statement that claims what is due, with the settings in force. A
/// claimed delivery not recorded within its lease (the worker died in
/// flight) is delivered again, with the same delivery id. The lease covers
/// a batch's worst case (one deadline for the batch, one for a delivery
/// started at its end, a custom handler's hard deadline).
fn claim_sql(schema: &str) -> String {
    let limits = Limits::from_settings();
    let batch = guc::NOTIFY_BATCH_SIZE.get().max(1);
    let lease_s = (limits.deadline().as_secs() * 2 + limits.total.as_secs() * 2 + 5).max(10);
    let max_attempts = guc::NOTIFY_MAX_ATTEMPTS.get().max(1);
    format!("SELECT {schema}._fraiseql_claim_deliveries({batch}, interval '{lease_s} seconds', {max_attempts})::text")
}

/// The statement that records outcomes ($1: their JSON array).
fn record_sql(schema: &str) -> String {
    let max_attempts = guc::NOTIFY_MAX_ATTEMPTS.get().max(1);
    let retry_ms = guc::NOTIFY_RETRY_INTERVAL_MS.get().max(1);
    format!("SELECT {schema}._fraiseql_record_deliveries($1::jsonb, {max_attempts}, interval '{retry_ms} milliseconds')::text")
}

/// Destinations that just failed (timed out, refused, 5xx), and until when
/// their deliveries wait: a hung destination is not tried again in every
/// batch (its own deliveries back off anyway), so it cannot hold every batch
/// for a deadline. A second, doubling with each failure in a row, up to a
/// minute; a success forgets it. Touched by the main thread only.
static COOLING: std::sync::Mutex<Vec<(String, Instant, u32)>> = std::sync::Mutex::new(Vec::new());

fn cooling(dest: &str) -> bool {
    let now = Instant::now();
    COOLING
        .lock()
        .map(|c| c.iter().any(|(d, until, _)| d == dest && *until > now))
        .unwrap_or(false)
}

fn cool(dest: &str, failed: bool) {
    let Ok(mut c) = COOLING.lock() else { return };
    let pos = c.iter().position(|(d, _, _)| d == dest);
    match (pos, failed) {
        (Some(i), false) => {
            c.swap_remove(i);
        }
        (None, false) => {}
        (pos, true) => {
            let n = pos.map(|i| c[i].2 + 1).unwrap_or(1).min(16);
            // from a second, so that a destination that hangs holds at most
            // one batch in a few
            let base = (guc::NOTIFY_RETRY_INTERVAL_MS.get().max(1) as u64).max(1000);
            let wait = Duration::from_millis(base.saturating_mul(1 << (n - 1)))
                .min(Duration::from_secs(60));
            match pos {
                Some(i) => c[i] = (dest.to_string(), Instant::now() + wait, n),
                None => c.push((dest.to_string(), Instant::now() + wait, n)),
            }
        }
    }
}

/// What a sending thread tells the main thread.
enum Event {
    Started(usize, Instant),
    Done(usize, Outcome, Duration),
}

/// Sends claimed deliveries; the outcomes, to record.
///
/// Network deliveries go out on threads: per destination (host and port) at
/// most PER_DESTINATION threads, each taking that destination's deliveries
/// one after another, so destinations never wait for one another. Every
/// delivery has a deadline end to end. A destination that times out or
/// refuses is not tried again in this batch, and after one deadline the
/// batch takes no new delivery: what was not started goes back to the
/// queue unattempted ("deferred"), so a hung destination delays the rest of
/// the worker by one deadline at most. Meanwhile pg_notify and custom
/// handlers run here, on the main thread, which checks for SIGTERM while it
/// waits (the process ends, its threads with it, and what was not recorded
/// is delivered again after its lease).
fn send_all(items: &[Delivery], runner: Runner) -> Value {
    use std::collections::{HashMap, VecDeque};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc, Mutex};

    let limits = Limits::from_settings();
    let batch_started = Instant::now();
    let (tx, rx) = mpsc::channel::<Event>();
    let closed = Arc::new(AtomicBool::new(false));
    let mut results: Vec<Option<Value>> = vec![None; items.len()];
    let shared: Arc<Vec<Delivery>> = Arc::new(items.to_vec());
    let record = |d: &Delivery, mut out: Outcome, took: Duration| {
        if let Some(e) = out.error.take() {
            out.error = Some(redact_urls(&e));
        }
        json!({
            "delivery_id": d.delivery_id, "config_id": d.config_id, "error_id": d.error_id,
            "channel_type": d.channel_type, "attempt": d.attempt, "ok": out.ok, "permanent": out.permanent,
            "error": out.error, "response_code": out.response_code, "recipient": out.recipient,
            "duration_ms": took.as_millis() as i64,
        })
    };
    // `later`: its destination is busy or failing, so not at once again
    let deferred = |d: &Delivery, later: bool| json!({"delivery_id": d.delivery_id, "deferred": true, "later": later});

    let mut by_destination: HashMap<String, VecDeque<usize>> = HashMap::new();
    let mut failed_destinations: Vec<(String, Arc<AtomicBool>)> = Vec::new();
    for (i, d) in items.iter().enumerate().filter(|(_, d)| is_network(d)) {
        by_destination
            .entry(destination(d))
            .or_default()
            .push_back(i);
    }
    for (dest, queue) in by_destination {
        if cooling(&dest) {
            for i in queue {
                results[i] = Some(deferred(&items[i], true));
            }
            continue;
        }
        let (here, all) = live_count(&dest);
        let threads = PER_DESTINATION
            .saturating_sub(here)
            .min(IN_FLIGHT.saturating_sub(all))
            .min(queue.len());
        if threads == 0 {
            for i in queue {
                results[i] = Some(deferred(&items[i], true));
            }
            continue;
        }
        let queue = Arc::new(Mutex::new(queue));
        let failed = Arc::new(AtomicBool::new(false));
        failed_destinations.push((dest.clone(), failed.clone()));
        for _ in 0..threads {
            live_add(&dest, 1);
            let (queue, failed, closed, tx) =
                (queue.clone(), failed.clone(), closed.clone(), tx.clone());
            let (mine, limits, dest2) = (shared.clone(), limits.clone(), dest.clone());
            let spawned = std::thread::Builder::new()
                .name("fraiseql_obs delivery".into())
                .spawn(move || {
                    loop {
                        if failed.load(Ordering::Relaxed) || closed.load(Ordering::Relaxed) {
                            break;
                        }
                        let Some(i) = queue.lock().ok().and_then(|mut q| q.pop_front()) else {
                            break;
                        };
                        let started = Instant::now();
                        let _ = tx.send(Event::Started(i, started));
                        let out = send_network(&mine[i], &limits);
                        if !out.ok && !out.permanent {
                            // timed out, refused, 5xx: not again in this batch
                            failed.store(true, Ordering::Relaxed);
                        }
                        let _ = tx.send(Event::Done(i, out, started.elapsed()));
                    }
                    live_add(&dest2, -1);
                });
            if spawned.is_err() {
                live_add(&dest, -1);
            }
        }
    }
    drop(tx);
    let batched_notify = |d: &Delivery| runner == Runner::Worker && d.rule_exists && d.channel_type == "pg_notify";
    let notify_items: Vec<usize> = (0..items.len()).filter(|&i| batched_notify(&items[i])).collect();
    if !notify_items.is_empty() {
        let started = Instant::now();
        let outs = notify_in_one_transaction(&notify_items.iter().map(|&i| &items[i]).collect::<Vec<_>>());
        let took = started.elapsed();
        for (&i, out) in notify_items.iter().zip(outs) {
            results[i] = Some(record(&items[i], out, took));
        }
    }
    for (i, d) in items.iter().enumerate().filter(|(_, d)| !is_network(d) && !batched_notify(d)) {
        pg_sys::check_for_interrupts!();
        let started = Instant::now();
        results[i] = Some(record(d, send_local(d, runner), started.elapsed()));
    }
    // wait for the threads: each started delivery until its own deadline;
    // none started after one deadline from the batch's start
    let mut in_flight: HashMap<usize, Instant> = HashMap::new();
    loop {
        pg_sys::check_for_interrupts!();
        if batch_started.elapsed() >= limits.deadline() {
            closed.store(true, Ordering::Relaxed);
        }
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(Event::Started(i, at)) => {
                in_flight.insert(i, at + limits.deadline());
            }
            Ok(Event::Done(i, out, took)) => {
                if in_flight.remove(&i).is_some() && results[i].is_none() {
                    if !out.permanent {
                        cool(&destination(&items[i]), !out.ok);
                    }
                    results[i] = Some(record(&items[i], out, took));
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // every thread has finished or given up
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        let now = Instant::now();
        in_flight.retain(|i, deadline| {
            if now < *deadline {
                return true;
            }
            let took = limits.deadline();
            let msg = format!(
                "no answer within the delivery deadline ({} ms)",
                took.as_millis()
            );
            cool(&destination(&items[*i]), true);
            results[*i] = Some(record(&items[*i], Outcome::failed(msg, false), took));
            false
        });
        // past the batch's deadline with nothing in flight: the threads left
        // are waiting on peers past their own deadlines
        if closed.load(Ordering::Relaxed) && in_flight.is_empty() {
            break;
        }
    }
    closed.store(true, Ordering::Relaxed);
    // what no thread started goes back to the queue: at once if the batch
    // merely ran out of time, a little later if its destination failed
    let failing: Vec<String> = failed_destinations
        .iter()
        .filter(|(_, f)| f.load(Ordering::Relaxed))
        .map(|(d, _)| d.clone())
        .collect();
    for (i, d) in items.iter().enumerate() {
        if results[i].is_none() {
            results[i] = Some(deferred(d, failing.contains(&destination(d))));
        }
    }
    Value::Array(results.into_iter().flatten().collect())
}

/// One delivery round of the worker: claim, send, record, each step in its
/// own transaction (`txn` runs a query returning one text value in one).
/// Returns how many were attempted.
pub fn deliver_due(
    schema: &str,
    txn: &dyn Fn(&str, Vec<Value>) -> Result<Option<String>, String>,
) -> Result<usize, String> {
    let claimed = txn(&claim_sql(schema), vec![])?.unwrap_or_else(|| "[]".into());
    let items = parse(&serde_json::from_str(&claimed).unwrap_or(json!([])));
    if items.is_empty() {
        return Ok(0);
    }
    let results = send_all(&items, Runner::Worker);
    txn(
        &record_sql(schema),
        vec![Value::String(results.to_string())],
    )?;
    Ok(items.len())
}

/// For `fraiseql_deliver_notifications()`: claims what is due, in the
/// caller's transaction (the procedure commits it before sending).
#[pg_extern(volatile, parallel_unsafe)]
fn _fraiseql_claim_due() -> pgrx::JsonB {
    let sql = claim_sql(&crate::extension::schema());
    let claimed = crate::sql::one::<String>(&sql, &[])
        .unwrap_or_else(|e| error!("fraiseql_obs: claiming deliveries failed: {e}"))
        .unwrap_or_else(|| "[]".into());
    pgrx::JsonB(serde_json::from_str(&claimed).unwrap_or(json!([])))
}

/// Sends what `_fraiseql_claim_due()` claimed; returns the outcomes.
#[pg_extern(volatile, parallel_unsafe)]
fn _fraiseql_send_deliveries(claimed: pgrx::JsonB) -> pgrx::JsonB {
    pgrx::JsonB(send_all(&parse(&claimed.0), Runner::Session))
}

/// Records the outcomes `_fraiseql_send_deliveries()` returned.
#[pg_extern(volatile, parallel_unsafe)]
fn _fraiseql_record_due(results: pgrx::JsonB) {
    let sql = record_sql(&crate::extension::schema());
    crate::sql::one::<String>(&sql, &[results.0.to_string().into()])
        .unwrap_or_else(|e| error!("fraiseql_obs: recording deliveries failed: {e}"));
}

/// Wakes this database's worker when the current transaction commits.
#[pg_extern(volatile, parallel_unsafe)]
fn _fraiseql_wake_worker() -> bool {
    shmem::wake_at_commit(shmem::WakeAtCommit::Worker)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates() {
        let p = json!({"error_type": "ValueError", "occurrence_count": 5, "environment": "production", "release_version": null});
        assert_eq!(
            render(
                "{error_type} x{occurrence_count} in {environment}{release_version} {unknown}",
                &p,
                Escape::Plain
            ),
            "ValueError x5 in production {unknown}"
        );
    }

    #[test]
    fn templates_escape_and_never_expand_twice() {
        let p = json!({"error_message": "x\", \"injected\": \"yes", "error_type": "{error_message}<!channel>"});
        let body = render("{\"text\": \"{error_message}\"}", &p, Escape::Json);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v.as_object().unwrap().len(), 1, "{body}");
        assert_eq!(v["text"], "x\", \"injected\": \"yes");
        assert_eq!(
            render("{error_type}", &p, Escape::Slack),
            "{error_message}&lt;!channel&gt;"
        );
        assert_eq!(
            render("{error_type}", &p, Escape::Plain),
            "{error_message}<!channel>"
        );
    }

    #[test]
    fn urls() {
        assert_eq!(
            url_host("https://hooks.slack.com/services/T/B/secret"),
            Some("hooks.slack.com")
        );
        assert_eq!(
            url_host("http://user:pw@127.0.0.1:8080/x"),
            Some("127.0.0.1")
        );
        assert_eq!(url_host("http://[::1]:80/"), Some("::1"));
        let r = redact_urls(
            "POST https://hooks.slack.com/services/T/B/secret failed: http://x/y?token=1",
        );
        assert!(!r.contains("secret") && !r.contains("token"), "{r}");
        assert!(r.contains("hooks.slack.com"));
    }
}
