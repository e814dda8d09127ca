//! Generic webhooks: url, method (POST, PUT, PATCH), headers; the body is the
//! error as JSON (the seed's payload) or the rule's template.
use super::{allowed_hosts, host_allowed, render, url_host, Delivery, Limits, Outcome};
use serde_json::Value;

pub fn agent(limits: &Limits) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(limits.connect))
        .timeout_global(Some(limits.total))
        .http_status_as_error(false)
        .max_redirects(0)
        .user_agent("fraiseql_obs")
        .build()
        .into()
}

/// POSTs (or PUTs/PATCHes) `body` and maps the answer: 2xx is sent; 4xx other
/// than 408/429 is permanent (retrying will not help); the rest is retried.
pub fn http(
    url: &str,
    method: &str,
    headers: &[(String, String)],
    body: String,
    delivery_id: &str,
    limits: &Limits,
) -> Outcome {
    let Some(host) = url_host(url) else {
        return Outcome::failed("the url is not an http(s) url", true);
    };
    if !host_allowed(host, &allowed_hosts()) {
        return Outcome::failed(
            format!("host {host} is not in fraiseql_obs.notification_allowed_hosts"),
            true,
        );
    }
    let agent = agent(limits);
    let mut req = match method.to_ascii_uppercase().as_str() {
        "PUT" => agent.put(url),
        "PATCH" => agent.patch(url),
        _ => agent.post(url),
    };
    req = req
        .header("Content-Type", "application/json")
        .header("X-Fraiseql-Delivery-Id", delivery_id);
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    match req.send(body) {
        Ok(resp) => {
            let code = resp.status().as_u16();
            if (200..300).contains(&code) {
                Outcome::sent(code.to_string(), Some(host.to_string()))
            } else {
                let permanent = (400..500).contains(&code) && code != 408 && code != 429;
                let mut o = Outcome::failed(format!("HTTP {code} from {host}"), permanent);
                o.response_code = Some(code.to_string());
                o.recipient = Some(host.to_string());
                o
            }
        }
        Err(e) => {
            let mut o = Outcome::failed(format!("{host}: {e}"), false);
            o.recipient = Some(host.to_string());
            o
        }
    }
}

pub fn send(d: &Delivery, limits: &Limits) -> Outcome {
    let url = d.config.get("url").and_then(Value::as_str).unwrap_or("");
    let method = d
        .config
        .get("method")
        .and_then(Value::as_str)
        .unwrap_or("POST");
    let headers: Vec<(String, String)> = d
        .config
        .get("headers")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string()),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let template = d
        .config
        .get("template")
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| d.template.clone());
    let body = match template {
        Some(t) => render(&t, &d.payload),
        None => d.payload.to_string(),
    };
    http(url, method, &headers, body, &d.delivery_id, limits)
}
