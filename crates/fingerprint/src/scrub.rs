//! Server-side scrubbing, before anything is stored (and so before anything
//! is sent: notifications are built from stored rows). As Sentry's default
//! data scrubber: the value of a key named like a password, secret, token,
//! API key, authorization header, cookie or session, at any depth, becomes
//! `[Filtered]`; in any string, a number that looks like a payment card (13
//! to 19 digits, single spaces or dashes between them, passing the Luhn
//! check), the credentials of a URL (`https://user:pass@host`) and a PEM
//! private key become `[Filtered]`. A list of `[name, value]` pairs (how
//! Sentry SDKs may send headers) is read as an object.
//!
//! Key names match by substring, case-insensitively, `-` and `_` alike
//! (`X-Auth-Token`, `db_password`, `sessionid`); `exclude` names keys never
//! scrubbed (exact, same normalization), `extra` adds substrings.
use serde_json::Value;
use std::borrow::Cow;

pub const FILTERED: &str = "[Filtered]";

/// The default key substrings (normalized: lowercase, `-` as `_`).
pub const DEFAULT_KEYS: [&str; 17] = [
    "password",
    "passwd",
    "pwd",
    "secret",
    "token",
    "api_key",
    "apikey",
    "access_key",
    "private_key",
    "privatekey",
    "auth",
    "credential",
    "cookie",
    "session",
    "csrf",
    "xsrf",
    "card_number",
];

#[derive(Debug, Clone, Default)]
pub struct Scrubber {
    /// the default keys and card numbers
    pub defaults: bool,
    /// more key substrings (normalized)
    pub extra: Vec<String>,
    /// keys never scrubbed (normalized, exact)
    pub exclude: Vec<String>,
}

/// A key as compared: lowercase, `-` as `_`.
pub fn normalize_key(k: &str) -> String {
    k.chars()
        .map(|c| if c == '-' { '_' } else { c.to_ascii_lowercase() })
        .collect()
}

impl Scrubber {
    pub fn is_off(&self) -> bool {
        !self.defaults && self.extra.is_empty()
    }

    pub fn sensitive_key(&self, key: &str) -> bool {
        let k = normalize_key(key);
        if self.exclude.iter().any(|e| *e == k) {
            return false;
        }
        (self.defaults && DEFAULT_KEYS.iter().any(|d| k.contains(d)))
            || self.extra.iter().any(|e| !e.is_empty() && k.contains(e.as_str()))
    }

    /// Card numbers, URL credentials and private keys in a string replaced
    /// (nothing to do: borrowed).
    pub fn text<'a>(&self, s: &'a str) -> Cow<'a, str> {
        if self.is_off() {
            return Cow::Borrowed(s);
        }
        let mut cur: Cow<'a, str> = scrub_key_values(self, s);
        if self.defaults {
            for f in [scrub_pem_keys, scrub_url_credentials, scrub_card_numbers] {
                if let Cow::Owned(o) = f(&cur) {
                    cur = Cow::Owned(o);
                }
            }
        }
        cur
    }

    /// Whether a JSON text may hold something to scrub: a cheap test on the
    /// serialized value, so that most contexts are not parsed at all.
    pub fn may_need(&self, json: &str) -> bool {
        if self.is_off() {
            return false;
        }
        let lower = json.to_ascii_lowercase().replace('-', "_");
        (self.defaults
            && (DEFAULT_KEYS.iter().any(|d| lower.contains(d))
                || has_long_digit_run(json)
                || lower.contains("begin")
                || (lower.contains("://") && lower.contains('@'))))
            || self.extra.iter().any(|e| !e.is_empty() && lower.contains(e.as_str()))
    }

    /// Scrubs a JSON value in place; true if anything changed.
    pub fn json(&self, v: &mut Value) -> bool {
        match v {
            Value::Object(m) => {
                let mut changed = false;
                for (k, val) in m.iter_mut() {
                    if self.sensitive_key(k) {
                        if *val != Value::String(FILTERED.into()) && !val.is_null() {
                            *val = Value::String(FILTERED.into());
                            changed = true;
                        }
                    } else {
                        changed |= self.json(val);
                    }
                }
                changed
            }
            Value::Array(a) => {
                // [["Authorization", "Bearer ..."], ...]: a pair list
                let mut changed = false;
                for x in a.iter_mut() {
                    match x {
                        Value::Array(pair)
                            if pair.len() == 2
                                && pair[0].as_str().is_some_and(|k| self.sensitive_key(k)) =>
                        {
                            if pair[1] != Value::String(FILTERED.into()) && !pair[1].is_null() {
                                pair[1] = Value::String(FILTERED.into());
                                changed = true;
                            }
                        }
                        _ => changed |= self.json(x),
                    }
                }
                changed
            }
            Value::Number(num) if self.defaults => {
                let digits = num.to_string();
                if (13..=19).contains(&digits.len())
                    && digits.bytes().all(|c| c.is_ascii_digit())
                    && luhn(digits.as_bytes())
                {
                    *v = Value::String(FILTERED.into());
                    true
                } else {
                    false
                }
            }
            Value::String(s) => match self.text(s) {
                Cow::Owned(o) => {
                    *s = o;
                    true
                }
                Cow::Borrowed(_) => false,
            },
            _ => false,
        }
    }
}

