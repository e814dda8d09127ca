//! Stack trace parsing for the common languages' text formats.
//!
//! Each language has a line matcher. Detection counts which matcher
//! recognizes the most lines; the trace is then parsed with that one. Only
//! what grouping needs is kept: the module (or file basename) and the
//! normalized function of each frame, whether it is application code, and the
//! line number for display. Every step is a scan over the input: linear time,
//! no regex back-tracking, no recursion.

use crate::faststr::FastStr;
use serde::Serialize;
use std::borrow::Cow;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    Python,
    JavaScript,
    Java,
    Go,
    Ruby,
    DotNet,
    Rust,
    Php,
    /// PostgreSQL's error CONTEXT (PL/pgSQL and SQL functions, triggers, DO blocks)
    Postgres,
    Unknown,
}

impl Language {
    pub fn name(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::JavaScript => "javascript",
            Language::Java => "java",
            Language::Go => "go",
            Language::Ruby => "ruby",
            Language::DotNet => "dotnet",
            Language::Rust => "rust",
            Language::Php => "php",
            Language::Postgres => "postgresql",
            Language::Unknown => "unknown",
        }
    }

    /// Whether the language prints the innermost (failing) frame last.
    fn innermost_last(self) -> bool {
        matches!(self, Language::Python)
    }
}

/// One frame; the strings borrow from the trace unless normalization changed them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Frame<'a> {
    pub module: Cow<'a, str>,
    pub function: Cow<'a, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    pub in_app: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ParsedTrace<'a> {
    pub language: Language,
    pub frames: Vec<Frame<'a>>,
}

const LANGS: [Language; 9] = [
    Language::Python,
    Language::Java,
    Language::DotNet,
    Language::JavaScript,
    Language::Go,
    Language::Ruby,
    Language::Rust,
    Language::Php,
    Language::Postgres,
];

/// Parse a stack trace. Text in no known format yields no frames.
/// Lines looked at to recognize the language; a trace is in one language,
/// so its head decides (the whole text is used when the head has no frame).
const DETECT_LINES: usize = 40;

pub fn parse(trace: &str) -> ParsedTrace<'_> {
    let lines: Vec<&str> = trace.lines().collect();
    if lines.len() <= DETECT_LINES {
        let (language, frames) = detect(&lines);
        return ParsedTrace { language, frames };
    }
    let (mut language, _) = detect(&lines[..DETECT_LINES]);
    if language == Language::Unknown {
        language = detect(&lines).0;
    }
    ParsedTrace {
        language,
        frames: parse_as(language, &lines),
    }
}

/// The language whose matcher recognizes the most lines, with its frames.
fn detect<'a>(lines: &[&'a str]) -> (Language, Vec<Frame<'a>>) {
    let mut best = (Language::Unknown, 0usize, Vec::new());
    for lang in LANGS {
        let frames = parse_as(lang, lines);
        // a Rust frame is a numbered symbol line plus an "at file:line"
        // line, which the JavaScript matcher would also claim: weigh it double
        let score = if lang == Language::Rust {
            2 * frames.len()
        } else {
            frames.len()
        };
        if score > best.1 {
            best = (lang, score, frames);
        }
    }
    (best.0, best.2)
}

fn parse_as<'a>(lang: Language, lines: &[&'a str]) -> Vec<Frame<'a>> {
    match lang {
        Language::Unknown => Vec::new(),
        Language::Go => parse_go(lines),
        Language::Rust => parse_rust(lines),
        _ => lines.iter().filter_map(|l| parse_line(lang, l)).collect(),
    }
}

fn parse_line(lang: Language, line: &str) -> Option<Frame<'_>> {
    match lang {
        Language::Python => python_frame(line),
        Language::Java => java_frame(line),
        Language::DotNet => dotnet_frame(line),
        Language::JavaScript => js_frame(line),
        Language::Ruby => ruby_frame(line),
        Language::Php => php_frame(line),
        Language::Postgres => postgres_frame(line),
        _ => None,
    }
}

impl<'a> ParsedTrace<'a> {
    /// Frames that grouping uses: the in-app frames when there are any (else
    /// all), with directly repeated frames (recursion) collapsed.
    pub fn grouping_frames(&self) -> Vec<&Frame<'a>> {
        let any_in_app = self.frames.iter().any(|f| f.in_app);
        let mut out: Vec<&Frame<'a>> = Vec::new();
        for f in self.frames.iter().filter(|f| f.in_app || !any_in_app) {
            if let Some(last) = out.last() {
                if last.module == f.module && last.function == f.function {
                    continue;
                }
            }
            out.push(f);
        }
        out
    }

    /// The frame where the error happened: the innermost in-app frame.
    pub fn culprit(&self) -> Option<&Frame<'a>> {
        let mut in_app = self.frames.iter().filter(|f| f.in_app);
        if self.language.innermost_last() {
            in_app.next_back().or_else(|| self.frames.last())
        } else {
            in_app.next().or_else(|| self.frames.first())
        }
    }
}

// ---------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------

