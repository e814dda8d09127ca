//! Grouping quality: a corpus of realistic traces per language, property
//! tests, and robustness against hostile input.
use fraiseql_fingerprint::{default_fingerprint, normalize::normalize_message, stacktrace};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

struct Case {
    name: String,
    group: String,
    exception_type: String,
    message: String,
    trace: Option<String>,
}

fn corpus() -> Vec<Case> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut cases = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        let (head, trace) = text.split_once("\n---\n").unwrap_or((&text, ""));
        let mut exception_type = String::new();
        let mut message = String::new();
        for line in head.lines() {
            if let Some(v) = line.strip_prefix("type: ") {
                exception_type = v.to_string();
            } else if let Some(v) = line.strip_prefix("message: ") {
                message = v.to_string();
            }
        }
        let group = name.split("__").next().unwrap().to_string();
        let trace = if trace.trim().is_empty() {
            None
        } else {
            Some(trace.to_string())
        };
        cases.push(Case {
            name,
            group,
            exception_type,
            message,
            trace,
        });
    }
    cases.sort_by(|a, b| a.name.cmp(&b.name));
    cases
}

#[test]
fn corpus_groups_exactly_as_labelled() {
    let cases = corpus();
    assert!(cases.len() >= 25);
    let mut by_group: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for c in &cases {
        let fp = default_fingerprint(&c.exception_type, &c.message, c.trace.as_deref());
        by_group
            .entry(c.group.clone())
            .or_default()
            .push((c.name.clone(), fp));
    }
    // same label => same group
    for (group, members) in &by_group {
        let first = &members[0].1;
        for (name, fp) in members {
            assert_eq!(
                fp, first,
                "{name} should group with {} ({group})",
                members[0].0
            );
        }
    }
    // different labels => different groups
    let mut seen: BTreeMap<&String, &String> = BTreeMap::new();
    for (group, members) in &by_group {
        if let Some(other) = seen.insert(&members[0].1, group) {
            panic!("groups {group} and {other} share a fingerprint");
        }
    }
}

#[test]
fn every_language_of_the_corpus_is_recognized() {
    let expect = [
        ("py_", "python"),
        ("js_", "javascript"),
        ("java_", "java"),
        ("go_", "go"),
        ("rb_", "ruby"),
        ("dotnet_", "dotnet"),
        ("rust_", "rust"),
        ("php_", "php"),
        ("pg_", "postgresql"),
        ("text_", "unknown"),
    ];
    for c in corpus() {
        let Some(trace) = &c.trace else { continue };
        let (_, lang) = expect
            .iter()
            .find(|(p, _)| c.name.starts_with(p))
            .expect("prefix");
        let parsed = stacktrace::parse(trace);
        assert_eq!(parsed.language.name(), *lang, "{}", c.name);
        if *lang != "unknown" {
            assert!(
                parsed.frames.iter().any(|f| f.in_app),
                "{}: no in-app frame",
                c.name
            );
        }
    }
}

#[test]
fn exception_type_always_separates() {
    for c in corpus() {
        let a = default_fingerprint(&c.exception_type, &c.message, c.trace.as_deref());
        let b = default_fingerprint(
            &format!("{}X", c.exception_type),
            &c.message,
            c.trace.as_deref(),
        );
        assert_ne!(a, b, "{}", c.name);
    }
}

#[test]
fn culprits_are_the_failing_app_frame() {
    let want = [
        ("py_orders__deploy1", "parsing in parse_quantity"),
        ("js_cart__build1", "main.js in renderCart"),
        ("java_pay__a", "com.acme.pay.StripeClient in charge"),
        (
            "go_handler__a",
            "github.com/acme/shop/internal/orders in (*Service).Place",
        ),
        ("rb_user__ruby34", "user in save_with_audit"),
        ("dotnet_orders__a", "Acme.Orders.OrderService in PlaceAsync"),
        ("rust_handler__a", "shop::handlers::orders in create_order"),
        ("php_invoice__a", "App\\Billing\\InvoiceService in pay"),
        // the raising function, not its caller; no schema, whatever the search_path
        ("pg_order__a", "plpgsql in validate_quantity(integer)"),
        ("pg_order__b", "plpgsql in validate_quantity(integer)"),
        ("pg_trigger__a", "plpgsql in audit_orders()"),
        ("pg_sqlfn__a", "sql in order_total"),
        ("pg_do__a", "plpgsql in DO block"),
    ];
    let cases = corpus();
    for (name, culprit) in want {
        let c = cases.iter().find(|c| c.name == name).unwrap();
        let p = stacktrace::parse(c.trace.as_deref().unwrap());
        let f = p.culprit().unwrap();
        assert_eq!(format!("{} in {}", f.module, f.function), culprit, "{name}");
    }
}