/// Parses a comma or space separated list of key names (normalized).
pub fn parse_keys(s: &str) -> Vec<String> {
    s.split(|c: char| c == ',' || c.is_whitespace())
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(normalize_key)
        .collect()
}

/// `scheme://user:password@host` becomes `scheme://[Filtered]@host`.
pub fn scrub_url_credentials(s: &str) -> Cow<'_, str> {
    if !s.contains("://") {
        return Cow::Borrowed(s);
    }
    let mut out = String::new();
    let mut copied = 0;
    let mut from = 0;
    while let Some(p) = s[from..].find("://") {
        let start = from + p + 3;
        // the authority ends at the first of / ? # or white space
        let end = s[start..]
            .find(|c: char| c == '/' || c == '?' || c == '#' || c.is_whitespace() || c == '"' || c == '\'')
            .map_or(s.len(), |e| start + e);
        if let Some(at) = s[start..end].rfind('@') {
            if s[start..start + at].contains(':') {
                out.push_str(&s[copied..start]);
                out.push_str(FILTERED);
                copied = start + at;
            }
        }
        from = end.max(start);
    }
    if copied == 0 {
        return Cow::Borrowed(s);
    }
    out.push_str(&s[copied..]);
    Cow::Owned(out)
}

/// A PEM or PGP private key block (`-----BEGIN ... PRIVATE KEY...-----` to its END
/// line) becomes FILTERED; one never closed, to the end of the text.
pub fn scrub_pem_keys(s: &str) -> Cow<'_, str> {
    const BEGIN: &str = "-----BEGIN ";
    if !s.contains(BEGIN) {
        return Cow::Borrowed(s);
    }
    let mut out = String::new();
    let mut copied = 0;
    let mut from = 0;
    while let Some(p) = s[from..].find(BEGIN) {
        let start = from + p;
        let label_end = s[start + BEGIN.len()..]
            .find("-----")
            .map(|e| start + BEGIN.len() + e);
        let Some(label_end) = label_end else { break };
        if !s[start..label_end].contains("PRIVATE KEY") {
            from = label_end;
            continue;
        }
        let end = s[label_end..]
            .find("-----END ")
            .and_then(|e| {
                let e = label_end + e + "-----END ".len();
                s[e..].find("-----").map(|f| e + f + 5)
            })
            .unwrap_or(s.len());
        out.push_str(&s[copied..start]);
        out.push_str(FILTERED);
        copied = end;
        from = end;
    }
    if copied == 0 {
        return Cow::Borrowed(s);
    }
    out.push_str(&s[copied..]);
    Cow::Owned(out)
}

fn has_long_digit_run(s: &str) -> bool {
    let mut run = 0;
    for b in s.bytes() {
        if b.is_ascii_digit() {
            run += 1;
            if run >= 13 {
                return true;
            }
        } else if b != b' ' && b != b'-' {
            run = 0;
        }
    }
    false
}

fn luhn(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, d) in digits.iter().rev().enumerate() {
        let mut x = (*d - b'0') as u32;
        if i % 2 == 1 {
            x *= 2;
            if x > 9 {
                x -= 9;
            }
        }
        sum += x;
    }
    sum % 10 == 0
}