/// Last path component, without a query string or fragment.
fn basename(path: &str) -> &str {
    let path = path.split(['?', '#']).next().unwrap_or(path);
    path.rsplit(['/', '\\']).next().unwrap_or(path)
}

fn strip_ext<'a>(name: &'a str, exts: &[&str]) -> &'a str {
    for e in exts {
        if let Some(s) = name.strip_suffix(e) {
            if !s.is_empty() {
                return s;
            }
        }
    }
    name
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit())
}

/// "file:line:col" / "file:line" -> (file, line)
fn split_location(loc: &str) -> (&str, Option<u32>) {
    let mut file = loc;
    let mut line = None;
    for _ in 0..2 {
        match file.rsplit_once(':') {
            Some((f, n)) if all_digits(n) => {
                line = n.parse().ok();
                file = f;
            }
            _ => break,
        }
    }
    (file, line)
}

/// Whether a dot/dash separated piece of a file name looks like a content hash.
fn looks_like_hash(piece: &str) -> bool {
    let n = piece.len();
    if n < 6 {
        return false;
    }
    let digits = piece.bytes().filter(|c| c.is_ascii_digit()).count();
    let hex = piece.bytes().all(|c| c.is_ascii_hexdigit());
    (hex && digits > 0)
        || (n >= 8
            && digits > 0
            && piece.bytes().all(|c| c.is_ascii_alphanumeric())
            && digits * 4 >= n)
}

/// main.3f2a9c1b.js, chunk-ABCD1234.js, app-3f2a1b9c.min.js -> main.js, chunk.js, app.min.js
fn normalize_js_file(file: &str) -> Cow<'_, str> {
    let base = basename(file);
    let is_sep = |c: char| c == '.' || c == '-' || c == '_';
    if !base.split(is_sep).any(looks_like_hash) {
        return Cow::Borrowed(base);
    }
    // drop hash pieces together with the separator that precedes them
    let mut out = String::with_capacity(base.len());
    let mut start = 0;
    let mut sep: Option<char> = None;
    for (i, c) in base
        .char_indices()
        .chain(std::iter::once((base.len(), '.')))
    {
        if i == base.len() || is_sep(c) {
            let piece = &base[start..i];
            if !looks_like_hash(piece) {
                if !out.is_empty() {
                    if let Some(sc) = sep {
                        out.push(sc);
                    }
                }
                out.push_str(piece);
            }
            sep = Some(c);
            start = i + c.len_utf8();
        }
    }
    Cow::Owned(out)
}

// ---------------------------------------------------------------------------
// Python:   File "/srv/app/x.py", line 42, in handler
// ---------------------------------------------------------------------------
fn python_frame(line: &str) -> Option<Frame<'_>> {
    let t = line.trim_start();
    let rest = t.strip_prefix("File \"")?;
    let (path, rest) = rest.fsplit_once("\", line ")?;
    let (num, rest) = rest.fsplit_once(", in ").unwrap_or((rest.trim(), "?"));
    let lineno: u32 = num.trim().parse().ok()?;
    let function = Cow::Borrowed(rest.trim());
    let lib = path.fcontains("site-packages/")
        || path.fcontains("dist-packages/")
        || path.fcontains("site-packages\\")
        || path.starts_with('<')
        || is_python_stdlib(path);
    let module = if let Some(i) = path.ffind("-packages/") {
        Cow::Owned(strip_ext(&path[i + "-packages/".len()..], &[".py"]).replace('/', "."))
    } else {
        Cow::Borrowed(strip_ext(basename(path), &[".py", ".pyx"]))
    };
    Some(Frame {
        module,
        function,
        file: Some(path),
        line: Some(lineno),
        in_app: !lib,
    })
}

fn is_python_stdlib(path: &str) -> bool {
    // /usr/lib/python3.11/x.py, /usr/local/lib/python3.12/x.py, ...\Lib\x.py
    if let Some(i) = path.ffind("/lib/python") {
        let rest = &path[i + "/lib/python".len()..];
        let ver = rest.split('/').next().unwrap_or("");
        return ver.chars().all(|c| c.is_ascii_digit() || c == '.')
            && !rest.fcontains("site-packages");
    }
    path.fcontains("\\Lib\\") && !path.fcontains("site-packages")
}

// ---------------------------------------------------------------------------
// JavaScript: V8 "    at fn (file:1:2)" / "    at file:1:2"; Firefox/Safari "fn@file:1:2"
// ---------------------------------------------------------------------------
fn js_frame(line: &str) -> Option<Frame<'_>> {
    let t = line.trim();
    let (func, loc) = if let Some(rest) = t.strip_prefix("at ") {
        if let Some(body) = rest.strip_suffix(')') {
            let (f, l) = body.fsplit_once(" (")?;
            // a Java/.NET frame has no space before '(' and no :col
            (f, l)
        } else {
            ("", rest.strip_prefix("async ").unwrap_or(rest))
        }
    } else if let Some((f, l)) = t.rsplit_once('@') {
        if f.contains(' ') && !f.fcontains("/<") {
            return None;
        }
        (f, l)
    } else {
        return None;
    };
    let loc = loc.trim();
    // "eval at fn (file:1:2), <anonymous>:3:4" -> use the outer location
    let loc = loc.fsplit_once(", ").map(|(a, _)| a).unwrap_or(loc);
    let loc = loc
        .strip_prefix("eval at ")
        .map(|s| s.split(" (").nth(1).unwrap_or(s))
        .unwrap_or(loc);
    let (file, lineno) = split_location(loc.trim_end_matches(')'));
    if lineno.is_none() && file != "native" && file != "<anonymous>" {
        return None;
    }
    let lib = file.fcontains("node_modules")
        || file.starts_with("node:")
        || file.starts_with("internal/")
        || file == "native"
        || file == "<anonymous>";
    Some(Frame {
        module: normalize_js_file(file),
        function: normalize_js_function(func),
        file: Some(file),
        line: lineno,
        in_app: !lib,
    })
}

