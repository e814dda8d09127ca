//! µs per fingerprint of a 30-frame trace in each language, beside SHA-256 of
//! the same bytes (the floor: any fingerprint must at least read its input).
//! Run: cargo bench -p fraiseql_fingerprint
use fraiseql_fingerprint::default_fingerprint;
use sha2::{Digest, Sha256};
use std::hint::black_box;
use std::time::Instant;

const FRAMES: usize = 30;

fn traces() -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let mut py = String::from("Traceback (most recent call last):\n");
    let mut js = String::from("TypeError: Cannot read properties of undefined (reading 'id')\n");
    let mut java = String::from("java.lang.IllegalStateException: boom\n");
    let mut go = String::from(
        "panic: runtime error: index out of range [3] with length 3\n\ngoroutine 17 [running]:\n",
    );
    let mut rb = String::new();
    let mut cs = String::from("System.InvalidOperationException: Sequence contains no elements\n");
    let mut rs =
        String::from("thread 'main' panicked at src/main.rs:5:5:\nboom\nstack backtrace:\n");
    let mut php = String::from(
        "PHP Fatal error:  Uncaught RuntimeException: boom in /var/www/src/A.php:3\nStack trace:\n",
    );
    for i in 0..FRAMES {
        let lib = i % 3 == 2;
        if lib {
            py.push_str(&format!("  File \"/srv/venv/lib/python3.11/site-packages/django/core/h{i}.py\", line {}, in inner_{i}\n    response = get_response(request)\n", 40 + i));
            js.push_str(&format!("    at renderWithHooks{i} (/app/node_modules/react-dom/cjs/react-dom.development.js:{}:{})\n", 14000 + i, 18 + i));
            java.push_str(&format!("\tat org.springframework.web.servlet.FrameworkServlet.service{i}(FrameworkServlet.java:{})\n", 800 + i));
            go.push_str(&format!("net/http.HandlerFunc.ServeHTTP{i}(0xc000130000?, {{0x7f1c300?, 0xc0001b4000?}}, 0x0?)\n\t/usr/local/go/src/net/http/server.go:{} +0x29\n", 2100 + i));
            rb.push_str(&format!("/usr/local/bundle/gems/actionpack-7.1.3/lib/action_controller/metal/m{i}.rb:{}:in 'ActionController::Base#process_{i}'\n", 10 + i));
            cs.push_str(&format!(
                "   at System.Linq.Enumerable.First{i}[TSource](IEnumerable`1 source)\n"
            ));
            rs.push_str(&format!("  {i}: tokio::runtime::task::core::Core<T,S>::poll{i}::h2b3c4d5e6f7a8b9c\n             at /root/.cargo/registry/src/index.crates.io-6f17d22bba15001f/tokio-1.40.0/src/runtime/task/core.rs:{}:17\n", 300 + i));
            php.push_str(&format!("#{i} /var/www/vendor/laravel/framework/src/Illuminate/Routing/C{i}.php({}): Illuminate\\Routing\\Controller->callAction('pay', Array)\n", 50 + i));
        } else {
            py.push_str(&format!("  File \"/srv/app/releases/20261101/api/services/mod{i}.py\", line {}, in handle_{i}\n    result = step_{i}(payload)\n", 10 + i));
            js.push_str(&format!("    at Object.step{i} [as s{i}] (https://cdn.example.com/static/js/main.3f2a9c1b.js:1:{})\n", 20000 + i));
            java.push_str(&format!("\tat com.acme.orders.Service{i}$$EnhancerBySpringCGLIB$$1a2b3c.lambda$handle{i}$0(Service{i}.java:{})\n", 40 + i));
            go.push_str(&format!("github.com/acme/shop/internal/m{i}.(*Service).Place{i}(0xc000010000, {{0x7f1c2c0, 0xc0001a2000}})\n\t/home/ci/builds/1234/internal/m{i}/service.go:{} +0x1d\n", 80 + i));
            rb.push_str(&format!(
                "/app/app/models/model{i}.rb:{}:in 'Model{i}#save_{i}'\n",
                40 + i
            ));
            cs.push_str(&format!("   at Acme.Orders.OrderService{i}.<PlaceAsync{i}>d__5.MoveNext() in C:\\agent\\_work\\1\\s\\src\\Orders\\OrderService{i}.cs:line {}\n", 42 + i));
            rs.push_str(&format!("  {i}: shop::handlers::m{i}::create_order{i}::h1a2b3c4d5e6f7a8b\n             at ./src/handlers/m{i}.rs:{}:31\n", 42 + i));
            php.push_str(&format!("#{i} /var/www/releases/118/src/Billing/S{i}.php({}): App\\Billing\\InvoiceService{i}->pay{i}(Object(App\\Models\\Invoice))\n", 30 + i));
        }
    }
    out.push(("python", py));
    out.push(("javascript", js));
    out.push(("java", java));
    out.push(("go", go));
    out.push(("ruby", rb));
    out.push(("dotnet", cs));
    out.push(("rust", rs));
    out.push(("php", php));
    out
}

fn time_per_call(mut f: impl FnMut()) -> f64 {
    // warm up, then enough iterations for ~0.3 s
    for _ in 0..200 {
        f();
    }
    let mut iters = 1000u32;
    loop {
        let start = Instant::now();
        for _ in 0..iters {
            f();
        }
        let el = start.elapsed().as_secs_f64();
        if el > 0.3 {
            return el * 1e6 / iters as f64;
        }
        iters *= 2;
    }
}

fn main() {
    println!("| language | bytes | frames parsed | fingerprint µs | SHA-256 µs (floor) | ratio |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (lang, trace) in traces() {
        let parsed = fraiseql_fingerprint::stacktrace::parse(&trace);
        assert_eq!(
            parsed.language.name(),
            lang,
            "bench trace must parse as {lang}"
        );
        let fp = time_per_call(|| {
            black_box(default_fingerprint(
                black_box("RuntimeError"),
                black_box("boom"),
                Some(black_box(&trace)),
            ));
        });
        let sha = time_per_call(|| {
            black_box(Sha256::digest(black_box(trace.as_bytes())));
        });
        println!(
            "| {lang} | {} | {} | {fp:.2} | {sha:.2} | {:.1}x |",
            trace.len(),
            parsed.frames.len(),
            fp / sha
        );
    }
}
