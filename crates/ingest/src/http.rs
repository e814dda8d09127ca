//! A small HTTP/1.1 server on std's sockets and threads.
//!
//! One thread per connection, at most `max_connections` at once and
//! `max_connections_per_peer` from one address: the one over a cap gets a
//! 503 at once and is closed, so a flood of connections costs a bounded
//! number of threads, never stops the accept loop, and one client cannot
//! take every slot. Every read has a total deadline (the request head, then
//! its body; an idle keep-alive connection is closed after `idle_timeout`)
//! and, two seconds into a head or a body, a minimum rate (MIN_RATE), so a
//! client that trickles bytes (slowloris) holds its slot for seconds, not
//! for the deadlines. Bodies come with Content-Length or
//! chunked, under `max_body_bytes` (413 above, before reading it);
//! `Expect: 100-continue` is answered before the body is read. Accept
//! errors (out of file descriptors, a connection reset before accept) are
//! waited out, never fatal.
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct Limits {
    pub max_connections: usize,
    /// from one client address (behind a proxy, all come from the proxy's)
    pub max_connections_per_peer: usize,
    /// the whole request head (request line and headers)
    pub header_timeout: Duration,
    /// the whole body
    pub body_timeout: Duration,
    /// between requests on a kept-alive connection
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    /// as sent (compressed or not)
    pub max_body_bytes: usize,
    /// writing a response
    pub write_timeout: Duration,
    /// a body larger than this (as sent) needs one of `max_large_bodies`
    /// permits, shared with handlers that decompress past it: memory stays
    /// bounded however many connections send at once
    pub large_body_bytes: usize,
    pub max_large_bodies: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 256,
            max_connections_per_peer: 64,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(15),
            max_header_bytes: 64 * 1024,
            max_body_bytes: 20 * 1024 * 1024,
            write_timeout: Duration::from_secs(10),
            large_body_bytes: 1024 * 1024,
            max_large_bodies: 4,
        }
    }
}

/// Permits for large bodies (see `Limits::large_body_bytes`).
#[derive(Debug)]
pub struct Permits {
    used: AtomicUsize,
    max: usize,
}

/// A permit, given back when dropped.
#[derive(Debug)]
pub struct Permit(Arc<Permits>);

impl Permits {
    pub fn new(max: usize) -> Arc<Permits> {
        Arc::new(Permits { used: AtomicUsize::new(0), max })
    }
    /// A permit if one is free (never waits).
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let mut n = self.used.load(Ordering::SeqCst);
        loop {
            if n >= self.max {
                return None;
            }
            match self.used.compare_exchange(n, n + 1, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => return Some(Permit(self.clone())),
                Err(now) => n = now,
            }
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// the path, percent-decoding left to the handler
    pub path: String,
    /// the query string, without '?'
    pub query: String,
    /// names in lower case
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub peer: Option<std::net::SocketAddr>,
    /// whether the connection holds a large-body permit for this request
    pub large: bool,
    /// the server's large-body permits, for a handler whose decompressed
    /// body grows past `large_body_bytes`
    pub permits: Option<Arc<Permits>>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// A query parameter (the first), percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k) == name).then(|| percent_decode(v))
        })
    }
}

pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            headers: vec![("Content-Type".into(), content_type.into())],
            body: body.into(),
        }
    }
    pub fn json(status: u16, v: &serde_json::Value) -> Response {
        Response::new(status, "application/json", v.to_string())
    }
    /// `{"detail": ...}`, as Sentry's own errors read
    pub fn error(status: u16, detail: &str) -> Response {
        Response::json(status, &serde_json::json!({ "detail": detail }))
    }
    pub fn with_header(mut self, name: &str, value: &str) -> Response {
        self.headers.push((name.into(), value.into()));
        self
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

pub type Handler = dyn Fn(Request) -> Response + Send + Sync;

/// What the server has seen (for logs and tests).
#[derive(Default, Debug)]
pub struct Stats {
    /// open connections by client address
    peers: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
    pub open: AtomicUsize,
    pub refused: AtomicUsize,
    pub requests: AtomicUsize,
    pub timed_out: AtomicUsize,
}

pub struct Server {
    pub stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    local: std::net::SocketAddr,
}

impl Server {
    /// Serves `listener` on a thread of its own until `stop` (or the
    /// process ends).
    pub fn start(listener: TcpListener, limits: Limits, handler: Arc<Handler>) -> io::Result<Server> {
        let stats = Arc::new(Stats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let local = listener.local_addr()?;
        let (st, sp) = (stats.clone(), stop.clone());
        let permits = Permits::new(limits.max_large_bodies);
        std::thread::Builder::new()
            .name("fraiseql_obs http accept".into())
            .spawn(move || accept_loop(listener, limits, handler, st, sp, permits))?;
        Ok(Server { stats, stop, local })
    }

    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.local
    }

    /// Stops accepting (connections in progress finish their request).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        // wake the blocked accept
        let _ = TcpStream::connect_timeout(&self.local, Duration::from_millis(200));
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(
    listener: TcpListener,
    limits: Limits,
    handler: Arc<Handler>,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    permits: Arc<Permits>,
) {
    let limits = Arc::new(limits);
    loop {
        let accepted = listener.accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let (stream, peer) = match accepted {
            Ok(s) => s,
            Err(_) => {
                // EMFILE, ENFILE, ECONNABORTED...: wait and go on
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        if stats.open.load(Ordering::SeqCst) >= limits.max_connections {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            refuse(stream);
            continue;
        }
        let ip = client_of(peer.ip());
        {
            let mut peers = stats.peers.lock().unwrap_or_else(|e| e.into_inner());
            let n = peers.entry(ip).or_insert(0);
            if *n >= limits.max_connections_per_peer {
                drop(peers);
                stats.refused.fetch_add(1, Ordering::Relaxed);
                refuse(stream);
                continue;
            }
            *n += 1;
        }
        stats.open.fetch_add(1, Ordering::SeqCst);
        let (l, h, s, p) = (limits.clone(), handler.clone(), stats.clone(), permits.clone());
        let guard = Open(stats.clone(), ip);
        let spawned = std::thread::Builder::new()
            .name("fraiseql_obs http conn".into())
            // (virtual: only the pages a request touches are resident)
            .stack_size(8 * 1024 * 1024)
            .spawn(move || {
                let _guard = guard;
                // a bug reached by some input ends this connection only
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    serve_connection(stream, Some(peer), &l, &*h, &s, &p)
                }));
            });
        if spawned.is_err() {
            stats.refused.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Whose connection it is, for the cap per client: an IPv6 client has a
/// /64 (its addresses are free to pick within it), an IPv4 one its address.
fn client_of(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => std::net::IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                std::net::IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

/// One open connection, counted (in all and for its client's address)
/// until dropped (a panic included).
struct Open(Arc<Stats>, std::net::IpAddr);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
        let mut peers = self.0.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = peers.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                peers.remove(&self.1);
            }
        }
    }
}

/// Over the connection cap: a 503 if it can be written at once, then close.
fn refuse(stream: TcpStream) {
    let _ = stream.set_nonblocking(true);
    let mut s = stream;
    let _ = s.write_all(
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    let _ = s.shutdown(Shutdown::Both);
}

/// Reads from a stream until a total deadline.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// bytes of buf already consumed
    pos: usize,
    /// bytes read from the stream in all
    received: usize,
    /// the head or body being read: since when, and the count of `received`
    /// it started from (it must come at MIN_RATE; None between requests)
    pace: Option<(Instant, usize)>,
}

#[derive(Debug)]
enum ReadError {
    Closed,
    Timeout,
    Io,
    TooLarge,
    /// a large body, and no permit free
    Busy,
    /// a large body sent too slowly to keep its permit
    TooSlow,
    Bad(&'static str),
}

/// A large body holds one of few permits: it must come at least this fast
/// (after its first two seconds), or a slow sender could hold them all.
const MIN_LARGE_RATE: f64 = 8.0 * 1024.0;
/// Any request head or body must come at least this fast, with a slack of
/// PACE_SLACK bytes and PACE_GRACE seconds (an SDK sends one in a few
/// packets at once; a lost packet is sent again within seconds): a client
/// that trickles bytes to hold connection slots is cut off after PACE_GRACE.
const MIN_RATE: f64 = 1024.0;
const PACE_SLACK: f64 = 4096.0;
const PACE_GRACE: f64 = 5.0;

fn too_slow_for(rate: f64, started: Instant, received: usize) -> bool {
    let t = started.elapsed().as_secs_f64();
    t > 2.0 && (received as f64) < rate * t
}

/// A head or body behind MIN_RATE (see PACE_SLACK).
fn behind_pace(started: Instant, received: usize) -> bool {
    let t = started.elapsed().as_secs_f64();
    t > PACE_GRACE && (received as f64) + PACE_SLACK < MIN_RATE * t
}

fn too_slow(started: Instant, received: usize) -> bool {
    too_slow_for(MIN_LARGE_RATE, started, received)
}

impl Conn {
    /// What is read from now on (and what waits in the buffer) must come at
    /// MIN_RATE: a head or body begins.
    fn pace_from_now(&mut self) {
        self.pace = Some((Instant::now(), self.received - (self.buf.len() - self.pos)));
    }

    fn fill(&mut self, deadline: Instant) -> Result<usize, ReadError> {
        let now = Instant::now();
        if now >= deadline {
            return Err(ReadError::Timeout);
        }
        if let Some((since, from)) = self.pace {
            if behind_pace(since, self.received - from) {
                return Err(ReadError::TooSlow);
            }
        }
        // short waits, so that the callers check their deadline and a
        // large body's rate while a sender stalls
        self.stream
            .set_read_timeout(Some((deadline - now).clamp(Duration::from_millis(1), Duration::from_millis(500))))
            .map_err(|_| ReadError::Io)?;
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        // the head and chunk lines are bounded; a body is read into its own
        // reservation (take)
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => Err(ReadError::Closed),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                self.received += n;
                Ok(n)
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                if Instant::now() >= deadline {
                    Err(ReadError::Timeout)
                } else {
                    Ok(0)
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(_) => Err(ReadError::Io),
        }
    }

    /// The request head, up to and without the blank line.
    fn read_head(&mut self, first_byte_by: Instant, limits: &Limits) -> Result<Vec<u8>, ReadError> {
        let mut deadline = first_byte_by;
        let mut started = (self.pos < self.buf.len()).then(Instant::now);
        if started.is_some() {
            deadline = Instant::now() + limits.header_timeout;
            self.pace_from_now();
        }
        // where the search for the blank line goes on (a head that comes a
        // byte at a time is not searched again from its start each time)
        let mut searched = 0;
        loop {
            let avail = &self.buf[self.pos..];
            if let Some(i) = find(&avail[searched..], b"\r\n\r\n") {
                let i = searched + i;
                let head = avail[..i].to_vec();
                self.pos += i + 4;
                return Ok(head);
            }
            searched = avail.len().saturating_sub(3);
            if avail.len() > limits.max_header_bytes {
                return Err(ReadError::TooLarge);
            }
            match self.fill(deadline) {
                Ok(_) => {}
                Err(ReadError::Closed) if started.is_none() => return Err(ReadError::Closed),
                Err(e) => return Err(e),
            }
            if started.is_none() && self.pos < self.buf.len() {
                started = Some(Instant::now());
                deadline = Instant::now() + limits.header_timeout;
                self.pace_from_now();
            }
        }
    }

    /// `n` bytes of body, which must come at `min_rate` at least (after two
    /// seconds).
    fn take(&mut self, n: usize, deadline: Instant, min_rate: f64) -> Result<Vec<u8>, ReadError> {
        // what came before is consumed: the body is moved out, not copied
        self.buf.drain(..self.pos);
        self.pos = 0;
        self.buf.reserve(n.saturating_sub(self.buf.len()).min(1 << 20));
        let started = Instant::now();
        while self.buf.len() < n {
            if min_rate > MIN_RATE && too_slow_for(min_rate, started, self.buf.len()) {
                return Err(ReadError::TooSlow);
            }
            match self.fill(deadline) {
                Ok(_) => {}
                Err(ReadError::Closed) => return Err(ReadError::Bad("body shorter than its length")),
                Err(e) => return Err(e),
            }
        }
        let rest = self.buf.split_off(n);
        Ok(std::mem::replace(&mut self.buf, rest))
    }

    /// One chunk's data (copied: chunks are small pieces of the body).
    /// `rate`: since when, and how much before this chunk, a large body came.
    fn take_chunk(&mut self, n: usize, deadline: Instant, rate: Option<(Instant, usize)>) -> Result<Vec<u8>, ReadError> {
        while self.buf.len() - self.pos < n {
            if let Some((since, before)) = rate {
                if too_slow(since, before + (self.buf.len() - self.pos)) {
                    return Err(ReadError::TooSlow);
                }
            }
            match self.fill(deadline) {
                Ok(_) => {}
                Err(ReadError::Closed) => return Err(ReadError::Bad("chunked body cut short")),
                Err(e) => return Err(e),
            }
        }
        let out = self.buf[self.pos..self.pos + n].to_vec();
        self.pos += n;
        Ok(out)
    }

    /// Between requests: a buffer grown by a large request is not kept.
    fn shrink(&mut self) {
        self.buf.drain(..self.pos);
        self.pos = 0;
        if self.buf.capacity() > 64 * 1024 {
            self.buf.shrink_to(64 * 1024);
        }
    }

    fn line(&mut self, deadline: Instant, max: usize) -> Result<Vec<u8>, ReadError> {
        loop {
            let avail = &self.buf[self.pos..];
            if let Some(i) = find(avail, b"\r\n") {
                let l = avail[..i].to_vec();
                self.pos += i + 2;
                return Ok(l);
            }
            if avail.len() > max {
                return Err(ReadError::Bad("chunk line too long"));
            }
            match self.fill(deadline) {
                Ok(_) => {}
                Err(ReadError::Closed) => return Err(ReadError::Bad("chunked body cut short")),
                Err(e) => return Err(e),
            }
        }
    }

    /// A chunked body. Past `large` bytes it needs a permit (taken then, not
    /// before: a chunked request that stays small never holds one).
    fn chunked(
        &mut self,
        deadline: Instant,
        large: usize,
        max: usize,
        permits: &Arc<Permits>,
        permit: &mut Option<Permit>,
    ) -> Result<Vec<u8>, ReadError> {
        let mut body = Vec::new();
        let mut large_since: Option<Instant> = None;
        loop {
            if let Some(t) = large_since {
                if too_slow(t, body.len().saturating_sub(large)) {
                    return Err(ReadError::TooSlow);
                }
            }
            let l = self.line(deadline, 1024)?;
            let l = String::from_utf8_lossy(&l);
            let size = l.split(';').next().unwrap_or("").trim();
            if size.is_empty() || size.len() > 15 || !size.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(ReadError::Bad("bad chunk size"));
            }
            let n = usize::from_str_radix(size, 16).map_err(|_| ReadError::Bad("bad chunk size"))?;
            if n == 0 {
                // trailers, up to the blank line
                loop {
                    if self.line(deadline, 8192)?.is_empty() {
                        return Ok(body);
                    }
                }
            }
            if n > max.saturating_sub(body.len()) {
                return Err(ReadError::TooLarge);
            }
            if permit.is_none() && body.len() + n > large {
                *permit = Some(permits.try_acquire().ok_or(ReadError::Busy)?);
                large_since = Some(Instant::now());
            }
            let rate = large_since.map(|t| (t, body.len().saturating_sub(large)));
            let chunk = self.take_chunk(n, deadline, rate)?;
            body.extend_from_slice(&chunk);
            if !self.line(deadline, 2)?.is_empty() {
                return Err(ReadError::Bad("chunk not followed by CRLF"));
            }
        }
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

fn write_response(stream: &mut TcpStream, r: &Response, keep_alive: bool, head_only: bool) -> io::Result<()> {
    let mut out = Vec::with_capacity(r.body.len() + 256);
    out.extend_from_slice(format!("HTTP/1.1 {} {}\r\n", r.status, reason(r.status)).as_bytes());
    for (n, v) in &r.headers {
        // (a value can never split the head: CR and LF are dropped)
        let v: String = v.chars().filter(|c| *c != '\r' && *c != '\n').collect();
        out.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
    }
    out.extend_from_slice(format!("Content-Length: {}\r\n", r.body.len()).as_bytes());
    out.extend_from_slice(if keep_alive { b"Connection: keep-alive\r\n\r\n" } else { b"Connection: close\r\n\r\n" });
    if !head_only {
        out.extend_from_slice(&r.body);
    }
    stream.write_all(&out)?;
    stream.flush()
}

struct Head {
    method: String,
    target: String,
    http10: bool,
    headers: Vec<(String, String)>,
}

fn parse_head(head: &[u8]) -> Result<Head, &'static str> {
    let text = std::str::from_utf8(head).map_err(|_| "request head is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or("");
    let mut parts = first.split(' ');
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let version = parts.next().unwrap_or("");
    if method.is_empty() || !method.bytes().all(|c| c.is_ascii_uppercase()) || target.is_empty() || parts.next().is_some() {
        return Err("malformed request line");
    }
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err("unsupported HTTP version"),
    };
    let mut headers = Vec::new();
    for l in lines {
        // a bare CR or LF inside a line is how requests are smuggled past proxies
        if l.contains(['\r', '\n']) {
            return Err("bare CR or LF in a header");
        }
        let (n, v) = l.split_once(':').ok_or("malformed header line")?;
        if n.is_empty() || n.bytes().any(|c| c == b' ' || c == b'\t') {
            return Err("malformed header name");
        }
        headers.push((n.to_ascii_lowercase(), v.trim().to_string()));
        if headers.len() > 200 {
            return Err("too many headers");
        }
    }
    Ok(Head { method, target, http10, headers })
}

fn serve_connection(
    stream: TcpStream,
    peer: Option<std::net::SocketAddr>,
    limits: &Limits,
    handler: &Handler,
    stats: &Stats,
    permits: &Arc<Permits>,
) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(limits.write_timeout))?;
    let mut conn = Conn { stream: stream.try_clone()?, buf: Vec::new(), pos: 0, received: 0, pace: None };
    let mut out = stream;
    let mut first = true;
    loop {
        let wait = if first { limits.header_timeout } else { limits.idle_timeout };
        first = false;
        conn.pace = None;
        let head = match conn.read_head(Instant::now() + wait, limits) {
            Ok(h) => h,
            Err(ReadError::TooSlow) => {
                stats.timed_out.fetch_add(1, Ordering::Relaxed);
                let _ = write_response(&mut out, &Response::error(408, "request head sent too slowly"), false, false);
                break;
            }
            Err(ReadError::TooLarge) => {
                let _ = write_response(&mut out, &Response::error(431, "request head too large"), false, false);
                break;
            }
            Err(ReadError::Timeout) if conn.pos < conn.buf.len() => {
                stats.timed_out.fetch_add(1, Ordering::Relaxed);
                let _ = write_response(&mut out, &Response::error(408, "request head not received in time"), false, false);
                break;
            }
            Err(_) => break,
        };
        let h = match parse_head(&head) {
            Ok(h) => h,
            Err(why) => {
                let _ = write_response(&mut out, &Response::error(400, why), false, false);
                break;
            }
        };
        let hv = |name: &str| h.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
        // one length, said once: anything else is how requests are smuggled
        let count = |name: &str| h.headers.iter().filter(|(n, _)| n == name).count();
        if count("content-length") > 1 || count("transfer-encoding") > 1 {
            let _ = write_response(&mut out, &Response::error(400, "repeated Content-Length or Transfer-Encoding"), false, false);
            break;
        }
        if let Some(te) = hv("transfer-encoding") {
            if !te.trim().eq_ignore_ascii_case("chunked") {
                let _ = write_response(&mut out, &Response::error(501, "only Transfer-Encoding: chunked is served"), false, false);
                break;
            }
        }
        let conn_hdr = hv("connection").unwrap_or("").to_ascii_lowercase();
        let mut keep_alive = if h.http10 { conn_hdr.contains("keep-alive") } else { !conn_hdr.contains("close") };
        let chunked = hv("transfer-encoding").is_some();
        let length = match hv("content-length") {
            Some(l) => match l.trim().parse::<usize>().ok().filter(|_| l.trim().bytes().all(|c| c.is_ascii_digit())) {
                Some(n) => Some(n),
                None => {
                    let _ = write_response(&mut out, &Response::error(400, "bad Content-Length"), false, false);
                    break;
                }
            },
            None => None,
        };
        if chunked && length.is_some() {
            let _ = write_response(&mut out, &Response::error(400, "both Content-Length and chunked"), false, false);
            break;
        }
        if length.is_some_and(|n| n > limits.max_body_bytes) {
            let _ = write_response(&mut out, &Response::error(413, "body too large"), false, false);
            break;
        }
        if (chunked || length.unwrap_or(0) > 0)
            && hv("expect").is_some_and(|e| e.eq_ignore_ascii_case("100-continue"))
        {
            out.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        // a large body needs a permit (a chunked one when it grows large)
        let mut permit = None;
        if !chunked && length.unwrap_or(0) > limits.large_body_bytes {
            permit = permits.try_acquire();
            if permit.is_none() {
                let r = Response::error(503, "too many large requests at once, try again").with_header("Retry-After", "2");
                let _ = write_response(&mut out, &r, false, false);
                break;
            }
        }
        let deadline = Instant::now() + limits.body_timeout;
        conn.pace_from_now();
        let body = if chunked {
            conn.chunked(deadline, limits.large_body_bytes, limits.max_body_bytes, permits, &mut permit)
        } else {
            conn.take(length.unwrap_or(0), deadline, if permit.is_some() { MIN_LARGE_RATE } else { MIN_RATE })
        };
        let body = match body {
            Ok(b) => b,
            Err(e) => {
                let r = match e {
                    ReadError::Busy => {
                        Response::error(503, "too many large requests at once, try again").with_header("Retry-After", "2")
                    }
                    ReadError::TooSlow => Response::error(408, "the body was sent too slowly"),
                    ReadError::TooLarge => Response::error(413, "body too large"),
                    ReadError::Timeout => {
                        stats.timed_out.fetch_add(1, Ordering::Relaxed);
                        Response::error(408, "body not received in time")
                    }
                    ReadError::Bad(why) => Response::error(400, why),
                    _ => break,
                };
                let _ = write_response(&mut out, &r, false, false);
                break;
            }
        };
        let (path, query) = match h.target.split_once('?') {
            Some((p, q)) => (p.to_string(), q.to_string()),
            None => (h.target.clone(), String::new()),
        };
        let head_only = h.method == "HEAD";
        stats.requests.fetch_add(1, Ordering::Relaxed);
        let req = Request {
            method: h.method,
            path,
            query,
            headers: h.headers,
            body,
            peer,
            large: permit.is_some(),
            permits: Some(permits.clone()),
        };
        let resp = handler(req);
        if resp.header("connection").is_some_and(|c| c.eq_ignore_ascii_case("close")) {
            keep_alive = false;
        }
        let resp = Response {
            headers: resp.headers.into_iter().filter(|(n, _)| !n.eq_ignore_ascii_case("connection")).collect(),
            ..resp
        };
        write_response(&mut out, &resp, keep_alive, head_only)?;
        drop(permit);
        conn.shrink();
        if !keep_alive {
            break;
        }
    }
    let _ = out.shutdown(Shutdown::Both);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(limits: Limits) -> Server {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let h: Arc<Handler> = Arc::new(|r: Request| {
            Response::new(200, "text/plain", format!("{} {} {} {}", r.method, r.path, r.query, r.body.len()))
        });
        Server::start(l, limits, h).unwrap()
    }

    fn roundtrip(s: &Server, raw: &[u8]) -> String {
        let mut c = TcpStream::connect(s.local_addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(raw).unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        out
    }

    #[test]
    fn plain_chunked_and_continue() {
        let s = start(Limits::default());
        let r = roundtrip(&s, b"POST /a?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc");
        assert!(r.starts_with("HTTP/1.1 200 OK"), "{r}");
        assert!(r.ends_with("POST /a x=1 3"), "{r}");
        let r = roundtrip(&s, b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n");
        assert!(r.ends_with("POST /c  5"), "{r}");
        let r = roundtrip(&s, b"POST /e HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\nConnection: close\r\n\r\nab");
        assert!(r.starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200"), "{r}");
    }

    #[test]
    fn keep_alive_and_pipelining() {
        let s = start(Limits::default());
        let r = roundtrip(&s, b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert_eq!(r.matches("HTTP/1.1 200").count(), 2, "{r}");
        assert!(r.contains("GET /2"));
    }

    #[test]
    fn bad_input_is_refused_cleanly() {
        let s = start(Limits { max_body_bytes: 10, ..Limits::default() });
        assert!(roundtrip(&s, b"POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n").starts_with("HTTP/1.1 413"));
        assert!(roundtrip(&s, b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n20\r\n").starts_with("HTTP/1.1 413"));
        assert!(roundtrip(&s, b"NOT A REQUEST\r\n\r\n").starts_with("HTTP/1.1 400"));
        assert!(roundtrip(&s, b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n").starts_with("HTTP/1.1 400"));
        assert!(roundtrip(&s, b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").starts_with("HTTP/1.1 400"));
        // smuggling shapes
        assert!(roundtrip(&s, b"POST / HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\n").starts_with("HTTP/1.1 400"));
        assert!(roundtrip(&s, b"POST / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n").starts_with("HTTP/1.1 501"));
        assert!(roundtrip(&s, b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n").starts_with("HTTP/1.1 400"));
        assert!(roundtrip(&s, b"POST / HTTP/1.1\r\nContent-Length: +2\r\n\r\nab").starts_with("HTTP/1.1 400"));
        assert!(roundtrip(&s, b"POST / HTTP/1.1\r\nX: a\nContent-Length: 2\r\n\r\nab").starts_with("HTTP/1.1 400"));
        // a chunk size that would overflow
        assert!(roundtrip(&s, b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\nffffffffffffffff\r\n").starts_with("HTTP/1.1 400"));
        // the server still serves
        assert!(roundtrip(&s, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").starts_with("HTTP/1.1 200"));
    }

    #[test]
    fn slow_client_is_cut_off_at_the_deadline() {
        let s = start(Limits { header_timeout: Duration::from_millis(300), body_timeout: Duration::from_millis(300), ..Limits::default() });
        let mut c = TcpStream::connect(s.local_addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let t = Instant::now();
        // one byte at a time, too slowly: the head deadline is total
        for b in b"POST / HTTP/1.1\r\n" {
            if c.write_all(&[*b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(40));
        }
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 408"), "{out}");
        assert!(t.elapsed() < Duration::from_secs(3));
        // a body that never comes
        let mut c = TcpStream::connect(s.local_addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"POST / HTTP/1.1\r\nContent-Length: 100\r\n\r\nabc").unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    }

    /// Bytes trickled, one every 400 ms, then what the server answered and
    /// when.
    fn trickle(s: &Server, first: &[u8], then: &[u8]) -> (String, Duration) {
        let mut c = TcpStream::connect(s.local_addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
        let t = Instant::now();
        c.write_all(first).unwrap();
        for b in then {
            if c.write_all(&[*b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(400));
        }
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        (out, t.elapsed())
    }

    #[test]
    fn trickling_clients_are_cut_off_long_before_the_deadlines() {
        // the default deadlines: 10 s for a head, 30 s for a body
        let s = start(Limits::default());
        let (out, took) = trickle(&s, b"POST / HTTP/1.1\r\n", &[b'x'; 60]);
        assert!(out.starts_with("HTTP/1.1 408") && out.contains("too slowly"), "{out}");
        assert!(took < Duration::from_secs(8), "{took:?}");
        let (out, took) = trickle(&s, b"POST / HTTP/1.1\r\nContent-Length: 60000\r\n\r\n", &[b'x'; 60]);
        assert!(out.starts_with("HTTP/1.1 408") && out.contains("too slowly"), "{out}");
        assert!(took < Duration::from_secs(8), "{took:?}");
        let (out, took) = trickle(&s, b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nea60\r\n", &[b'x'; 60]);
        assert!(out.starts_with("HTTP/1.1 408") && out.contains("too slowly"), "{out}");
        assert!(took < Duration::from_secs(8), "{took:?}");
        // a small head that takes a few seconds (a packet sent again) is served
        let mut c = TcpStream::connect(s.local_addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(b"GET / HTTP/1.1\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(3500));
        c.write_all(b"Connection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        // an ordinary request on a kept-alive connection is not hurried
        // by the time it waited before it
        let mut c = TcpStream::connect(s.local_addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let mut buf = [0u8; 4096];
        let n = c.read(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        std::thread::sleep(Duration::from_secs(3));
        c.write_all(b"POST / HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello").unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    }

    #[test]
    fn clients_are_addresses_or_ipv6_64s() {
        let a: std::net::IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: std::net::IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: std::net::IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_of(a), client_of(b));
        assert_ne!(client_of(a), client_of(c));
        let m: std::net::IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(client_of(m), "127.0.0.1".parse::<std::net::IpAddr>().unwrap());
        assert_ne!(client_of("127.0.0.1".parse().unwrap()), client_of("127.0.0.2".parse().unwrap()));
    }

    #[test]
    fn one_client_cannot_take_every_connection() {
        let s = start(Limits { max_connections: 10, max_connections_per_peer: 2, idle_timeout: Duration::from_secs(5), ..Limits::default() });
        let held: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(s.local_addr()).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(200));
        let r = roundtrip(&s, b"GET / HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        drop(held);
        let t = Instant::now();
        loop {
            let r = roundtrip(&s, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
            if r.starts_with("HTTP/1.1 200") {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(5), "{r}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn connections_over_the_cap_get_503_and_the_server_goes_on() {
        let s = start(Limits { max_connections: 4, idle_timeout: Duration::from_secs(5), ..Limits::default() });
        // four idle connections hold every slot
        let held: Vec<TcpStream> = (0..4)
            .map(|_| TcpStream::connect(s.local_addr()).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        let r = roundtrip(&s, b"GET / HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        assert!(s.stats.refused.load(Ordering::SeqCst) >= 1);
        drop(held);
        // slots come back
        let t = Instant::now();
        loop {
            let r = roundtrip(&s, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
            if r.starts_with("HTTP/1.1 200") {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(5), "{r}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn large_bodies_need_a_permit() {
        let s = start(Limits { large_body_bytes: 10, max_large_bodies: 1, ..Limits::default() });
        // one large body in flight (its sender stalls) holds the only permit
        let mut c = TcpStream::connect(s.local_addr()).unwrap();
        c.write_all(b"POST / HTTP/1.1\r\nContent-Length: 100\r\n\r\nabc").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let r = roundtrip(&s, b"POST / HTTP/1.1\r\nContent-Length: 20\r\n\r\n01234567890123456789");
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        // small ones go on
        let r = roundtrip(&s, b"POST / HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\n01234");
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        // a chunked body without a permit stops at the large size
        let r = roundtrip(&s, b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n14\r\n01234567890123456789\r\n0\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        drop(c);
        let t = Instant::now();
        loop {
            let r = roundtrip(&s, b"POST / HTTP/1.1\r\nContent-Length: 20\r\nConnection: close\r\n\r\n01234567890123456789");
            if r.starts_with("HTTP/1.1 200") {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(5), "{r}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn a_panicking_handler_gives_its_connection_slot_back() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let h: Arc<Handler> = Arc::new(|r: Request| {
            if r.path == "/boom" {
                panic!("a bug");
            }
            Response::new(200, "text/plain", "ok")
        });
        let s = Server::start(l, Limits { max_connections: 2, ..Limits::default() }, h).unwrap();
        for _ in 0..10 {
            let _ = roundtrip(&s, b"GET /boom HTTP/1.1\r\n\r\n");
        }
        std::thread::sleep(Duration::from_millis(200));
        assert!(roundtrip(&s, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").starts_with("HTTP/1.1 200"));
        let t = Instant::now();
        while s.stats.open.load(Ordering::SeqCst) != 0 {
            assert!(t.elapsed() < Duration::from_secs(5), "slots not given back");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn query_params_decode() {
        let r = Request {
            method: "GET".into(),
            path: "/".into(),
            query: "sentry_key=ab%20c&x=1+2".into(),
            headers: vec![],
            body: vec![],
            peer: None,
            large: false,
            permits: None,
        };
        assert_eq!(r.query_param("sentry_key").as_deref(), Some("ab c"));
        assert_eq!(r.query_param("x").as_deref(), Some("1 2"));
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
