//! fraiseql_ingest: what the extension's HTTP service does without
//! PostgreSQL, so that it is tested on its own.
//!
//! * `http`: a small HTTP/1.1 server (thread per connection under a cap,
//!   total deadlines for a request's head and body, keep-alive, chunked
//!   bodies, `Expect: 100-continue`). Its threads never call into
//!   PostgreSQL: a handler hands work to the worker's main thread.
//! * `encoding`: `Content-Encoding` gzip / deflate / br, with a cap on the
//!   decompressed size (a decompression bomb is refused, not expanded).
//! * `sentry`: Sentry's envelope and store formats, and an event turned into
//!   the capture the SQL functions make (grouping from the structured frames).
pub mod encoding;
pub mod http;
pub mod otlp;
pub mod sentry;
