//! Message parameterization: the variable parts of an error message (ids,
//! numbers, hashes, addresses, dates, ...) are replaced by placeholders so
//! that "User 1234 not found" and "User 98765 not found" group together.
//!
//! A single left-to-right scan; every branch consumes at least one byte, so
//! the time is linear in the message length whatever the input.

/// Returns the message with its parameters replaced by `<placeholders>`.
pub fn normalize_message(message: &str) -> String {
    let b = message.as_bytes();
    let mut out = String::with_capacity(message.len().min(4096));
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let at_word_start = i == 0 || !is_word(b[i - 1]);

        // quoted value after '=' : key='x' / key="x"
        if c == b'=' && i + 1 < b.len() && (b[i + 1] == b'\'' || b[i + 1] == b'"') {
            let q = b[i + 1];
            if let Some(end) = memchr(q, &b[i + 2..]) {
                out.push_str("=<val>");
                i += 2 + end + 1;
                continue;
            }
        }
        if at_word_start {
            if let Some((len, ph)) = match_token(&b[i..]) {
                out.push_str(ph);
                i += len;
                continue;
            }
        }
        if c.is_ascii_whitespace() {
            // collapse runs of white space
            if !out.ends_with(' ') {
                out.push(' ');
            }
            i += 1;
            continue;
        }
        if is_word(c) {
            // copy the whole word: placeholders only start at word starts
            let start = i;
            while i < b.len() && is_word(b[i]) {
                i += 1;
            }
            out.push_str(&message[start..i]);
            continue;
        }
        // any other byte, including multi-byte UTF-8: copy one char
        let ch_len = utf8_len(c);
        let end = (i + ch_len).min(b.len());
        out.push_str(message.get(i..end).unwrap_or("\u{fffd}"));
        i = end;
    }
    out.trim().to_string()
}

fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

fn utf8_len(c: u8) -> usize {
    match c {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf7 => 4,
        _ => 1,
    }
}

fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&x| x == needle)
}

/// Length of the run of bytes satisfying `f` at the start of `b`.
fn run(b: &[u8], f: impl Fn(u8) -> bool) -> usize {
    b.iter().take_while(|&&c| f(c)).count()
}

/// Like `run`, but looks at most `max` bytes ahead. Every pattern that can
/// start in the middle of a run of its own characters ("a.a.a.a", "1,1,1")
/// uses this, so that the scan stays linear in the message length.
fn run_max(b: &[u8], max: usize, f: impl Fn(u8) -> bool) -> usize {
    b.iter().take(max).take_while(|&&c| f(c)).count()
}

/// Tries every parameter pattern at a word start; returns (bytes consumed, placeholder).
fn match_token(b: &[u8]) -> Option<(usize, &'static str)> {
    if let Some(n) = match_url(b) {
        return Some((n, "<url>"));
    }
    if let Some(n) = match_email(b) {
        return Some((n, "<email>"));
    }
    if let Some(n) = match_uuid(b) {
        return Some((n, "<uuid>"));
    }
    if let Some(n) = match_datetime(b) {
        return Some((n, "<date>"));
    }
    if let Some(n) = match_ipv4(b) {
        return Some((n, "<ip>"));
    }
    if let Some(n) = match_ipv6(b) {
        return Some((n, "<ip>"));
    }
    if let Some(n) = match_hex(b) {
        return Some((n, "<hex>"));
    }
    if let Some(n) = match_number(b) {
        // a number directly followed by a unit is a duration (3000ms, 1.5s)
        let unit = run_max(&b[n..], 8, |c| {
            c.is_ascii_alphabetic() || c == 0xc2 || c == 0xb5
        });
        if unit > 0 && !b.get(n + unit).is_some_and(|&c| is_word(c)) {
            let u = std::str::from_utf8(&b[n..n + unit]).unwrap_or("");
            if DURATION_UNITS.contains(&u.to_ascii_lowercase().as_str()) {
                return Some((n + unit, "<duration>"));
            }
        }
        if b.get(n).is_some_and(|&c| is_word(c)) {
            return None; // part of an identifier like 3rd or 2fa
        }
        return Some((n, "<num>"));
    }
    None
}

