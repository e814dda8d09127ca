//! E-mail over SMTP: STARTTLS, implicit TLS or plain (local relays), with
//! login; multipart text and HTML (severity colour, details, stack trace
//! preview); subject and body templates.
//!
//! Settings (rule channel_config over the channel's defaults):
//! smtp_host, smtp_port, smtp_user, smtp_password, tls ("starttls" |
//! "tls" | "none"; or the seed's use_tls: true = starttls), tls_ca_pem (a PEM
//! CA to trust besides the system's, for relays with a private CA, given
//! inline, at most 64 KiB) or tls_ca_file (the name of a file in the directory
//! that the superuser setting fraiseql_obs.tls_ca_directory names; no path),
//! allow_plaintext_login (a login over tls "none" is refused without it),
//! from_address (or from), to (a list or one address), subject, template.
use super::destination::AllowList;
use super::{render, Delivery, Escape, Limits, Outcome};
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
    let subject: String = render(subject_t, p, Escape::Plain)
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
        Some(t) => render(t, p, Escape::Plain),
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

/// Inline PEMs and CA files are capped: a CA bundle is a few KiB.
pub const MAX_CA_BYTES: usize = 64 * 1024;

/// The extra CA a rule trusts: inline PEM, or a file name within the
/// directory the superuser named (fraiseql_obs.tls_ca_directory). Nothing
/// else on the server's file system is read; the error never says whether a
/// file exists.
fn extra_ca(c: &Value, limits: &Limits) -> Result<Option<Certificate>, String> {
    let pem: Vec<u8> = if let Some(pem) = s(c, "tls_ca_pem") {
        if pem.len() > MAX_CA_BYTES {
            return Err(format!("tls_ca_pem is larger than {MAX_CA_BYTES} bytes"));
        }
        pem.as_bytes().to_vec()
    } else if let Some(name) = s(c, "tls_ca_file") {
        read_ca_file(name, limits.tls_ca_directory.as_deref())?
    } else {
        return Ok(None);
    };
    Certificate::from_pem(&pem)
        .map(Some)
        .map_err(|e| format!("the CA certificate is not valid PEM: {e}"))
}

fn read_ca_file(name: &str, dir: Option<&str>) -> Result<Vec<u8>, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let unusable = || {
        format!("tls_ca_file \"{name}\" is not usable (a file name within fraiseql_obs.tls_ca_directory)")
    };
    let Some(dir) = dir else {
        return Err("tls_ca_file needs the setting fraiseql_obs.tls_ca_directory (set by a superuser); or give tls_ca_pem inline".into());
    };
    if name.is_empty() || name.contains('/') || name.starts_with('.') || name.contains('\0') {
        return Err(unusable());
    }
    let path = std::path::Path::new(&dir).join(name);
    // O_NONBLOCK: a FIFO does not hang the open; O_NOFOLLOW: no link out
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|_| unusable())?;
    match file.metadata() {
        Ok(m) if m.is_file() && m.len() as usize <= MAX_CA_BYTES => {}
        _ => return Err(unusable()),
    }
    let mut buf = Vec::new();
    file.take(MAX_CA_BYTES as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|_| unusable())?;
    if buf.len() > MAX_CA_BYTES {
        return Err(unusable());
    }
    Ok(buf)
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

/// Whether an address's domain is in the allow-list (`*`: any; a domain;
/// `*.example.com`: its subdomains and itself), compared without case. With
/// a list of domains, an address without a domain is not.
pub fn domain_allowed(address: &str, list: &str) -> bool {
    if list.split(',').any(|e| e.trim() == "*") {
        return true;
    }
    // (the address itself, in "Name <a@b>" form too)
    let addr = address.rsplit_once('<').map_or(address, |(_, a)| a.trim_end_matches('>')).trim();
    let Some((_, domain)) = addr.rsplit_once('@') else {
        return false;
    };
    let domain = domain.trim().trim_end_matches('.').to_ascii_lowercase();
    if domain.is_empty() {
        return false;
    }
    list.split(',').map(|e| e.trim().to_ascii_lowercase()).any(|e| {
        e == "*"
            || e == domain
            || e.strip_prefix("*.").is_some_and(|base| {
                domain == base || domain.ends_with(&format!(".{base}"))
            })
    })
}

pub fn send(d: &Delivery, limits: &Limits) -> Outcome {
    let c = &d.config;
    let to = recipients(c);
    if to.is_empty() {
        return Outcome::failed("no recipients (\"to\")", true);
    }
    if let Some(bad) = to.iter().find(|a| !domain_allowed(a, &limits.allowed_email_domains)) {
        return Outcome::failed(
            format!("recipient {bad} is not in a domain fraiseql_obs.notification_allowed_email_domains allows"),
            true,
        );
    }
    let Some(host) = s(c, "smtp_host") else {
        return Outcome::failed(
            "no smtp_host in the rule or the email channel's defaults",
            true,
        );
    };
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
        .unwrap_or(if tls_mode == "tls" { 465 } else { 587 });
    let Ok(port) = u16::try_from(port) else {
        return Outcome::failed(format!("smtp_port {port} is not a port"), true);
    };
    let login = match (s(c, "smtp_user"), s(c, "smtp_password")) {
        (Some(u), Some(pw)) => Some(Credentials::new(u.to_string(), pw.to_string())),
        _ => None,
    };
    if login.is_some()
        && tls_mode == "none"
        && c.get("allow_plaintext_login").and_then(Value::as_bool) != Some(true)
    {
        return Outcome::failed(
            "refusing to send the SMTP password over an unencrypted connection (tls \"none\"); use starttls or tls, or set allow_plaintext_login",
            true,
        );
    }
    // the connection goes to the checked address; TLS verifies the name
    let addr = match AllowList::parse(&limits.allowed_hosts).resolve(host, port) {
        Ok(a) => a,
        Err(e) => return Outcome::failed(e, true),
    };
    let tls = match tls_mode.as_str() {
        "none" => Tls::None,
        mode => {
            let mut params = TlsParameters::builder(host.to_string());
            match extra_ca(c, limits) {
                Ok(Some(cert)) => params = params.add_root_certificate(cert),
                Ok(None) => {}
                Err(e) => return Outcome::failed(e, true),
            }
            match params.build_rustls() {
                Ok(p) if mode == "tls" => Tls::Wrapper(p),
                Ok(p) => Tls::Required(p),
                Err(e) => return Outcome::failed(format!("TLS setup: {e}"), true),
            }
        }
    };
    let mut builder = SmtpTransport::builder_dangerous(addr.ip().to_string())
        .port(port)
        .tls(tls)
        .timeout(Some(limits.total));
    if let Some(login) = login {
        builder = builder.credentials(login);
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

#[cfg(test)]
mod unit {
    use super::domain_allowed;

    #[test]
    fn recipient_domains() {
        assert!(domain_allowed("a@evil.test", "*"));
        assert!(domain_allowed("Team <team@MyApp.com>", "myapp.com"));
        assert!(domain_allowed("x@ops.myapp.com", "other.org, *.myapp.com"));
        assert!(domain_allowed("x@myapp.com", "*.myapp.com"));
        assert!(!domain_allowed("x@evilmyapp.com", "*.myapp.com"));
        assert!(!domain_allowed("x@myapp.com.evil.test", "myapp.com"));
        assert!(domain_allowed("no-domain", "*"));
        assert!(!domain_allowed("no-domain", "myapp.com"));
        assert!(!domain_allowed("a@evil.test", "myapp.com"));
        assert!(!domain_allowed("a@", "myapp.com"));
    }
}