#[test]
fn postgres_contexts_become_frames() {
    let t = "PL/pgSQL function \"Odd Name\"(integer) line 3 at RAISE\n\
             SQL statement \"SELECT \"Odd Name\"(1)\"\n\
             PL/pgSQL function app.\"dotted.name\"(text[],uuid) line 17 at PERFORM\n\
             SQL function \"total\" statement 2\n\
             PL/pgSQL function inline_code_block line 5 at SQL statement\n\
             PL/pgSQL function f(integer) while storing call arguments into local variables";
    let p = stacktrace::parse(t);
    assert_eq!(p.language.name(), "postgresql");
    let got: Vec<(String, String, Option<u32>)> = p
        .frames
        .iter()
        .map(|f| (f.module.to_string(), f.function.to_string(), f.line))
        .collect();
    let want = [
        ("plpgsql", "\"Odd Name\"(integer)", Some(3)),
        ("plpgsql", "\"dotted.name\"(text[],uuid)", Some(17)),
        ("sql", "total", Some(2)),
        ("plpgsql", "DO block", Some(5)),
        ("plpgsql", "f(integer)", None),
    ];
    let want: Vec<(String, String, Option<u32>)> = want
        .iter()
        .map(|(m, f, l)| (m.to_string(), f.to_string(), *l))
        .collect();
    assert_eq!(got, want);
    // the raising function is the culprit
    assert_eq!(p.culprit().unwrap().function, "\"Odd Name\"(integer)");
    // cut lines are no frames and no panic
    for cut in [
        "PL/pgSQL function f(integer",
        "PL/pgSQL function \"open",
        "SQL function \"open",
        "PL/pgSQL function ",
    ] {
        let _ = stacktrace::parse(cut);
    }
}

// ---------------------------------------------------------------------------
// properties
// ---------------------------------------------------------------------------

fn ident() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9_]{0,12}"
}

#[derive(Debug, Clone)]
struct GenFrame {
    module: String,
    function: String,
}

fn frames() -> impl Strategy<Value = Vec<GenFrame>> {
    prop::collection::vec(
        (ident(), ident()).prop_map(|(module, function)| GenFrame { module, function }),
        1..12,
    )
}

fn python_trace(frames: &[GenFrame], lines: &[u32]) -> String {
    let mut s = String::from("Traceback (most recent call last):\n");
    for (f, l) in frames.iter().zip(lines.iter().cycle()) {
        s.push_str(&format!(
            "  File \"/srv/app/{}.py\", line {}, in {}\n    code()\n",
            f.module, l, f.function
        ));
    }
    s.push_str("ValueError: x\n");
    s
}

fn java_trace(frames: &[GenFrame], lines: &[u32]) -> String {
    let mut s = String::from("com.acme.Boom: x\n");
    for (f, l) in frames.iter().zip(lines.iter().cycle()) {
        s.push_str(&format!(
            "\tat com.acme.{}.Svc.{}(Svc.java:{})\n",
            f.module, f.function, l
        ));
    }
    s
}

fn js_trace(frames: &[GenFrame], lines: &[u32]) -> String {
    let mut s = String::from("Error: x\n");
    for (f, l) in frames.iter().zip(lines.iter().cycle()) {
        s.push_str(&format!(
            "    at {} (/app/src/{}.js:{}:{})\n",
            f.function,
            f.module,
            l,
            l % 80 + 1
        ));
    }
    s
}

fn go_trace(frames: &[GenFrame], lines: &[u32]) -> String {
    let mut s = String::from("panic: x\n\ngoroutine 1 [running]:\n");
    for (f, l) in frames.iter().zip(lines.iter().cycle()) {
        s.push_str(&format!(
            "github.com/acme/{}.{}(0xc000{:x})\n\t/src/{}.go:{} +0x{:x}\n",
            f.module,
            f.function,
            l,
            f.module,
            l,
            l * 3
        ));
    }
    s
}

/// A PostgreSQL error CONTEXT: innermost first, each frame after the
/// statement its caller ran.
fn pg_trace(frames: &[GenFrame], lines: &[u32]) -> String {
    let mut s = String::new();
    for (i, (f, l)) in frames.iter().zip(lines.iter().cycle()).enumerate() {
        if i > 0 {
            s.push_str(&format!(
                "SQL statement \"SELECT {}_{}($1, {l})\"\n",
                f.module, f.function
            ));
        }
        s.push_str(&format!(
            "PL/pgSQL function {}_{}(integer,text) line {l} at {}\n",
            f.module,
            f.function,
            if i == 0 { "RAISE" } else { "PERFORM" }
        ));
    }
    s
}