const DURATION_UNITS: &[&str] = &[
    "ns", "us", "µs", "ms", "s", "sec", "secs", "second", "seconds", "m", "min", "mins", "minute",
    "minutes", "h", "hr", "hrs", "hour", "hours", "d", "day", "days",
];

fn match_url(b: &[u8]) -> Option<usize> {
    let scheme = run_max(b, 32, |c| {
        c.is_ascii_alphanumeric() || c == b'+' || c == b'.' || c == b'-'
    });
    if scheme == 0 || !b[0].is_ascii_alphabetic() || !b[scheme..].starts_with(b"://") {
        return None;
    }
    let rest = run(&b[scheme + 3..], |c| {
        !c.is_ascii_whitespace() && c != b'"' && c != b'\'' && c != b'>' && c != b'<'
    });
    if rest == 0 {
        return None;
    }
    let mut n = scheme + 3 + rest;
    // trailing punctuation belongs to the sentence
    while n > scheme + 3 && matches!(b[n - 1], b'.' | b',' | b';' | b':' | b')' | b']') {
        n -= 1;
    }
    Some(n)
}

fn match_email(b: &[u8]) -> Option<usize> {
    let local = run_max(b, 64, |c| {
        c.is_ascii_alphanumeric() || b"._%+-".contains(&c)
    });
    if local == 0 || b.get(local) != Some(&b'@') {
        return None;
    }
    let dom = run_max(&b[local + 1..], 255, |c| {
        c.is_ascii_alphanumeric() || c == b'.' || c == b'-'
    });
    let mut end = local + 1 + dom;
    while end > local + 1 && b[end - 1] == b'.' {
        end -= 1;
    }
    let domain = &b[local + 1..end];
    if domain.contains(&b'.') && domain.first().is_some_and(|c| c.is_ascii_alphanumeric()) {
        Some(end)
    } else {
        None
    }
}

fn is_hex(c: u8) -> bool {
    c.is_ascii_hexdigit()
}

fn match_uuid(b: &[u8]) -> Option<usize> {
    let groups = [8, 4, 4, 4, 12];
    let mut i = 0;
    for (k, g) in groups.iter().enumerate() {
        if run_max(&b[i..], g + 1, is_hex) != *g {
            return None;
        }
        i += g;
        if k < 4 {
            if b.get(i) != Some(&b'-') {
                return None;
            }
            i += 1;
        }
    }
    if b.get(i).is_some_and(|&c| is_word(c)) {
        return None;
    }
    Some(i)
}

fn match_ipv4(b: &[u8]) -> Option<usize> {
    let mut i = 0;
    for k in 0..4 {
        let d = run(&b[i..], |c| c.is_ascii_digit());
        if d == 0 || d > 3 {
            return None;
        }
        i += d;
        if k < 3 {
            if b.get(i) != Some(&b'.') {
                return None;
            }
            i += 1;
        }
    }
    // optional :port
    if b.get(i) == Some(&b':') {
        let p = run(&b[i + 1..], |c| c.is_ascii_digit());
        if p > 0 && p <= 5 {
            i += 1 + p;
        }
    }
    if b.get(i).is_some_and(|&c| is_word(c) || c == b'.')
        && b.get(i + 1).is_some_and(|c| c.is_ascii_digit())
    {
        return None;
    }
    Some(i)
}

