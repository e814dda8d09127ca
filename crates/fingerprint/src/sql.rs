//! SQL text with its constants replaced, as pg_stat_statements shows it:
//! a statement that failed is stored as `SELECT * FROM users WHERE email =
//! $1`, never with the value the application sent.
//!
//! A lexer, not a parser: string literals (`'..'`, `E'..'`, `U&'..'`,
//! `B'..'`, `X'..'`, `N'..'`, dollar-quoted bodies) and numbers become
//! `$n` (numbered after the statement's own parameters), comments are dropped
//! (they can hold data too), white space is collapsed. Quoted identifiers,
//! keywords, operators and `$1`-style parameters stay. An unterminated
//! literal or comment swallows the rest of the text, so nothing of it is
//! kept. One left-to-right pass: linear in the input.

/// `sql` with its constants replaced and white space collapsed, cut to at
/// most `max` bytes (on a character boundary).
pub fn normalize_sql(sql: &str, max: usize) -> String {
    normalize_sql_with(sql, max, true)
}

/// As normalize_sql; `standard_strings` false: the session runs with
/// standard_conforming_strings off, where a backslash escapes in '...' too.
pub fn normalize_sql_with(sql: &str, max: usize, standard_strings: bool) -> String {
    let b = sql.as_bytes();
    let mut next_param = max_param(b) + 1;
    let mut out = String::with_capacity(sql.len().min(max));
    let mut placeholder = |out: &mut String| {
        out.push('$');
        out.push_str(&next_param.to_string());
        next_param += 1;
    };
    let mut i = 0;
    let mut space = false;
    // where the last identifier or keyword ended: only right after one is a
    // `$` or a digit part of a word (after a number, `$$` opens a string)
    let mut ident_end = usize::MAX;
    while i < b.len() && out.len() < max {
        let c = b[i];
        let prev_word = i > 0 && ident_end == i;
        if c.is_ascii_whitespace() {
            space = true;
            i += 1;
            continue;
        }
        if c == b'-' && b.get(i + 1) == Some(&b'-') {
            i = b[i..]
                .iter()
                .position(|&x| x == b'\n')
                .map_or(b.len(), |p| i + p);
            space = true;
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'*') {
            i = skip_block_comment(b, i);
            space = true;
            continue;
        }
        if space && !out.is_empty() {
            out.push(' ');
        }
        space = false;
        // a prefixed string: E'..', U&'..', B'..', X'..', N'..'
        if !prev_word {
            if let Some(skip) = prefixed_string(b, i) {
                placeholder(&mut out);
                i = skip;
                continue;
            }
        }
        match c {
            b'\'' => {
                placeholder(&mut out);
                i = skip_quoted(b, i + 1, b'\'', !standard_strings);
            }
            b'"' => {
                let end = skip_quoted(b, i + 1, b'"', false);
                out.push_str(&sql[i..end]);
                i = end;
            }
            b'$' if !prev_word => {
                if b.get(i + 1).is_some_and(u8::is_ascii_digit) {
                    // a parameter: kept
                    let end = i + 1 + b[i + 1..].iter().take_while(|x| x.is_ascii_digit()).count();
                    out.push_str(&sql[i..end]);
                    i = end;
                } else if let Some(tag_end) = dollar_tag(b, i) {
                    let tag = &b[i..tag_end];
                    placeholder(&mut out);
                    i = find(b, tag_end, tag).map_or(b.len(), |p| p + tag.len());
                } else {
                    out.push('$');
                    i += 1;
                }
            }
            b'0'..=b'9' if !prev_word => {
                placeholder(&mut out);
                i = skip_number(b, i);
            }
            b'.' if !prev_word && b.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                placeholder(&mut out);
                i = skip_number(b, i);
            }
            _ if is_ident(c) && !c.is_ascii_digit() && c != b'$' || prev_word && is_ident(c) => {
                let end = i + b[i..].iter().take_while(|&&x| is_ident(x)).count();
                out.push_str(&sql[i..end]);
                i = end;
                ident_end = end;
            }
            _ => {
                // one character (a whole UTF-8 sequence)
                let len = utf8_len(c);
                let end = (i + len).min(b.len());
                out.push_str(sql.get(i..end).unwrap_or("?"));
                i = end;
            }
        }
    }
    if out.len() > max {
        let mut cut = max;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    out
}

