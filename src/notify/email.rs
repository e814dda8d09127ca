//! E-mail over SMTP: STARTTLS, implicit TLS or plain (local relays), with
//! login; multipart text and HTML (severity colour, details, stack trace
//! preview); subject and body templates.
//!
//! Settings (rule channel_config over the channel's defaults):
//! smtp_host, smtp_port, smtp_user, smtp_password, tls ("starttls" |
//! "tls" | "none"; or the seed's use_tls: true = starttls), tls_ca_file (a PEM
//! CA to trust besides the system's, for relays with a private CA),
//! from_address (or from), to (a list or one address), subject, template.
use super::{allowed_hosts, host_allowed, render, Delivery, Limits, Outcome};
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{Message, SmtpTransport, Transport};
use serde_json::Value;

const DEFAULT_SUBJECT: &str = "[{severity}] {error_type}: {error_message} ({environment})";

fn s<'a>(c: &'a Value, k: &str) -> Option<&'a str> {
    c.get(k).and_then(Value::as_str).filter(|v| !v.is_empty())
}

fn html_escape(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn colour(severity: &str) -> &'static str {
    match severity {
        "critical" => "#8b0000",
        "error" => "#d32f2f",
        "warning" => "#f9a825",
        _ => "#1976d2",
    }
}

fn field(p: &Value, k: &str) -> String {
    match p.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(v) => v.to_string(),
    }
}

/// (subject, text, html)
pub fn compose(d: &Delivery) -> (String, String, String) {
    let p = &d.payload;
    let subject_t = s(&d.config, "subject").unwrap_or(DEFAULT_SUBJECT);
    let subject: String = render(subject_t, p)
        .replace(['\r', '\n'], " ")
        .chars()
        .take(200)
        .collect();
    let stack: String = field(p, "stack_trace").chars().take(4000).collect();
    let details = [
        ("Error", field(p, "error_type")),
        ("Message", field(p, "error_message")),
        ("Environment", field(p, "environment")),
        ("Severity", field(p, "severity")),
        ("Occurrences", field(p, "occurrence_count")),
        ("First seen", field(p, "first_seen")),
        ("Last seen", field(p, "last_seen")),
        ("Release", field(p, "release_version")),
        ("Error ID", field(p, "error_id")),
        ("Fingerprint", field(p, "error_fingerprint")),
        ("Reason", d.reason.clone()),
    ];
    let body_t = s(&d.config, "template")
        .map(str::to_string)
        .or_else(|| d.template.clone());
    let text = match &body_t {
        Some(t) => render(t, p),
        None => {
            let mut t: String = details.iter().map(|(k, v)| format!("{k}: {v}\n")).collect();
            if !stack.is_empty() {
                t.push_str("\nStack trace:\n");
                t.push_str(&stack);
                t.push('\n');
            }
            t
        }
    };
    let rows: String = details
        .iter()
        .map(|(k, v)| {
            format!(
                "<tr><th align=\"left\" style=\"padding:2px 12px 2px 0\">{k}</th><td>{}</td></tr>",
                html_escape(v)
            )
        })
        .collect();
    let html = format!(
        "<!DOCTYPE html><html><body style=\"font-family:sans-serif\">\
         <div style=\"border-left:6px solid {c};padding:8px 16px\">\
         <h2 style=\"color:{c};margin:0 0 8px\">{title}</h2>\
         {intro}<table>{rows}</table>\
         {trace}</div></body></html>",
        c = colour(&field(p, "severity")),
        title = html_escape(
            &format!("{}: {}", field(p, "error_type"), field(p, "error_message"))
                .chars()
                .take(300)
                .collect::<String>()
        ),
        intro = body_t
            .map(|_| format!(
                "<p style=\"white-space:pre-wrap\">{}</p>",
                html_escape(&text)
            ))
            .unwrap_or_default(),
        trace = if stack.is_empty() {
            String::new()
        } else {
            format!("<h3>Stack trace</h3><pre style=\"background:#f5f5f5;padding:8px;overflow:auto\">{}</pre>", html_escape(&stack))
        },
    );
    (subject, text, html)
}