/// Replaces the card numbers of `s` by FILTERED: in a run of digit groups
/// (single spaces or dashes between them), every span of whole groups of 13
/// to 19 digits passing the Luhn check (so a card followed by its CVV, or
/// after a quantity, is found).
pub fn scrub_card_numbers(s: &str) -> Cow<'_, str> {
    if !has_long_digit_run(s) {
        return Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut copied = 0;
    let mut i = 0;
    while i < b.len() {
        if !(b[i].is_ascii_digit() && (i == 0 || !b[i - 1].is_ascii_alphanumeric())) {
            i += 1;
            continue;
        }
        // the run's groups: (start, end) byte offsets
        let mut groups: Vec<(usize, usize)> = Vec::new();
        let mut j = i;
        loop {
            let start = j;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            groups.push((start, j));
            if j + 1 < b.len() && (b[j] == b' ' || b[j] == b'-') && b[j + 1].is_ascii_digit() && groups.len() < 64 {
                j += 1;
            } else {
                break;
            }
        }
        let run_end = j;
        let followed_by_word = run_end < b.len() && b[run_end].is_ascii_alphanumeric();
        let mut g = 0;
        let mut last = i;
        while g < groups.len() {
            let mut digits: Vec<u8> = Vec::with_capacity(19);
            let mut found = None;
            for (e, &(gs, ge)) in groups.iter().enumerate().skip(g) {
                digits.extend_from_slice(&b[gs..ge]);
                if digits.len() > 19 {
                    break;
                }
                let at_word = e + 1 == groups.len() && followed_by_word;
                if digits.len() >= 13 && !at_word && luhn(&digits) {
                    found = Some(e);
                    break;
                }
            }
            match found {
                Some(e) => {
                    out.push_str(&s[copied..groups[g].0]);
                    out.push_str(FILTERED);
                    copied = groups[e].1;
                    last = copied;
                    g = e + 1;
                }
                None => g += 1,
            }
        }
        i = run_end.max(last).max(i + 1);
    }
    if copied == 0 {
        return Cow::Borrowed(s);
    }
    out.push_str(&s[copied..]);
    Cow::Owned(out)
}