fn normalize_js_function(f: &str) -> Cow<'_, str> {
    let mut f = f.trim();
    for p in ["async ", "new "] {
        if let Some(r) = f.strip_prefix(p) {
            f = r.trim();
        }
    }
    // "Object.method [as alias]"
    if let Some((head, _)) = f.fsplit_once(" [as ") {
        f = head;
    }
    // Firefox: "outer/inner<", "fn/<"
    let mut f = f;
    while let Some(x) = f.strip_suffix("/<") {
        f = x;
    }
    let f = f.trim_end_matches('<');
    let f = f.strip_prefix("Object.").unwrap_or(f);
    if f.is_empty() || f == "<anonymous>" || f == "Object.<anonymous>" {
        Cow::Borrowed("<anonymous>")
    } else {
        Cow::Borrowed(f)
    }
}

// ---------------------------------------------------------------------------
// Java / JVM:  "\tat com.acme.Foo.bar(Foo.java:42)"
// ---------------------------------------------------------------------------
const JVM_LIBRARY_PREFIXES: &[&str] = &[
    "java.",
    "javax.",
    "jakarta.",
    "jdk.",
    "sun.",
    "com.sun.",
    "kotlin.",
    "kotlinx.",
    "scala.",
    "groovy.",
    "org.codehaus.groovy.",
    "org.springframework.",
    "org.apache.",
    "org.hibernate.",
    "io.netty.",
    "com.fasterxml.",
    "org.junit.",
    "junit.",
    "reactor.",
    "io.reactivex.",
    "okhttp3.",
    "com.google.",
    "org.eclipse.jetty.",
    "io.micronaut.",
    "io.quarkus.",
    "io.vertx.",
    "akka.",
    "org.glassfish.",
    "com.zaxxer.",
    "org.postgresql.",
    "org.slf4j.",
    "ch.qos.logback.",
];

fn java_frame(line: &str) -> Option<Frame<'_>> {
    let t = line.trim();
    let rest = t.strip_prefix("at ")?;
    let body = rest.strip_suffix(')')?;
    let (qual, loc) = body.split_once('(')?;
    if qual.contains(' ') || loc.contains('(') {
        return None;
    }
    let is_jvm_loc = loc == "Native Method"
        || loc == "Unknown Source"
        || loc.starts_with("Unknown Source")
        || [".java:", ".kt:", ".scala:", ".groovy:", ".clj:"]
            .iter()
            .any(|e| loc.fcontains(e))
        || [".java", ".kt", ".scala", ".groovy"]
            .iter()
            .any(|e| loc.as_bytes().ends_with(e.as_bytes()));
    if !is_jvm_loc {
        return None;
    }
    // strip class loader / module prefixes: "app//", "java.base/", "java.base@17/"
    let qual = qual.rsplit('/').next().unwrap_or(qual);
    let (class, method) = qual.rsplit_once('.')?;
    let lineno = loc.rsplit_once(':').and_then(|(_, n)| n.parse().ok());
    let class = normalize_jvm_class(class);
    let lib = JVM_LIBRARY_PREFIXES
        .iter()
        .any(|p| class.as_bytes().starts_with(p.as_bytes()))
        || class.fcontains("$$Lambda")
        || class.fcontains("GeneratedMethodAccessor")
        || class.fcontains("GeneratedConstructorAccessor")
        || class.starts_with("$Proxy")
        || class.fcontains(".$Proxy");
    Some(Frame {
        module: class,
        function: normalize_jvm_method(method),
        file: Some(loc.split(':').next().unwrap_or(loc)),
        line: lineno,
        in_app: !lib,
    })
}

/// Generated-class noise carries a per-run hash or counter: CGLIB / ByteBuddy /
/// javassist proxies ("Svc$$EnhancerBySpringCGLIB$$1a2b3c", "Svc_$$_jvst12_0",
/// "Svc$HibernateProxy$Xyz"), lambdas ("Svc$$Lambda$123/0x0000"), reflection
/// accessors ("GeneratedMethodAccessor57"), JDK proxies ("$Proxy12"). Everything
/// from the generated marker on is dropped, so a proxy frame reads as its class.
fn normalize_jvm_class(class: &str) -> Cow<'_, str> {
    let b = class.as_bytes();
    if !b.contains(&b'$') && !class.fcontains("Generated") {
        return Cow::Borrowed(class);
    }
    let mut end = class.len();
    for marker in ["$$", "$HibernateProxy$", "$ByteBuddy$", "$MockitoMock$"] {
        if let Some(i) = class[..end].ffind(marker) {
            end = i;
        }
    }
    let mut c = class[..end].trim_end_matches('_');
    if c.is_empty() {
        c = class;
    }
    // GeneratedMethodAccessor57, $Proxy12: drop the counter
    if c.fcontains("Generated") || c.fcontains("$Proxy") {
        c = c.trim_end_matches(|ch: char| ch.is_ascii_digit());
    }
    Cow::Borrowed(c)
}

