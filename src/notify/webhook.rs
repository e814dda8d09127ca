//! Generic webhooks: url, method (POST, PUT, PATCH), headers; the body is the
//! error as JSON (the seed's payload) or the rule's template.
use super::destination::AllowList;
use super::{render, Delivery, Escape, Limits, Outcome};
use serde_json::Value;
use std::net::SocketAddr;
use ureq::unversioned::resolver::{ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{DefaultConnector, NextTimeout};

/// Hands ureq the one address that was checked, for the one host that was
/// checked: no second lookup between the check and the connection.
#[derive(Debug)]
struct Pinned {
    host: String,
    addr: SocketAddr,
}

impl Resolver for Pinned {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        _config: &ureq::config::Config,
        _timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        if !uri
            .host()
            .is_some_and(|h| h.eq_ignore_ascii_case(&self.host))
        {
            return Err(ureq::Error::HostNotFound);
        }
        let mut v = self.empty();
        v.push(self.addr);
        Ok(v)
    }
}

pub fn agent(limits: &Limits, host: &str, addr: SocketAddr) -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .timeout_connect(Some(limits.connect))
        .timeout_global(Some(limits.total))
        .http_status_as_error(false)
        .max_redirects(0)
        // never through a proxy from the environment: the checked address is
        // the one connected to
        .proxy(None)
        .user_agent("fraiseql_obs")
        .build();
    ureq::Agent::with_parts(
        config,
        DefaultConnector::default(),
        Pinned {
            host: host.to_string(),
            addr,
        },
    )
}

/// Headers a rule may not set: they would change where or how the request
/// goes, not what it says.
const RESERVED_HEADERS: [&str; 12] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "expect",
    "te",
    "trailer",
    "keep-alive",
    "proxy-authorization",
    "proxy-connection",
    "x-fraiseql-delivery-id",
];

pub fn reserved_header(name: &str) -> bool {
    RESERVED_HEADERS.contains(&name.trim().to_ascii_lowercase().as_str())
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
    // parsed by the parser ureq itself uses, so both see the same host
    let uri: ureq::http::Uri = match url.parse() {
        Ok(u) => u,
        Err(_) => return Outcome::failed("the url is not a valid http(s) url", true),
    };
    let default_port = match uri.scheme_str() {
        Some("http") => 80,
        Some("https") => 443,
        _ => return Outcome::failed("the url is not an http(s) url", true),
    };
    let Some(host) = uri.host().filter(|h| !h.is_empty()).map(str::to_string) else {
        return Outcome::failed("the url has no host", true);
    };
    let port = uri.port_u16().unwrap_or(default_port);
    let addr = match AllowList::parse(&limits.allowed_hosts).resolve(&host, port) {
        Ok(a) => a,
        Err(e) => return Outcome::failed(e, true),
    };
    if let Some((k, _)) = headers.iter().find(|(k, _)| reserved_header(k)) {
        return Outcome::failed(format!("header {k} may not be set by a rule"), true);
    }
    let host = host.as_str();
    let agent = agent(limits, host, addr);
    let mut req = match method.to_ascii_uppercase().as_str() {
        "PUT" => agent.put(url),
        "PATCH" => agent.patch(url),
        _ => agent.post(url),
    };
    // a rule's own Content-Type replaces ours (never two of them)
    if !headers
        .iter()
        .any(|(k, _)| k.trim().eq_ignore_ascii_case("content-type"))
    {
        req = req.header("Content-Type", "application/json");
    }
    req = req.header("X-Fraiseql-Delivery-Id", delivery_id);
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
    // the body is JSON: values are JSON-escaped into the template's strings
    let body = match template {
        Some(t) => render(&t, &d.payload, Escape::Json),
        None => d.payload.to_string(),
    };
    http(url, method, &headers, body, &d.delivery_id, limits)
}
