//! Reading request bodies within limits: a size cap on what arrives, a deadline for it to
//! arrive, and decompression (gzip, zstd) with its own cap on the decompressed size, so a
//! compression bomb costs at most the cap in memory and gets 413.

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
    match encoding {
        Encoding::Identity => Ok(collected),
        Encoding::Gzip => decompress(flate2::read::GzDecoder::new(&collected[..]), max_bytes),
        Encoding::Zstd => {
            let decoder = zstd::stream::read::Decoder::new(&collected[..])
                .map_err(|e| ApiError::InvalidEncoding(format!("zstd: {e}")))?;
            decompress(decoder, max_bytes)
        }
    }
}

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
        .map_err(|e| ApiError::InvalidEncoding(format!("the body cannot be decompressed: {e}")))?;
    if out.len() > max_bytes {
        return Err(ApiError::TooLarge {
            code: "decompressed_too_large",
            message: format!("the decompressed body is over the {max_bytes}-byte limit"),
        });
    }
    Ok(Bytes::from(out))
}
