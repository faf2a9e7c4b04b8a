//! Reading request bodies within limits: a size cap on what arrives, a deadline for it to
//! arrive, and decompression (gzip, zstd) with its own cap on the decompressed size, so a
//! compression bomb costs at most the cap in memory and gets 413.
//!
//! A compressed body is read to its end, whatever it is made of: every gzip member (RFC 1952
//! allows concatenated members, which clients that compress a stream piece by piece send)
//! and every zstd frame. Bytes after the last member or frame are decoded as one more and
//! refused when they are not one (400 `invalid_encoding`), never ignored: no body is answered
//! 2xx for fewer records than it carried.

use std::future::{Future, poll_fn};
use std::io::Read;
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_ENCODING, CONTENT_LENGTH, HeaderMap};

use crate::error::ApiError;

/// Reads the whole body: at most `max_bytes` as sent and `max_bytes` once decompressed,
/// within `timeout`.
pub async fn read_body(
    headers: &HeaderMap,
    body: Incoming,
    max_bytes: usize,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    let too_large = || ApiError::TooLarge {
        code: "body_too_large",
        message: format!("the body is over the {max_bytes}-byte limit"),
    };
    let encoding = content_encoding(headers)?;
    // A declared length over the limit is refused before reading anything.
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > max_bytes as u64) {
        return Err(too_large());
    }
    let mut collecting = pin!(Limited::new(body, max_bytes).collect());
    // A small body has usually arrived with the head: take it without arming a timer, which
    // costs a timer-wheel insert and removal per request.
    let first_poll = poll_fn(|cx| Poll::Ready(collecting.as_mut().poll(cx))).await;
    let collected = match first_poll {
        Poll::Ready(result) => result,
        Poll::Pending => tokio::time::timeout(timeout, collecting)
            .await
            .map_err(|_| ApiError::BodyTimeout)?,
    };
    let collected = collected
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                too_large()
            } else {
                ApiError::InvalidJson(format!("the body could not be read: {e}"))
            }
        })?
        .to_bytes();
    decode(encoding, collected, max_bytes)
}

/// The body as sent, decompressed (every gzip member, every zstd frame) within `max_bytes`.
fn decode(encoding: Encoding, collected: Bytes, max_bytes: usize) -> Result<Bytes, ApiError> {
    match encoding {
        Encoding::Identity => Ok(collected),
        // MultiGzDecoder: GzDecoder stops after the first member and leaves the rest unread.
        Encoding::Gzip => decompress(flate2::read::MultiGzDecoder::new(&collected[..]), max_bytes),
        // zstd's reader goes on across concatenated frames until the input ends.
        Encoding::Zstd => {
            let decoder = zstd::stream::read::Decoder::new(&collected[..])
                .map_err(|e| ApiError::InvalidEncoding(format!("zstd: {e}")))?;
            decompress(decoder, max_bytes)
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Encoding {
    Identity,
    Gzip,
    Zstd,
}

fn content_encoding(headers: &HeaderMap) -> Result<Encoding, ApiError> {
    let Some(value) = headers.get(CONTENT_ENCODING) else {
        return Ok(Encoding::Identity);
    };
    let value = value
        .to_str()
        .map_err(|_| ApiError::UnsupportedEncoding("Content-Encoding is not text".into()))?
        .trim()
        .to_ascii_lowercase();
    match value.as_str() {
        "" | "identity" => Ok(Encoding::Identity),
        "gzip" | "x-gzip" => Ok(Encoding::Gzip),
        "zstd" => Ok(Encoding::Zstd),
        other => Err(ApiError::UnsupportedEncoding(format!(
            "Content-Encoding {other:?} is not supported: send gzip, zstd or none"
        ))),
    }
}

fn decompress(reader: impl Read, max_bytes: usize) -> Result<Bytes, ApiError> {
    let mut out = Vec::new();
    // One byte past the cap tells "exactly at the cap" from "over it".
    reader
        .take(max_bytes as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| {
            ApiError::InvalidEncoding(format!(
                "the body cannot be decompressed (a corrupt or truncated member or frame, or \
                 bytes after the last one): {e}"
            ))
        })?;
    if out.len() > max_bytes {
        return Err(ApiError::TooLarge {
            code: "decompressed_too_large",
            message: format!("the decompressed body is over the {max_bytes}-byte limit"),
        });
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    fn zstd(bytes: &[u8]) -> Vec<u8> {
        zstd::stream::encode_all(bytes, 1).unwrap()
    }

    const LINES: [&str; 3] = [
        "{\"metric_type\":\"impressions\",\"quantity\":1}\n",
        "{\"metric_type\":\"api_calls\",\"quantity\":2}\n",
        "{\"metric_type\":\"impressions\",\"quantity\":3}\n",
    ];

    #[test]
    fn every_gzip_member_and_zstd_frame_is_read() {
        let whole = LINES.concat();
        for (encoding, compress) in [
            (Encoding::Gzip, gzip as fn(&[u8]) -> Vec<u8>),
            (Encoding::Zstd, zstd),
        ] {
            let members: Vec<u8> = LINES.iter().flat_map(|l| compress(l.as_bytes())).collect();
            let decoded = decode(encoding, Bytes::from(members), 1 << 20).unwrap();
            assert_eq!(decoded, whole.as_bytes(), "{encoding:?}");
            // A JSON body cut in two members is one body.
            let body = br#"{"metric_type":"impressions","quantity":7}"#;
            let split: Vec<u8> = [compress(&body[..10]), compress(&body[10..])].concat();
            assert_eq!(
                decode(encoding, Bytes::from(split), 1 << 20).unwrap(),
                &body[..]
            );
        }
    }

    #[test]
    fn bytes_after_the_last_member_are_refused_not_ignored() {
        for (encoding, compress) in [
            (Encoding::Gzip, gzip as fn(&[u8]) -> Vec<u8>),
            (Encoding::Zstd, zstd),
        ] {
            for tail in [&b"garbage"[..], b"\0\0\0\0", b"{\"x\":1}"] {
                let mut body = compress(LINES[0].as_bytes());
                body.extend_from_slice(tail);
                let result = decode(encoding, Bytes::from(body), 1 << 20);
                assert!(
                    matches!(result, Err(ApiError::InvalidEncoding(_))),
                    "{encoding:?} {tail:?}: {result:?}"
                );
            }
        }
    }

    #[test]
    fn the_cap_counts_every_member() {
        let members: Vec<u8> = (0..4).flat_map(|_| gzip(&[b'x'; 100])).collect();
        assert!(decode(Encoding::Gzip, Bytes::from(members.clone()), 400).is_ok());
        assert!(matches!(
            decode(Encoding::Gzip, Bytes::from(members), 399),
            Err(ApiError::TooLarge { .. })
        ));
    }
}
