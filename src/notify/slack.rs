//! Slack incoming webhooks, as Block Kit messages: a header with the error
//! type and a severity emoji, fields, a 500-character stack trace preview and
//! a footer with the error id and fingerprint.
use super::{escape_slack, render, webhook, Delivery, Escape, Limits, Outcome};
use serde_json::{json, Value};

fn emoji(severity: &str) -> &'static str {
    match severity {
        "critical" | "error" => "🔴",
        "warning" => "🟡",
        _ => "🔵",
    }
}

/// A payload field as Slack text: escaped, so that an exception message
/// cannot mention a channel or disguise a link.
fn text(p: &Value, k: &str) -> String {
    match p.get(k) {
        Some(Value::String(s)) => escape_slack(s),
        Some(Value::Null) | None => "—".into(),
        Some(v) => escape_slack(&v.to_string()),
    }
}

pub fn message(d: &Delivery) -> Value {
    let p = &d.payload;
    let severity = text(p, "severity");
    if d.reason == "digest" {
        let lines: Vec<String> = p
            .get("errors")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .take(30)
                    .map(|e| {
                        format!(
                            "• *{}* ×{} ({})",
                            text(e, "title"),
                            text(e, "occurrences_in_window"),
                            text(e, "environment")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        return json!({
            "text": format!("Digest: {}", text(p, "error_message")),
            "blocks": [
                {"type": "header", "text": {"type": "plain_text", "text": format!("🔵 Error digest: {} errors", text(p, "error_count"))}},
                {"type": "section", "text": {"type": "mrkdwn", "text": lines.join("\n")}},
            ]
        });
    }
    let stack: String = text(p, "stack_trace").chars().take(500).collect();
    let summary = match d
        .template
        .as_deref()
        .or_else(|| d.config.get("template").and_then(Value::as_str))
    {
        Some(t) => render(t, p, Escape::Slack),
        None => text(p, "error_message"),
    };
    let mut msg = json!({
        "text": format!("{} {}: {}", emoji(&severity), text(p, "error_type"), summary),
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": format!("{} {}", emoji(&severity), text(p, "error_type")).chars().take(150).collect::<String>()}},
            {"type": "section", "text": {"type": "mrkdwn", "text": summary.chars().take(2900).collect::<String>()}},
            {"type": "section", "fields": [
                {"type": "mrkdwn", "text": format!("*Environment:*\n{}", text(p, "environment"))},
                {"type": "mrkdwn", "text": format!("*Severity:*\n{severity}")},
                {"type": "mrkdwn", "text": format!("*Occurrences:*\n{}", text(p, "occurrence_count"))},
                {"type": "mrkdwn", "text": format!("*Reason:*\n{}", escape_slack(&d.reason))},
                {"type": "mrkdwn", "text": format!("*First seen:*\n{}", text(p, "first_seen"))},
                {"type": "mrkdwn", "text": format!("*Last seen:*\n{}", text(p, "last_seen"))},
            ]},
            {"type": "section", "text": {"type": "mrkdwn", "text": format!("```{stack}```")}},
            {"type": "context", "elements": [
                {"type": "mrkdwn", "text": format!("Error ID: `{}` · Fingerprint: `{}`", text(p, "error_id"), text(p, "error_fingerprint"))},
            ]},
        ]
    });
    for k in ["channel", "username", "icon_emoji"] {
        if let Some(v) = d.config.get(k) {
            msg[k] = v.clone();
        }
    }
    msg
}

pub fn send(d: &Delivery, limits: &Limits) -> Outcome {
    let url = d
        .config
        .get("webhook_url")
        .and_then(Value::as_str)
        .unwrap_or("");
    let mut out = webhook::http(
        url,
        "POST",
        &[],
        message(d).to_string(),
        &d.delivery_id,
        limits,
    );
    // log the Slack channel, never the webhook URL (it is the secret)
    out.recipient = d
        .config
        .get("channel")
        .and_then(Value::as_str)
        .map(str::to_string)
        .or(Some("slack".into()));
    out
}