fn recipients(c: &Value) -> Vec<String> {
    match c.get("to") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        Some(Value::String(s)) => s
            .split(',')
            .map(|x| x.trim().to_string())
            .filter(|x| !x.is_empty())
            .collect(),
        _ => vec![],
    }
}

pub fn send(d: &Delivery, limits: &Limits) -> Outcome {
    let c = &d.config;
    let to = recipients(c);
    if to.is_empty() {
        return Outcome::failed("no recipients (\"to\")", true);
    }
    let Some(host) = s(c, "smtp_host") else {
        return Outcome::failed(
            "no smtp_host in the rule or the email channel's defaults",
            true,
        );
    };
    if !host_allowed(host, &allowed_hosts()) {
        return Outcome::failed(
            format!("host {host} is not in fraiseql_obs.notification_allowed_hosts"),
            true,
        );
    }
    let tls_mode = s(c, "tls").map(str::to_ascii_lowercase).unwrap_or_else(|| {
        match c.get("use_tls").and_then(Value::as_bool) {
            Some(true) => "starttls".into(),
            Some(false) => "none".into(),
            None => "starttls".into(),
        }
    });
    let port = c
        .get("smtp_port")
        .and_then(|v| {
            v.as_u64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        })
        .unwrap_or(if tls_mode == "tls" { 465 } else { 587 }) as u16;
    let tls = match tls_mode.as_str() {
        "none" => Tls::None,
        mode => {
            let mut params = TlsParameters::builder(host.to_string());
            if let Some(ca) = s(c, "tls_ca_file") {
                match std::fs::read(ca)
                    .map_err(|e| e.to_string())
                    .and_then(|pem| Certificate::from_pem(&pem).map_err(|e| e.to_string()))
                {
                    Ok(cert) => params = params.add_root_certificate(cert),
                    Err(e) => return Outcome::failed(format!("tls_ca_file {ca}: {e}"), true),
                }
            }
            match params.build_rustls() {
                Ok(p) if mode == "tls" => Tls::Wrapper(p),
                Ok(p) => Tls::Required(p),
                Err(e) => return Outcome::failed(format!("TLS setup: {e}"), true),
            }
        }
    };
    let mut builder = SmtpTransport::builder_dangerous(host)
        .port(port)
        .tls(tls)
        .timeout(Some(limits.total));
    if let (Some(u), Some(pw)) = (s(c, "smtp_user"), s(c, "smtp_password")) {
        builder = builder.credentials(Credentials::new(u.to_string(), pw.to_string()));
    }
    let mailer = builder.build();
    let from = s(c, "from_address")
        .or_else(|| s(c, "from"))
        .unwrap_or("fraiseql-obs@localhost");
    let (subject, text, html) = compose(d);
    let mut msg = Message::builder().subject(subject);
    msg = match from.parse::<Mailbox>() {
        Ok(m) => msg.from(m),
        Err(e) => return Outcome::failed(format!("bad from address {from}: {e}"), true),
    };
    for r in &to {
        msg = match r.parse::<Mailbox>() {
            Ok(m) => msg.to(m),
            Err(e) => return Outcome::failed(format!("bad recipient {r}: {e}"), true),
        };
    }
    let msg = match msg
        .message_id(Some(format!("<{}@fraiseql-obs>", d.delivery_id)))
        .multipart(MultiPart::alternative_plain_html(text, html))
    {
        Ok(m) => m,
        Err(e) => return Outcome::failed(format!("could not build the message: {e}"), true),
    };
    match mailer.send(&msg) {
        Ok(resp) => Outcome::sent(format!("SMTP {}", resp.code()), Some(to.join(", "))),
        Err(e) => {
            let permanent = e.is_permanent();
            let mut o = Outcome::failed(format!("SMTP {host}:{port}: {e}"), permanent);
            o.recipient = Some(to.join(", "));
            o
        }
    }
}