/// An error's CONTEXT (one line per level, innermost first) with the SQL it
/// quotes normalized and nothing else quoted kept: `PL/pgSQL function f(int)
/// line 3 at RAISE` and `SQL function "f" statement 1` stay as they are
/// (they are the frames), `SQL statement "SELECT f(42)"` becomes `SQL
/// statement "SELECT f($1)"`, and a line of any other kind (`COPY t, line 1:
/// "<the row>"`) keeps its words without numbers or quoted text.
pub fn scrub_pg_context(context: &str, max: usize) -> String {
    const SQL_LINES: [&str; 4] = [
        "SQL statement \"",
        "PL/pgSQL expression \"",
        "PL/pgSQL assignment \"",
        "SQL expression \"",
    ];
    let is_frame = |l: &str| l.starts_with("PL/pgSQL function ") || l.starts_with("SQL function \"");
    let lines: Vec<&str> = context.lines().collect();
    let mut out = String::with_capacity(context.len().min(max));
    let mut i = 0;
    while i < lines.len() && out.len() < max {
        if !out.is_empty() {
            out.push('\n');
        }
        let l = lines[i].trim();
        i += 1;
        if is_frame(l) {
            out.push_str(l);
        } else if let Some(p) = SQL_LINES.iter().find(|p| l.starts_with(**p)) {
            // The quoted SQL is printed as it is, newlines included: it
            // runs to a line ending in `"` that the next frame (or the end)
            // follows.
            let mut sql = l[p.len()..].to_string();
            while !(sql.ends_with('"')
                && lines.get(i).is_none_or(|n| {
                    let n = n.trim();
                    is_frame(n) || SQL_LINES.iter().any(|p| n.starts_with(*p))
                }))
                && i < lines.len()
            {
                sql.push('\n');
                sql.push_str(lines[i]);
                i += 1;
            }
            let inner = sql.strip_suffix('"').unwrap_or(&sql);
            out.push_str(p);
            out.push_str(&normalize_sql(inner, max));
            out.push('"');
        } else {
            // another kind (`COPY t, line 7: "<the row>"`): its words up to
            // the first colon or quote, without numbers; nothing after
            let cut = l.find([':', '"', '\'']).unwrap_or(l.len());
            out.push_str(&normalize_sql(&l[..cut], max));
            if cut < l.len() {
                out.push_str(": …");
            }
        }
    }
    if out.len() > max {
        let mut cut = max;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    out
}

/// An error's DETAIL without the values it quotes: `Key (email)=(bob@x.io)
/// already exists.` becomes `Key (email)=(…) already exists.`, `Failing row
/// contains (1, -5, secret).` becomes `Failing row contains (…).` (the
/// column names stay: they say what was wrong).
pub fn scrub_pg_detail(detail: &str) -> String {
    // A value list runs to the last `)` of the detail: values are printed
    // unquoted and may hold parentheses themselves.
    let lower = detail.to_ascii_lowercase();
    let open = ["=(", "= (", "contains ("]
        .iter()
        .filter_map(|m| lower.find(m).map(|at| at + m.len() - 1))
        .min();
    let mut s = match (open, detail.rfind(')')) {
        (Some(o), Some(c)) if c > o => format!("{}(…){}", &detail[..o], &detail[c + 1..]),
        (Some(o), _) => format!("{}(…", &detail[..o]),
        _ => detail.to_string(),
    };
    // and anything quoted (JSON and XML input details quote the input; the
    // names a detail quotes are in the capture's schema/table/column fields)
    s = strip_double_quoted(&s);
    s
}

/// `"anything"` becomes `"…"` (an unclosed quote runs to the end).
pub fn strip_double_quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut quoted = false;
    for ch in s.chars() {
        if ch == '"' {
            if !quoted {
                out.push_str("\"…\"");
            }
            quoted = !quoted;
        } else if !quoted {
            out.push(ch);
        }
    }
    out
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

fn utf8_len(c: u8) -> usize {
    match c {
        0xf0..=0xff => 4,
        0xe0..=0xef => 3,
        0xc0..=0xdf => 2,
        _ => 1,
    }
}

/// The largest `$n` parameter in the text (0: none); literals are not
/// looked into, so a `$5` inside a string does not count.
fn max_param(b: &[u8]) -> u32 {
    // (the head only: the output is short, a later parameter's number
    // colliding with a placeholder's would be harmless)
    let b = &b[..b.len().min(64 * 1024)];
    let mut max = 0u32;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\'' => i = skip_quoted(b, i + 1, b'\'', false),
            b'$' if b.get(i + 1).is_some_and(u8::is_ascii_digit)
                && (i == 0 || !is_ident(b[i - 1])) =>
            {
                let digits: String = b[i + 1..]
                    .iter()
                    .take_while(|x| x.is_ascii_digit())
                    .take(6)
                    .map(|&x| x as char)
                    .collect();
                max = max.max(digits.parse().unwrap_or(0));
                i += 1 + digits.len();
            }
            _ => i += 1,
        }
    }
    max
}