fn match_ipv6(b: &[u8]) -> Option<usize> {
    // [v6]:port or a bare run of hex groups with at least two ':'
    let (start, bracket) = if b.first() == Some(&b'[') {
        (1, true)
    } else {
        (0, false)
    };
    let n = run_max(&b[start..], 45, |c| is_hex(c) || c == b':' || c == b'.');
    let s = &b[start..start + n];
    let colons = s.iter().filter(|&&c| c == b':').count();
    let hex_digits = s.iter().filter(|c| is_hex(**c)).count();
    let has_digit = s.iter().any(|c| c.is_ascii_digit());
    // bare form: demand more evidence, so "a::b" paths stay words
    if colons < 2 || hex_digits == 0 || (!bracket && (hex_digits < 3 || !has_digit)) {
        return None;
    }
    // every group is 0..4 hex digits (the last may be a dotted IPv4)
    if s.split(|&c| c == b':')
        .any(|g| g.len() > 4 && !g.contains(&b'.'))
    {
        return None;
    }
    let mut i = start + n;
    if bracket {
        if b.get(i) != Some(&b']') {
            return None;
        }
        i += 1;
        if b.get(i) == Some(&b':') {
            let p = run(&b[i + 1..], |c| c.is_ascii_digit());
            if p > 0 {
                i += 1 + p;
            }
        }
    }
    if b.get(i).is_some_and(|&c| is_word(c)) {
        return None;
    }
    Some(i)
}

fn digits(b: &[u8], i: usize, n: usize) -> bool {
    b.len() >= i + n && b[i..i + n].iter().all(|c| c.is_ascii_digit())
}

fn match_datetime(b: &[u8]) -> Option<usize> {
    let mut i;
    if digits(b, 0, 4)
        && matches!(b.get(4), Some(b'-') | Some(b'/'))
        && digits(b, 5, 2)
        && b.get(7) == b.get(4)
        && digits(b, 8, 2)
    {
        i = 10; // 2024-01-31 or 2024/01/31
    } else if digits(b, 0, 2)
        && matches!(b.get(2), Some(b'/') | Some(b'.') | Some(b'-'))
        && digits(b, 3, 2)
        && b.get(5) == b.get(2)
        && digits(b, 6, 4)
    {
        i = 10; // 31/01/2024, 01.31.2024
    } else if digits(b, 0, 2) && b.get(2) == Some(&b':') && digits(b, 3, 2) {
        i = 0; // a bare time
        return Some(i + match_time(b).unwrap_or(0)).filter(|&n| n > 0);
    } else {
        return None;
    }
    if matches!(b.get(i), Some(b'T') | Some(b' ')) {
        if let Some(t) = match_time(&b[i + 1..]) {
            i += 1 + t;
        }
    }
    if b.get(i).is_some_and(|&c| is_word(c)) && b.get(i) != Some(&b'Z') {
        return None;
    }
    if b.get(i) == Some(&b'Z') {
        i += 1;
    }
    Some(i)
}

/// hh:mm[:ss[.frac]][Z|±hh[:mm]]
fn match_time(b: &[u8]) -> Option<usize> {
    if !(digits(b, 0, 2) && b.get(2) == Some(&b':') && digits(b, 3, 2)) {
        return None;
    }
    let mut i = 5;
    if b.get(i) == Some(&b':') && digits(b, i + 1, 2) {
        i += 3;
        if matches!(b.get(i), Some(b'.') | Some(b',')) {
            let f = run(&b[i + 1..], |c| c.is_ascii_digit());
            if f > 0 {
                i += 1 + f;
            }
        }
    }
    if b.get(i) == Some(&b'Z') {
        i += 1;
    } else if matches!(b.get(i), Some(b'+') | Some(b'-')) && digits(b, i + 1, 2) {
        i += 3;
        if b.get(i) == Some(&b':') && digits(b, i + 1, 2) {
            i += 3;
        } else if digits(b, i, 2) {
            i += 2;
        }
    }
    Some(i)
}

fn match_hex(b: &[u8]) -> Option<usize> {
    if b.len() > 2 && b[0] == b'0' && (b[1] == b'x' || b[1] == b'X') {
        let n = run(&b[2..], is_hex);
        if n > 0 && !b.get(2 + n).is_some_and(|&c| is_word(c)) {
            return Some(2 + n);
        }
        return None;
    }
    // bare hex: hashes (MD5 32, SHA-1 40, SHA-256 64) and ids of 8+ hex digits
    // that mix digits and letters (so plain words like "deadbeef" survive only
    // when they have no digit)
    let n = run(b, is_hex);
    if n < 8 || b.get(n).is_some_and(|&c| is_word(c)) {
        return None;
    }
    let s = &b[..n];
    let has_digit = s.iter().any(|c| c.is_ascii_digit());
    let has_alpha = s.iter().any(|c| c.is_ascii_alphabetic());
    if (has_digit && has_alpha) || matches!(n, 32 | 40 | 64) {
        Some(n)
    } else {
        None
    }
}

