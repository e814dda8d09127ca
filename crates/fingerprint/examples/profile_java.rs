use fraiseql_fingerprint::default_fingerprint;
include!("/tmp/traces.rs");
const FRAMES: usize = 30;
fn main() {
    let t = traces();
    let java = &t[2].1;
    for _ in 0..20000 { std::hint::black_box(default_fingerprint("E", "m", Some(java))); }
}
