//! `Content-Encoding`: gzip, deflate (zlib, or raw as some clients send it)
//! and br, decoded under a cap on the decompressed size: a decompression
//! bomb is stopped at the cap, never expanded in memory.
use std::io::Read;

#[derive(Debug, PartialEq)]
pub enum DecodeError {
    /// more than the cap once decompressed
    TooLarge,
    /// an encoding we do not speak
    Unsupported(String),
    /// not valid data of its encoding
    Bad(String),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::TooLarge => write!(f, "body too large once decompressed"),
            DecodeError::Unsupported(e) => write!(f, "unsupported Content-Encoding {e:?}"),
            DecodeError::Bad(e) => write!(f, "body cannot be decompressed: {e}"),
        }
    }
}

/// Reads `r` to its end, refusing more than `max` bytes.
fn read_capped(r: impl Read, max: usize) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::new();
    let n = r
        .take(max as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| DecodeError::Bad(e.to_string()))?;
    if n > max {
        return Err(DecodeError::TooLarge);
    }
    Ok(out)
}

/// The body as sent, decoded by its `Content-Encoding` (the encodings in the
/// order they were applied, so undone last first).
pub fn decode(content_encoding: Option<&str>, body: &[u8], max: usize) -> Result<Vec<u8>, DecodeError> {
    let encodings: Vec<String> = content_encoding
        .unwrap_or("")
        .split(',')
        .map(|e| e.trim().to_ascii_lowercase())
        .filter(|e| !e.is_empty() && e != "identity")
        .collect();
    if encodings.len() > 2 {
        return Err(DecodeError::Unsupported(content_encoding.unwrap_or("").to_string()));
    }
    let mut data: Option<Vec<u8>> = None;
    for e in encodings.iter().rev() {
        let input: &[u8] = data.as_deref().unwrap_or(body);
        data = Some(match e.as_str() {
            "gzip" | "x-gzip" => read_capped(flate2::read::MultiGzDecoder::new(input), max)?,
            "deflate" => {
                // RFC 9110 says zlib; some clients send a raw deflate stream
                if input.len() >= 2 && (u16::from(input[0]) << 8 | u16::from(input[1])) % 31 == 0 && input[0] & 0x0f == 8 {
                    read_capped(flate2::read::ZlibDecoder::new(input), max)?
                } else {
                    read_capped(flate2::read::DeflateDecoder::new(input), max)?
                }
            }
            "br" => read_capped(brotli_decompressor::Decompressor::new(input, 4096), max)?,
            other => return Err(DecodeError::Unsupported(other.to_string())),
        });
    }
    match data {
        Some(d) => Ok(d),
        None if body.len() > max => Err(DecodeError::TooLarge),
        None => Ok(body.to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(b: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn each_encoding_round_trips() {
        let text = b"hello hello hello".repeat(100);
        assert_eq!(decode(Some("gzip"), &gzip(&text), 1 << 20).unwrap(), text);
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(&text).unwrap();
        assert_eq!(decode(Some("deflate"), &z.finish().unwrap(), 1 << 20).unwrap(), text);
        let mut d = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        d.write_all(&text).unwrap();
        assert_eq!(decode(Some("Deflate"), &d.finish().unwrap(), 1 << 20).unwrap(), text);
        assert_eq!(decode(None, &text, 1 << 20).unwrap(), text);
        assert_eq!(decode(Some("identity"), &text, 1 << 20).unwrap(), text);
        // two encodings, applied in order
        assert_eq!(decode(Some("gzip, gzip"), &gzip(&gzip(&text)), 1 << 20).unwrap(), text);
    }

    #[test]
    fn brotli_from_a_fixed_stream() {
        // "hello" compressed by brotli (quality 11)
        let br: [u8; 9] = [0x0b, 0x02, 0x80, 0x68, 0x65, 0x6c, 0x6c, 0x6f, 0x03];
        assert_eq!(decode(Some("br"), &br, 100).unwrap(), b"hello");
        assert!(matches!(decode(Some("br"), b"not brotli at all", 100), Err(DecodeError::Bad(_))));
    }

    #[test]
    fn a_bomb_stops_at_the_cap() {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(&vec![0u8; 50 << 20]).unwrap();
        let bomb = e.finish().unwrap();
        assert!(bomb.len() < 100_000);
        assert_eq!(decode(Some("gzip"), &bomb, 1 << 20), Err(DecodeError::TooLarge));
        assert_eq!(decode(None, &[0; 11], 10), Err(DecodeError::TooLarge));
    }

    #[test]
    fn bad_and_unknown() {
        assert!(matches!(decode(Some("gzip"), b"nope", 100), Err(DecodeError::Bad(_))));
        let mut g = gzip(b"some text that is long enough to cut");
        g.truncate(g.len() / 2);
        assert!(matches!(decode(Some("gzip"), &g, 100), Err(DecodeError::Bad(_))));
        assert!(matches!(decode(Some("zstd"), b"x", 100), Err(DecodeError::Unsupported(_))));
    }
}