type Builder = fn(&[GenFrame], &[u32]) -> String;
const BUILDERS: [Builder; 5] = [python_trace, java_trace, js_trace, go_trace, pg_trace];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn line_numbers_never_change_the_fingerprint(
        fs in frames(),
        a in prop::collection::vec(1u32..100_000, 1..12),
        b in prop::collection::vec(1u32..100_000, 1..12),
        which in 0usize..5,
    ) {
        let build = BUILDERS[which];
        prop_assert_eq!(
            default_fingerprint("E", "m", Some(&build(&fs, &a))),
            default_fingerprint("E", "m", Some(&build(&fs, &b)))
        );
    }

    #[test]
    fn renaming_an_in_app_function_always_changes_it(
        fs in frames(),
        lines in prop::collection::vec(1u32..1000, 1..12),
        victim in any::<prop::sample::Index>(),
        which in 0usize..5,
    ) {
        let build = BUILDERS[which];
        let mut renamed = fs.clone();
        let i = victim.index(renamed.len());
        renamed[i].function.push_str("_renamed");
        prop_assert_ne!(
            default_fingerprint("E", "m", Some(&build(&fs, &lines))),
            default_fingerprint("E", "m", Some(&build(&renamed, &lines)))
        );
    }

    #[test]
    fn numbers_in_messages_never_split(words in prop::collection::vec("[a-z]{1,8}", 1..6), n1 in any::<i64>(), n2 in any::<i64>()) {
        let text = words.join(" ");
        prop_assert_eq!(
            default_fingerprint("E", &format!("{text} {n1} end"), None),
            default_fingerprint("E", &format!("{text} {n2} end"), None)
        );
    }

    #[test]
    fn arbitrary_text_never_panics(s in ".{0,2000}") {
        let _ = stacktrace::parse(&s);
        let _ = normalize_message(&s);
        let _ = default_fingerprint("E", &s, Some(&s));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..4000)) {
        let s = String::from_utf8_lossy(&bytes);
        let _ = default_fingerprint("E", &s, Some(&s));
    }

    #[test]
    fn fingerprints_are_stable(s in ".{0,300}") {
        prop_assert_eq!(default_fingerprint("E", &s, Some(&s)), default_fingerprint("E", &s, Some(&s)));
    }
}

// ---------------------------------------------------------------------------
// hostile input: completes (in linear time: these would take minutes if any
// step were quadratic), no panic
// ---------------------------------------------------------------------------

#[test]
fn ten_megabytes_of_trace() {
    let frame = "  File \"/srv/app/views.py\", line 10, in handler\n    x()\n";
    let trace = format!(
        "Traceback (most recent call last):\n{}ValueError: x",
        frame.repeat(10 * 1024 * 1024 / frame.len())
    );
    let fp = default_fingerprint("ValueError", "x", Some(&trace));
    // recursion collapses: same group as a single frame
    let one = format!("Traceback (most recent call last):\n{frame}ValueError: x");
    assert_eq!(fp, default_fingerprint("ValueError", "x", Some(&one)));
}

#[test]
fn hundred_thousand_distinct_frames() {
    let mut trace = String::from("Error: x\n");
    for i in 0..100_000 {
        trace.push_str(&format!("    at fn{i} (/app/src/m{i}.js:{i}:1)\n"));
    }
    let p = stacktrace::parse(&trace);
    assert_eq!(p.frames.len(), 100_000);
    let _ = default_fingerprint("Error", "x", Some(&trace));
}

#[test]
fn deeply_nested_cause_chain() {
    let mut trace = String::from("com.acme.Top: x\n\tat com.acme.A.a(A.java:1)\n");
    for i in 0..20_000 {
        trace.push_str(&format!(
            "Caused by: com.acme.E{i}: nested\n\tat com.acme.B.b{i}(B.java:{i})\n\t... 1 more\n"
        ));
    }
    let p = stacktrace::parse(&trace);
    assert_eq!(p.language.name(), "java");
    assert_eq!(p.frames.len(), 20_001);
}

#[test]
fn pathological_messages_are_linear() {
    for unit in [
        "a.", "1,", "a@", "1.", "a:", "0x", "[:", "-1", "é.", "=\"", "ab-", "1e",
    ] {
        let s = unit.repeat(2_000_000 / unit.len());
        let _ = normalize_message(&s);
        let _ = default_fingerprint("E", &s, Some(&s));
    }
}

#[test]
fn binary_garbage() {
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let bytes: Vec<u8> = (0..5_000_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let s = String::from_utf8_lossy(&bytes);
    let _ = default_fingerprint("E", &s, Some(&s));
}