fn normalize_jvm_method(m: &str) -> Cow<'_, str> {
    // lambda$handle$3 -> lambda$handle ; access$000 -> access
    if m.starts_with("lambda$") {
        return Cow::Borrowed(
            m.trim_end_matches(|c: char| c.is_ascii_digit())
                .trim_end_matches('$'),
        );
    }
    if m.starts_with("access$") {
        return Cow::Borrowed("access");
    }
    Cow::Borrowed(m)
}

// ---------------------------------------------------------------------------
// .NET:  "   at Acme.Orders.Service.Place(Order o) in /src/Service.cs:line 42"
// ---------------------------------------------------------------------------
const DOTNET_LIBRARY_PREFIXES: &[&str] = &[
    "System.",
    "Microsoft.",
    "Newtonsoft.",
    "Npgsql.",
    "Dapper.",
    "Serilog.",
    "NUnit.",
    "Xunit.",
    "Castle.",
    "Polly.",
    "MediatR.",
    "AutoMapper.",
    "Grpc.",
    "StackExchange.",
];

fn dotnet_frame(line: &str) -> Option<Frame<'_>> {
    let t = line.trim();
    let rest = t.strip_prefix("at ")?;
    let (sig, loc) = match rest.ffind(") in ") {
        Some(i) => (&rest[..i + 1], Some(&rest[i + ") in ".len()..])),
        None => (rest, None),
    };
    let open = sig.find('(')?;
    if !sig.ends_with(')') {
        return None;
    }
    let qual = &sig[..open];
    let args = &sig[open + 1..sig.len() - 1];
    if qual.contains(' ') {
        return None;
    }
    // A JVM frame has "File.java:N" in the parens; .NET has typed args or nothing.
    if loc.is_none()
        && (args.fcontains(".java")
            || args.fcontains(".kt")
            || args == "Native Method"
            || args.starts_with("Unknown Source")
            || args.contains(':'))
    {
        return None;
    }
    if loc.is_none() && !args.is_empty() && !args.contains(' ') {
        return None;
    }
    let (file, lineno) = match loc {
        Some(l) => match l.frsplit_once(":line ") {
            Some((f, n)) => (Some(f), n.trim().parse().ok()),
            None => (Some(l), None),
        },
        None => (None, None),
    };
    let (module, function) = split_dotnet_qual(qual);
    let lib = DOTNET_LIBRARY_PREFIXES
        .iter()
        .any(|p| module.as_bytes().starts_with(p.as_bytes()));
    Some(Frame {
        module,
        function,
        file,
        line: lineno,
        in_app: !lib,
    })
}

/// "Ns.Class.<DoAsync>d__5.MoveNext" -> ("Ns.Class", "DoAsync");
/// "Ns.Class.<>c__DisplayClass3_0.<Run>b__0" -> ("Ns.Class", "Run");
/// "Ns.Class.Method" -> ("Ns.Class", "Method")
fn split_dotnet_qual(qual: &str) -> (Cow<'_, str>, Cow<'_, str>) {
    if qual.as_bytes().iter().any(|&c| c == b'`' || c == b'[') {
        // generic arity and type arguments: List`1[T] -> List
        let mut q = String::with_capacity(qual.len());
        let mut depth = 0i32;
        let mut chars = qual.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                '`' if depth == 0 => {
                    while chars.peek().is_some_and(|d| d.is_ascii_digit()) {
                        chars.next();
                    }
                }
                _ if depth == 0 => q.push(c),
                _ => {}
            }
        }
        let (m, f) = split_dotnet_plain(&q);
        return (Cow::Owned(m.to_string()), Cow::Owned(f.to_string()));
    }
    let (m, f) = split_dotnet_plain(qual);
    (Cow::Borrowed(m), Cow::Borrowed(f))
}

fn split_dotnet_plain(q: &str) -> (&str, &str) {
    // compiler-generated parts start with '<': the module ends before the first
    // one, the function is the first name written between '<' and '>'
    if let Some(i) = q.ffind(".<") {
        let module = &q[..i];
        let rest = &q[i + 1..];
        let mut from = 0;
        while let Some(lt) = rest[from..].find('<').map(|k| from + k) {
            let after = &rest[lt + 1..];
            if !after.starts_with(['<', '>']) {
                if let Some(gt) = after.find('>') {
                    return (module, &after[..gt]);
                }
            }
            from = lt + 1;
        }
        return (module, rest.rsplit('.').next().unwrap_or(rest));
    }
    match q.rsplit_once('.') {
        Some((m, f)) => (m, f),
        None => ("", q),
    }
}