/// After a quoted run that started at `i` (just after the opening quote):
/// a doubled quote is the quote itself; with `backslash`, `\x` escapes.
fn skip_quoted(b: &[u8], mut i: usize, q: u8, backslash: bool) -> usize {
    while i < b.len() {
        if backslash && b[i] == b'\\' {
            i += 2;
            continue;
        }
        if b[i] == q {
            if b.get(i + 1) == Some(&q) {
                i += 2;
                continue;
            }
            return i + 1;
        }
        i += 1;
    }
    b.len()
}

fn skip_block_comment(b: &[u8], mut i: usize) -> usize {
    // comments nest in PostgreSQL
    let mut depth = 0;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            depth += 1;
            i += 2;
        } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return i;
            }
        } else {
            i += 1;
        }
    }
    b.len()
}

/// The end of a prefixed string literal starting at `i`, if there is one.
fn prefixed_string(b: &[u8], i: usize) -> Option<usize> {
    let c = b[i].to_ascii_uppercase();
    match c {
        b'E' if b.get(i + 1) == Some(&b'\'') => Some(skip_quoted(b, i + 2, b'\'', true)),
        b'B' | b'X' | b'N' if b.get(i + 1) == Some(&b'\'') => {
            Some(skip_quoted(b, i + 2, b'\'', false))
        }
        b'U' if b.get(i + 1) == Some(&b'&') && b.get(i + 2) == Some(&b'\'') => {
            Some(skip_quoted(b, i + 3, b'\'', false))
        }
        _ => None,
    }
}

/// `$tag$` starting at `i`: the end of the opening tag.
fn dollar_tag(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    if b.get(j).is_some_and(|c| c.is_ascii_digit()) {
        return None;
    }
    while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] >= 0x80) {
        j += 1;
    }
    (b.get(j) == Some(&b'$')).then_some(j + 1)
}

fn find(b: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || from > b.len() {
        return None;
    }
    b[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| from + p)
}

fn skip_number(b: &[u8], mut i: usize) -> usize {
    // 12, 1.5, .5, 1e-3, 0x1F, 1_000
    if b[i] == b'0' && matches!(b.get(i + 1), Some(b'x' | b'X' | b'o' | b'O' | b'b' | b'B')) {
        i += 2;
        while i < b.len() && (b[i].is_ascii_hexdigit() || b[i] == b'_') {
            i += 1;
        }
        return i;
    }
    while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'_') {
        i += 1;
    }
    if b.get(i) == Some(&b'.') && b.get(i + 1) != Some(&b'.') {
        i += 1;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        let mut j = i + 1;
        if matches!(b.get(j), Some(b'+' | b'-')) {
            j += 1;
        }
        if b.get(j).is_some_and(u8::is_ascii_digit) {
            i = j;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
        }
    }
    i
}

#[cfg(test)]
mod tests {
    use super::{normalize_sql, normalize_sql_with, scrub_pg_context, scrub_pg_detail};

    fn n(s: &str) -> String {
        normalize_sql(s, 10_000)
    }

    #[test]
    fn constants_become_parameters() {
        assert_eq!(
            n("INSERT INTO users(email, age) VALUES ('bob@example.com', 42)"),
            "INSERT INTO users(email, age) VALUES ($1, $2)"
        );
        assert_eq!(
            n("SELECT * FROM t WHERE a = $1 AND b = 'x''y' AND c = 1.5e-3"),
            "SELECT * FROM t WHERE a = $1 AND b = $2 AND c = $3"
        );
        assert_eq!(n("select E'a\\'b', x'1F', b'01', U&'d\\0061t', N'n'"), "select $1, $2, $3, $4, $5");
        assert_eq!(n("SELECT $fn$ secret body $fn$, $$ more $$"), "SELECT $1, $2");
        assert_eq!(n("SELECT .5, -7, 0x1F"), "SELECT $1, -$2, $3");
        assert_eq!(n("SELECT '2026-01-01'::date"), "SELECT $1::date");
    }

    #[test]
    fn identifiers_keywords_and_comments() {
        assert_eq!(n("SELECT t1.col2 FROM \"Table 3\" t1"), "SELECT t1.col2 FROM \"Table 3\" t1");
        assert_eq!(n("SELECT 1 -- password 'hunter2'\n FROM x"), "SELECT $1 FROM x");
        assert_eq!(n("SELECT /* a /* nested */ 'b' */ c"), "SELECT c");
        assert_eq!(n("SELECT   a,\n\t b"), "SELECT a, b");
        assert_eq!(n("SELECT data->>'k' ? 'x'"), "SELECT data->>$1 ? $2");
    }