/// `password=hunter2`, `access_token=abc&x=1` (query and connection strings)
/// and `Authorization: Bearer abc` inside a string: the value becomes
/// FILTERED when its name is a sensitive key.
pub fn scrub_key_values<'a>(sc: &Scrubber, s: &'a str) -> Cow<'a, str> {
    if !s.contains('=') && !s.contains(':') {
        return Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut out = String::new();
    let mut copied = 0;
    let mut i = 0;
    while i < b.len() {
        let sep = b[i];
        if sep == b'=' || (sep == b':' && b.get(i + 1) == Some(&b' ')) {
            // the name before it
            let mut k = i;
            while k > 0 && (b[k - 1].is_ascii_alphanumeric() || b[k - 1] == b'_' || b[k - 1] == b'-') {
                k -= 1;
            }
            if k < i && sc.sensitive_key(&s[k..i]) {
                let mut v = i + 1;
                while v < b.len() && b[v] == b' ' {
                    v += 1;
                }
                // `Bearer abc` / `Basic abc`: the scheme stays
                let word_end = v + b[v..].iter().take_while(|c| c.is_ascii_alphabetic()).count();
                if sep == b':' && matches!(s[v..word_end].to_ascii_lowercase().as_str(), "bearer" | "basic" | "token")
                    && b.get(word_end) == Some(&b' ')
                {
                    v = word_end + 1;
                }
                let end = v + b[v..]
                    .iter()
                    .take_while(|&&c| !matches!(c, b'&' | b';' | b',' | b'"' | b'\'' | b' ' | b'\n' | b'\r' | b'\t'))
                    .count();
                if end > v && &s[v..end] != FILTERED {
                    out.push_str(&s[copied..v]);
                    out.push_str(FILTERED);
                    copied = end;
                }
                i = end.max(i + 1);
                continue;
            }
        }
        i += 1;
    }
    if copied == 0 {
        return Cow::Borrowed(s);
    }
    out.push_str(&s[copied..]);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn defaults() -> Scrubber {
        Scrubber {
            defaults: true,
            ..Default::default()
        }
    }

    #[test]
    fn sensitive_keys_at_any_depth() {
        let mut v = json!({
            "user_id": "u-1",
            "password": "hunter2",
            "request": {"headers": {"Authorization": "Bearer abc", "X-Api-Key": "k", "Accept": "*/*",
                                     "Cookie": "sid=1"},
                        "data": [{"card_number": 4111111111111111_u64, "db_password": {"nested": 1}}]},
            "sessionid": "s", "csrf_token": "t", "note": "fine", "missing": null
        });
        assert!(defaults().json(&mut v));
        assert_eq!(
            v,
            json!({
                "user_id": "u-1",
                "password": FILTERED,
                "request": {"headers": {"Authorization": FILTERED, "X-Api-Key": FILTERED, "Accept": "*/*",
                                         "Cookie": FILTERED},
                            "data": [{"card_number": FILTERED, "db_password": FILTERED}]},
                "sessionid": FILTERED, "csrf_token": FILTERED, "note": "fine", "missing": null
            })
        );
        // nothing left to do: unchanged
        assert!(!defaults().json(&mut v));
    }

    #[test]
    fn card_numbers_in_any_string() {
        assert_eq!(
            scrub_card_numbers("paid with 4111 1111 1111 1111 today"),
            "paid with [Filtered] today"
        );
        assert_eq!(scrub_card_numbers("card=5500-0000-0000-0004."), "card=[Filtered].");
        assert_eq!(scrub_card_numbers("4111111111111111"), "[Filtered]");
        // not a card: fails Luhn, too short, part of a word or a longer number
        for s in [
            "order 4111111111111112",
            "id 123456789012",
            "x4111111111111111",
            "4111111111111111abc",
            "ts 16409952000000000000",
        ] {
            assert_eq!(scrub_card_numbers(s), s, "{s}");
        }
        assert!(matches!(scrub_card_numbers("no digits"), Cow::Borrowed(_)));
    }

    #[test]
    fn urls_keys_and_pairs() {
        assert_eq!(
            scrub_url_credentials("connect postgres://app:s3cr3t@db:5432/x failed; see https://docs.example.com/a@b"),
            "connect postgres://[Filtered]@db:5432/x failed; see https://docs.example.com/a@b"
        );
        assert_eq!(scrub_url_credentials("mailto user@example.com"), "mailto user@example.com");
        let pem = "cfg -----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY----- end";
        assert_eq!(scrub_pem_keys(pem), "cfg [Filtered] end");
        let cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----";
        assert_eq!(scrub_pem_keys(cert), cert);
        assert_eq!(scrub_pem_keys("x -----BEGIN PRIVATE KEY-----\nMIIE"), "x [Filtered]");
        let mut v = json!({"headers": [["Authorization", "Bearer x"], ["Accept", "*/*"]],
                           "dsn": "https://key:secret@sentry.example.com/1"});
        assert!(defaults().json(&mut v));
        assert_eq!(v, json!({"headers": [["Authorization", FILTERED], ["Accept", "*/*"]],
                             "dsn": "https://[Filtered]@sentry.example.com/1"}));
    }

    #[test]
    fn review_gaps() {
        assert_eq!(scrub_card_numbers("card 4111 1111 1111 1111 123"), "card [Filtered] 123");
        assert_eq!(scrub_card_numbers("qty 2 4111 1111 1111 1111"), "qty 2 [Filtered]");
        let d = defaults();
        assert_eq!(d.text("GET /cb?access_token=abc123&x=1"), "GET /cb?access_token=[Filtered]&x=1");
        assert_eq!(d.text("host=db password=hunter2 user=app"), "host=db password=[Filtered] user=app");
        assert_eq!(d.text("Authorization: Bearer eyJhbGci.x"), "Authorization: Bearer [Filtered]");
        assert_eq!(d.text("a=1 b: 2"), "a=1 b: 2");
        let mut v = json!({"n": 4111111111111111_u64, "id": 1234567890123_u64});
        d.json(&mut v);
        assert_eq!(v["n"], json!(FILTERED));
        assert_eq!(v["id"], json!(1234567890123_u64));
        assert_eq!(
            scrub_pem_keys("-----BEGIN PGP PRIVATE KEY BLOCK-----\nx\n-----END PGP PRIVATE KEY BLOCK-----"),
            "[Filtered]"
        );
    }

    #[test]
    fn configuration() {
        let s = Scrubber {
            defaults: true,
            extra: parse_keys("iban, Tax-Id"),
            exclude: parse_keys("auth_method"),
        };
        let mut v = json!({"iban": "DE89", "tax_id": "1", "auth_method": "oauth", "author": "x"});
        s.json(&mut v);
        // (auth matches "author" too, as in Sentry: exclude it if it matters)
        assert_eq!(v, json!({"iban": FILTERED, "tax_id": FILTERED, "auth_method": "oauth", "author": FILTERED}));
        let off = Scrubber::default();
        assert!(off.is_off());
        let mut w = json!({"password": "p"});
        assert!(!off.json(&mut w));
        assert!(!off.may_need(r#"{"password": "p"}"#));
        assert!(defaults().may_need(r#"{"Pass-word": 1, "PASSWORD": 2}"#));
        assert!(defaults().may_need(r#"{"n": "4111 1111 1111 1111"}"#));
        assert!(!defaults().may_need(r#"{"user_id": "u-1", "path": "/orders"}"#));
    }
}