// ---------------------------------------------------------------------------
// Ruby:  "/app/models/user.rb:42:in `save'"  (<= 3.3)
//        "/app/models/user.rb:42:in 'User#save'"  (3.4)
// ---------------------------------------------------------------------------
fn ruby_frame(line: &str) -> Option<Frame<'_>> {
    let t = line.trim();
    let t = t.strip_prefix("from ").unwrap_or(t);
    let (loc, label) = t.fsplit_once(":in ")?;
    let (file, lineno) = loc.rsplit_once(':')?;
    let lineno: u32 = lineno.parse().ok()?;
    if !(file.ends_with(".rb")
        || file.ends_with(".rake")
        || file.starts_with("<internal:")
        || file.ends_with(".erb"))
    {
        return None;
    }
    let label = label
        .trim()
        .trim_start_matches(['`', '\''])
        .trim_end_matches('\'');
    let lib = file.fcontains("/gems/")
        || file.fcontains("/rubygems")
        || file.fcontains("/vendor/bundle/")
        || file.starts_with("<internal:")
        || file.fcontains("/lib/ruby/");
    Some(Frame {
        module: Cow::Borrowed(strip_ext(basename(file), &[".rb", ".rake", ".erb"])),
        function: normalize_ruby_label(label),
        file: Some(file),
        line: Some(lineno),
        in_app: !lib,
    })
}

/// "block (2 levels) in User#save" -> "block in save"; "User.find" -> "find";
/// "<class:User>" kept. Ruby 3.4 labels carry the class, older ones do not:
/// only the method name is kept so an upgrade does not split groups.
fn normalize_ruby_label(label: &str) -> Cow<'_, str> {
    let mut prefix = String::new();
    let mut rest = label;
    loop {
        if let Some(r) = rest.strip_prefix("block ") {
            let r = match r.strip_prefix('(') {
                Some(x) => x.fsplit_once(") ").map(|(_, y)| y).unwrap_or(x),
                None => r,
            };
            prefix.push_str("block ");
            rest = r.strip_prefix("in ").unwrap_or(r);
            prefix.push_str("in ");
            continue;
        }
        for p in ["rescue in ", "ensure in "] {
            if let Some(r) = rest.strip_prefix(p) {
                prefix.push_str(p);
                rest = r;
            }
        }
        break;
    }
    let name = if rest.starts_with('<') {
        rest
    } else {
        rest.rsplit(['#', '.']).next().unwrap_or(rest)
    };
    if prefix.is_empty() {
        Cow::Borrowed(name)
    } else {
        Cow::Owned(format!("{prefix}{name}"))
    }
}

// ---------------------------------------------------------------------------
// PHP:  "#0 /var/www/src/Foo.php(42): App\Foo->bar('x')"
// ---------------------------------------------------------------------------
fn php_frame(line: &str) -> Option<Frame<'_>> {
    let t = line.trim();
    let rest = t.strip_prefix('#')?;
    let (num, rest) = rest.split_once(' ')?;
    if !all_digits(num) {
        return None;
    }
    if rest == "{main}" {
        return Some(Frame {
            module: Cow::Borrowed("{main}"),
            function: Cow::Borrowed("{main}"),
            file: None,
            line: None,
            in_app: false,
        });
    }
    let (loc, call) = rest.fsplit_once(": ")?;
    let (file, lineno) = if loc == "[internal function]" {
        (None, None)
    } else {
        let (f, n) = loc.strip_suffix(')')?.rsplit_once('(')?;
        (Some(f), n.parse::<u32>().ok())
    };
    let call = call.split('(').next().unwrap_or(call);
    let (class, function) = match call.frsplit_once("->").or_else(|| call.frsplit_once("::")) {
        Some((c, f)) => (Some(c), f),
        None => (None, call),
    };
    let module = match (class, file) {
        (Some(c), _) => c,
        (None, Some(f)) => strip_ext(basename(f), &[".php"]),
        (None, None) => "",
    };
    let lib = file.is_none_or(|f| f.fcontains("/vendor/") || f.fcontains("\\vendor\\"));
    // closures: {closure}, App\{closure}
    let function = if function.fcontains("{closure") {
        "{closure}"
    } else {
        function
    };
    Some(Frame {
        module: Cow::Borrowed(module),
        function: Cow::Borrowed(function),
        file,
        line: lineno,
        in_app: !lib,
    })
}

// ---------------------------------------------------------------------------
// Go:   main.(*Server).handle(0xc000010000, {0x1, 0x2})
//           /home/u/app/server.go:42 +0x1d
// ---------------------------------------------------------------------------
fn go_function_line(line: &str) -> Option<&str> {
    if line.starts_with([' ', '\t']) {
        return None;
    }
    let t = line.trim_end();
    let t = t.strip_prefix("created by ").unwrap_or(t);
    // "created by x.y in goroutine 7"
    let t = t.fsplit_once(" in goroutine ").map(|(a, _)| a).unwrap_or(t);
    let name = if t.ends_with(')') {
        &t[..t.rfind('(')?]
    } else {
        t
    };
    if name.is_empty() || name.contains(' ') || !name.contains('.') {
        return None;
    }
    Some(name)
}