fn match_number(b: &[u8]) -> Option<usize> {
    let mut i = 0;
    if matches!(b.first(), Some(b'-') | Some(b'+')) && b.get(1).is_some_and(|c| c.is_ascii_digit())
    {
        i = 1;
    }
    let d = run_max(&b[i..], 64, |c| {
        c.is_ascii_digit() || c == b',' || c == b'_'
    });
    if d == 0 || !b[i].is_ascii_digit() {
        return None;
    }
    i += d;
    // a trailing ',' is punctuation, not a thousands separator
    while i > 0 && (b[i - 1] == b',' || b[i - 1] == b'_') {
        i -= 1;
    }
    if b.get(i) == Some(&b'.') && b.get(i + 1).is_some_and(|c| c.is_ascii_digit()) {
        i += 1 + run(&b[i + 1..], |c| c.is_ascii_digit());
    }
    if matches!(b.get(i), Some(b'e') | Some(b'E')) {
        let s = usize::from(matches!(b.get(i + 1), Some(b'-') | Some(b'+')));
        let e = run(&b[i + 1 + s..], |c| c.is_ascii_digit());
        if e > 0 {
            i += 1 + s + e;
        }
    }
    Some(i)
}

#[cfg(test)]
mod tests {
    use super::normalize_message as n;

    #[test]
    fn numbers_group() {
        assert_eq!(n("User 1234 not found"), n("User 98765 not found"));
        assert_eq!(n("User 1234 not found"), "User <num> not found");
        assert_eq!(n("took 1.5 of -3e10"), "took <num> of <num>");
    }

    #[test]
    fn parameters() {
        assert_eq!(
            n("id 550e8400-e29b-41d4-a716-446655440000 bad"),
            "id <uuid> bad"
        );
        assert_eq!(n("from 10.0.0.1:5432 refused"), "from <ip> refused");
        assert_eq!(n("from [::1]:5432 refused"), "from <ip> refused");
        assert_eq!(n("host fe80::1ff:fe23:4567:890a down"), "host <ip> down");
        assert_eq!(
            n("mail bob.smith@example.com bounced"),
            "mail <email> bounced"
        );
        assert_eq!(
            n("GET https://api.example.com/v1/users/42?x=1 failed."),
            "GET <url> failed."
        );
        assert_eq!(
            n("at 2024-01-31T10:22:33.123Z and 2024-02-01 10:00"),
            "at <date> and <date>"
        );
        assert_eq!(
            n("expired 31/01/2024 at 10:22:33"),
            "expired <date> at <date>"
        );
        assert_eq!(n("timeout after 3000ms"), "timeout after <duration>");
        assert_eq!(n("timeout after 30 s"), "timeout after <num> s");
        assert_eq!(n("ptr 0x7ffdeadbeef0 null"), "ptr <hex> null");
        assert_eq!(
            n("commit d41d8cd98f00b204e9800998ecf8427e missing"),
            "commit <hex> missing"
        );
        assert_eq!(n("token=\"abc def\" user='x'"), "token=<val> user=<val>");
    }

    #[test]
    fn words_survive() {
        assert_eq!(
            n("the 3rd attempt of order_123 via 2fa"),
            "the 3rd attempt of order_123 via 2fa"
        );
        assert_eq!(n("deadbeef cafe"), "deadbeef cafe");
        assert_eq!(n("  many   spaces\n\there "), "many spaces here");
    }

    #[test]
    fn garbage_is_fine() {
        let s = "\u{0}\u{fffd}ü€𝄞 0x 1. =\" ::: @@ 1e 255.255.255.2555";
        let _ = n(s);
        assert_eq!(n(""), "");
    }
}