    #[test]
    fn review_bypasses() {
        // a dollar quote right after a number or a parameter
        assert_eq!(n("SELECT 1$$secret$$"), "SELECT $1$2");
        assert_eq!(n("SELECT $1$$secret$$"), "SELECT $1$2");
        // an identifier may hold $ and digits
        assert_eq!(n("SELECT a$b1, x2 FROM t"), "SELECT a$b1, x2 FROM t");
        // standard_conforming_strings off: a backslash escapes the quote
        assert_eq!(normalize_sql_with("WHERE pw = 'it\\'s hunter2'", 1000, false), "WHERE pw = $1");
        assert_eq!(normalize_sql_with("WHERE pw = 'a\\' || 'b'", 1000, true), "WHERE pw = $1 || $2");
    }

    #[test]
    fn nothing_of_an_unterminated_literal_is_kept() {
        assert_eq!(n("SELECT 'secret never closed"), "SELECT $1");
        assert_eq!(n("SELECT $q$ secret"), "SELECT $1");
        assert_eq!(n("SELECT 1 /* secret"), "SELECT $1");
        assert_eq!(n("SELECT E'\\"), "SELECT $1");
    }

    #[test]
    fn cut_on_a_character_boundary() {
        let s = format!("SELECT \"{}\"", "é".repeat(100));
        let out = normalize_sql(&s, 20);
        assert!(out.len() <= 20);
        assert!(out.starts_with("SELECT \""));
    }

    #[test]
    fn no_literal_byte_survives() {
        // every literal form, with a marker inside: the marker never survives
        let forms = [
            "'MARK'", "E'MA\\'RK'", "$$MARK$$", "$t$MARK$t$", "x'MARK'", "'MA''RK'",
            "U&'MARK'", "/*MARK*/", "--MARK\n",
        ];
        for f in forms {
            for pre in ["SELECT ", "SELECT a=", "SELECT (", "INSERT INTO t VALUES ("] {
                let out = n(&format!("{pre}{f} FROM t"));
                assert!(!out.contains("MARK") && !out.contains("RK"), "{pre}{f} -> {out}");
            }
        }
    }

    #[test]
    fn contexts_keep_frames_and_lose_data() {
        let ctx = "PL/pgSQL function inner_fn(integer) line 3 at RAISE\n\
                   SQL statement \"SELECT inner_fn(42, 'bob@example.com')\"\n\
                   PL/pgSQL function outer_fn(integer) line 4 at PERFORM\n\
                   SQL function \"wrap\" statement 1\n\
                   COPY orders, line 7: \"17,secret card 4111111111111111\"";
        assert_eq!(
            scrub_pg_context(ctx, 10_000),
            "PL/pgSQL function inner_fn(integer) line 3 at RAISE\n\
             SQL statement \"SELECT inner_fn($1, $2)\"\n\
             PL/pgSQL function outer_fn(integer) line 4 at PERFORM\n\
             SQL function \"wrap\" statement 1\n\
             COPY orders, line $1: …"
        );
    }

    #[test]
    fn details_lose_their_values() {
        assert_eq!(
            scrub_pg_detail("Key (email)=(bob@example.com) already exists."),
            "Key (email)=(…) already exists."
        );
        assert_eq!(
            scrub_pg_detail("Key (a, b)=(1, f(x)) is not present in table \"t\"."),
            "Key (a, b)=(…) is not present in table \"…\"."
        );
        assert_eq!(
            scrub_pg_detail("Failing row contains (1, -5, 4111 1111 1111 1111)."),
            "Failing row contains (…)."
        );
        assert_eq!(scrub_pg_detail("Key (k)=(never closed"), "Key (k)=(…");
        assert_eq!(
            scrub_pg_detail("Key (note)=(ok :) pin 1234) already exists."),
            "Key (note)=(…) already exists."
        );
        assert_eq!(
            scrub_pg_detail("Partition key of the failing row contains (email) = (bob@x.io)."),
            "Partition key of the failing row contains (…)."
        );
        assert_eq!(scrub_pg_detail("Token \"hunter2\" is invalid."), "Token \"…\" is invalid.");
        assert_eq!(scrub_pg_detail("no values here"), "no values here");
    }

    #[test]
    fn multi_line_sql_in_a_context_is_normalized_whole() {
        let ctx = "SQL statement \"INSERT INTO notes VALUES ('Hi\nmy password is hunter2')\"\n\
                   PL/pgSQL function f() line 3 at EXECUTE\n\
                   SQL statement \"SELECT 1 /* a\nsecret comment */\"";
        let out = scrub_pg_context(ctx, 10_000);
        assert!(!out.contains("hunter2") && !out.contains("secret"), "{out}");
        assert_eq!(
            out,
            "SQL statement \"INSERT INTO notes VALUES ($1)\"\n\
             PL/pgSQL function f() line 3 at EXECUTE\n\
             SQL statement \"SELECT $1\""
        );
    }
}