fn go_location_line(line: &str) -> Option<(&str, Option<u32>)> {
    if !line.starts_with(['\t', ' ']) {
        return None;
    }
    let t = line.trim();
    let t = t.fsplit_once(" +0x").map(|(a, _)| a).unwrap_or(t);
    let (file, n) = t.rsplit_once(':')?;
    if !file.ends_with(".go") && !file.ends_with(".s") {
        return None;
    }
    Some((file, n.parse().ok()))
}

fn parse_go<'a>(lines: &[&'a str]) -> Vec<Frame<'a>> {
    let mut frames = Vec::new();
    let mut i = 0;
    while i + 1 < lines.len() {
        if let (Some(func), Some((file, lineno))) =
            (go_function_line(lines[i]), go_location_line(lines[i + 1]))
        {
            let (pkg, function) = split_go_func(func);
            let std = !pkg.split('/').next().unwrap_or("").contains('.') && pkg != "main";
            let lib = std
                || file.fcontains("/pkg/mod/")
                || file.fcontains("/vendor/")
                || file.fcontains("/go/src/runtime/");
            frames.push(Frame {
                module: Cow::Borrowed(pkg),
                function,
                file: Some(file),
                line: lineno,
                in_app: !lib,
            });
            i += 2;
        } else {
            i += 1;
        }
    }
    frames
}

/// "github.com/acme/app/server.(*S).Handle.func1" -> ("github.com/acme/app/server", "(*S).Handle.func1")
fn split_go_func(full: &str) -> (&str, Cow<'_, str>) {
    let slash = full.rfind('/').map(|i| i + 1).unwrap_or(0);
    let dot = full[slash..]
        .find('.')
        .map(|i| slash + i)
        .unwrap_or(full.len());
    let pkg = &full[..dot];
    let func = full.get(dot + 1..).unwrap_or("");
    if !func.as_bytes().contains(&b'[') {
        return (pkg, Cow::Borrowed(func));
    }
    // generics: Map[int,string] -> Map[...]
    let mut out = String::with_capacity(func.len());
    let mut depth = 0;
    for c in func.chars() {
        match c {
            '[' => {
                if depth == 0 {
                    out.push_str("[...]");
                }
                depth += 1;
            }
            ']' => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    (pkg, Cow::Owned(out))
}

// ---------------------------------------------------------------------------
// Rust:  "  12: myapp::handlers::create::h1a2b3c4d5e6f7a8b"
//        "             at ./src/handlers.rs:42:5"
// ---------------------------------------------------------------------------
const RUST_LIBRARY_PREFIXES: &[&str] = &[
    "std::",
    "core::",
    "alloc::",
    "backtrace::",
    "rust_begin_unwind",
    "__rust",
    "tokio::",
    "futures::",
    "futures_util::",
    "futures_core::",
    "hyper::",
    "tower::",
    "axum::",
    "actix_",
    "anyhow::",
    "<std::",
    "<core::",
    "<alloc::",
    "<tokio::",
    "<futures",
    "<hyper::",
    "<tower::",
    "<axum::",
    "__libc_start",
    "_start",
    "clone",
    "start_thread",
    "__GI_",
    "main",
];

fn rust_symbol_line(line: &str) -> Option<&str> {
    let t = line.trim_start();
    let (num, rest) = t.fsplit_once(": ")?;
    if !all_digits(num) {
        return None;
    }
    let sym = rest.trim();
    // "0x55d0c8f0 - sym" (older format)
    let sym = match sym.fsplit_once(" - ") {
        Some((addr, s)) if addr.starts_with("0x") => s,
        _ => sym,
    };
    if sym.is_empty() || sym.contains(' ') && !sym.starts_with('<') {
        return None;
    }
    Some(sym)
}

fn parse_rust<'a>(lines: &[&'a str]) -> Vec<Frame<'a>> {
    let mut frames = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if let Some(sym) = rust_symbol_line(lines[i]) {
            let mut file = None;
            let mut lineno = None;
            if let Some(next) = lines.get(i + 1) {
                if let Some(loc) = next.trim().strip_prefix("at ") {
                    let (f, n) = split_location(loc);
                    file = Some(f);
                    lineno = n;
                    i += 1;
                }
            }
            let sym = strip_rust_hash(sym);
            let (module, function) = match sym.frfind("::") {
                Some(k) => (Cow::Borrowed(&sym[..k]), Cow::Borrowed(&sym[k + 2..])),
                None => (Cow::Borrowed(""), Cow::Borrowed(sym)),
            };
            let lib = RUST_LIBRARY_PREFIXES
                .iter()
                .any(|p| sym.as_bytes().starts_with(p.as_bytes()))
                || file
                    .is_some_and(|f| f.starts_with("/rustc/") || f.fcontains("/.cargo/registry/"));
            frames.push(Frame {
                module,
                function,
                file,
                line: lineno,
                in_app: !lib,
            });
        }
        i += 1;
    }
    frames
}

/// Drops the "::h0123456789abcdef" symbol hash and closure numbering.
fn strip_rust_hash(sym: &str) -> &str {
    let s = match sym.frsplit_once("::h") {
        Some((head, h)) if h.len() == 16 && h.bytes().all(|c| c.is_ascii_hexdigit()) => head,
        _ => sym,
    };
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python() {
        let t = "Traceback (most recent call last):\n  File \"/srv/releases/42/app/views.py\", line 10, in handler\n    x()\n  File \"/venv/lib/python3.11/site-packages/django/core.py\", line 5, in run\n  File \"/usr/lib/python3.11/json/decoder.py\", line 337, in decode\nValueError: bad";
        let p = parse(t);
        assert_eq!(p.language, Language::Python);
        assert_eq!(p.frames.len(), 3);
        assert_eq!(p.frames[0].module, "views");
        assert!(p.frames[0].in_app);
        assert_eq!(p.frames[1].module, "django.core");
        assert!(!p.frames[1].in_app);
        assert!(!p.frames[2].in_app);
        assert_eq!(p.culprit().unwrap().function, "handler");
    }

    #[test]
    fn javascript_v8_and_firefox() {
        let v8 = "TypeError: x is undefined\n    at Object.handle [as h] (/app/dist/main.3f2a9c1b.js:10:5)\n    at async run (/app/node_modules/express/lib/router.js:1:2)\n    at node:internal/process/task_queues:95:5";
        let p = parse(v8);
        assert_eq!(p.language, Language::JavaScript);
        assert_eq!(p.frames[0].module, "main.js");
        assert_eq!(p.frames[0].function, "handle");
        assert!(p.frames[0].in_app && !p.frames[1].in_app && !p.frames[2].in_app);
        let ff = "handle@https://cdn.example.com/app-3f2a1b9c.js:10:5\n@https://cdn.example.com/app-3f2a1b9c.js:20:1";
        let p = parse(ff);
        assert_eq!(p.language, Language::JavaScript);
        assert_eq!(p.frames[0].module, "app.js");
        assert_eq!(p.frames[1].function, "<anonymous>");
    }

    #[test]
    fn java() {
        let t = "java.lang.IllegalStateException: boom\n\tat com.acme.Svc$$EnhancerBySpringCGLIB$$1a2b3c.run(<generated>)\n\tat com.acme.Svc.lambda$handle$3(Svc.java:42)\n\tat java.base/java.lang.Thread.run(Thread.java:829)\nCaused by: java.io.IOException: x\n\tat com.acme.Io.read(Io.java:7)\n\t... 5 more";
        let p = parse(t);
        assert_eq!(p.language, Language::Java);
        let names: Vec<_> = p
            .frames
            .iter()
            .map(|f| (f.module.as_ref(), f.function.as_ref(), f.in_app))
            .collect();
        assert_eq!(
            names,
            vec![
                ("com.acme.Svc", "lambda$handle", true),
                ("java.lang.Thread", "run", false),
                ("com.acme.Io", "read", true),
            ]
        );
    }

    #[test]
    fn dotnet() {
        let t = "System.InvalidOperationException: nope\n   at Acme.Orders.Service.<PlaceAsync>d__5.MoveNext() in /src/Service.cs:line 42\n   at System.Runtime.CompilerServices.TaskAwaiter.ThrowForNonSuccess(Task task)\n   at Acme.Orders.Api.<>c__DisplayClass3_0.<Run>b__0(String s) in C:\\build\\agent\\Api.cs:line 7";
        let p = parse(t);
        assert_eq!(p.language, Language::DotNet);
        assert_eq!(p.frames[0].module, "Acme.Orders.Service");
        assert_eq!(p.frames[0].function, "PlaceAsync");
        assert!(!p.frames[1].in_app);
        assert_eq!(p.frames[2].module, "Acme.Orders.Api");
        assert_eq!(p.frames[2].function, "Run");
    }

    #[test]
    fn go() {
        let t = "panic: boom\n\ngoroutine 7 [running]:\nmain.(*Server).handle(0xc000010000, {0x1, 0x2})\n\t/home/ci/build/123/server.go:42 +0x1d\nnet/http.HandlerFunc.ServeHTTP(0x0)\n\t/usr/local/go/src/net/http/server.go:2109 +0x2f\ncreated by net/http.(*Server).Serve in goroutine 1\n\t/usr/local/go/src/net/http/server.go:3086 +0x5cb";
        let p = parse(t);
        assert_eq!(p.language, Language::Go);
        assert_eq!(p.frames[0].module, "main");
        assert_eq!(p.frames[0].function, "(*Server).handle");
        assert!(p.frames[0].in_app && !p.frames[1].in_app && !p.frames[2].in_app);
    }

    #[test]
    fn ruby_versions_agree() {
        let old = "/app/models/user.rb:42:in `save'\n\tfrom /app/controllers/users_controller.rb:9:in `block (2 levels) in create'\n\tfrom /usr/local/bundle/gems/rack-3.0/lib/rack.rb:1:in `call'";
        let new = "/app/models/user.rb:43:in 'User#save'\n\tfrom /app/controllers/users_controller.rb:10:in 'block (2 levels) in UsersController#create'\n\tfrom /usr/local/bundle/gems/rack-3.1/lib/rack.rb:1:in 'Rack::Builder#call'";
        let a = parse(old);
        let b = parse(new);
        assert_eq!(a.language, Language::Ruby);
        let ga: Vec<_> = a
            .grouping_frames()
            .iter()
            .map(|f| (f.module.clone(), f.function.clone()))
            .collect();
        let gb: Vec<_> = b
            .grouping_frames()
            .iter()
            .map(|f| (f.module.clone(), f.function.clone()))
            .collect();
        assert_eq!(ga, gb);
        assert_eq!(ga[1].1, "block in create");
    }

    #[test]
    fn rust_backtrace() {
        let t = "thread 'main' panicked at src/main.rs:5:5:\nboom\nstack backtrace:\n   0: std::panicking::begin_panic\n             at /rustc/abc/library/std/src/panicking.rs:616:12\n   1: myapp::handlers::create::h1a2b3c4d5e6f7a8b\n             at ./src/handlers.rs:42:5\n   2: core::ops::function::FnOnce::call_once\n";
        let p = parse(t);
        assert_eq!(p.language, Language::Rust);
        let g = p.grouping_frames();
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].module, "myapp::handlers");
        assert_eq!(g[0].function, "create");
    }

    #[test]
    fn php() {
        let t = "PHP Fatal error:  Uncaught Exception: x in /var/www/src/Foo.php:3\nStack trace:\n#0 /var/www/src/Foo.php(42): App\\Foo->bar('x')\n#1 /var/www/vendor/laravel/framework/src/Router.php(10): App\\Foo::run()\n#2 [internal function]: App\\{closure}(Object(Request))\n#3 {main}";
        let p = parse(t);
        assert_eq!(p.language, Language::Php);
        assert_eq!(p.frames[0].module, "App\\Foo");
        assert_eq!(p.frames[0].function, "bar");
        assert!(p.frames[0].in_app && !p.frames[1].in_app);
    }

    #[test]
    fn unknown_text() {
        let p = parse("something went wrong\nsomewhere");
        assert_eq!(p.language, Language::Unknown);
        assert!(p.frames.is_empty());
    }
}

// ---------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------

/// One line of PostgreSQL's error CONTEXT, innermost first:
/// `PL/pgSQL function create_order(uuid) line 42 at RAISE` (trigger
/// functions alike), `PL/pgSQL function inline_code_block line 3 at RAISE`
/// (a DO block), `SQL function "f" statement 1`. A `SQL statement "..."`
/// line quotes what the frame below it ran: not a frame. The function keeps
/// its argument types (an overload is another function) but not its schema,
/// which PostgreSQL prints only when the function is not on the session's
/// search_path; the line is for display, not for grouping.
fn postgres_frame(line: &str) -> Option<Frame<'_>> {
    let l = line.trim();
    if let Some(rest) = l.strip_prefix("PL/pgSQL function ") {
        let (name, after) = pg_function_name(rest)?;
        let line = after
            .trim_start()
            .strip_prefix("line ")
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok());
        let function: Cow<'_, str> = if name == "inline_code_block" {
            Cow::Borrowed("DO block")
        } else {
            Cow::Borrowed(unqualified(name))
        };
        return Some(Frame {
            module: Cow::Borrowed("plpgsql"),
            function,
            file: None,
            line,
            in_app: true,
        });
    }
    if let Some(rest) = l.strip_prefix("SQL function \"") {
        let end = rest.find('"')?;
        let line = rest[end + 1..]
            .trim_start()
            .strip_prefix("statement ")
            .and_then(|n| n.trim().parse().ok());
        return Some(Frame {
            module: Cow::Borrowed("sql"),
            function: Cow::Borrowed(unqualified(&rest[..end])),
            file: None,
            line,
            in_app: true,
        });
    }
    None
}

/// `name(arg types)` (the name possibly quoted or schema-qualified) at the
/// start of `s`, and what follows it. A name without arguments (a DO
/// block's `inline_code_block`) ends at the first space.
fn pg_function_name(s: &str) -> Option<(&str, &str)> {
    let mut i = 0;
    let b = s.as_bytes();
    // the name: quoted parts may hold spaces, dots and parentheses
    while i < b.len() {
        match b[i] {
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += 1;
                }
                i += 1;
            }
            b'(' => {
                let close = s[i..].find(')')? + i;
                return Some((&s[..=close], &s[close + 1..]));
            }
            b' ' => return Some((&s[..i], &s[i..])),
            _ => i += 1,
        }
    }
    (!s.is_empty()).then_some((s, ""))
}

/// The function without the schema PostgreSQL may print before it.
fn unqualified(name: &str) -> &str {
    let head = name.split('(').next().unwrap_or(name);
    let mut in_quotes = false;
    let mut dot = None;
    for (i, c) in head.char_indices() {
        match c {
            '"' => in_quotes = !in_quotes,
            '.' if !in_quotes => dot = Some(i),
            _ => {}
        }
    }
    match dot {
        Some(i) => &name[i + 1..],
        None => name,
    }
}
