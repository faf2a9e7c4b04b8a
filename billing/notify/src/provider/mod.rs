//! The email providers behind [`EmailProvider`](crate::message::EmailProvider), chosen by
//! `EMAIL_PROVIDER` ([`crate::config`]):
//!
//! - [`resend`]: Resend's HTTP API, with its `Idempotency-Key` (the same key within 24 hours
//!   is one email) and a request rate limit.
//! - [`smtp`]: any SMTP relay through `lettre` (Amazon SES too); a deterministic
//!   `Message-ID`, but no server-side deduplication (see that module).
//! - [`file`](mod@file): the same MIME message as SMTP, written to `<EMAIL_FILE_DIR>/<key>.eml`.
//!
//! What counts as transient (tried again) or permanent (given up) follows each protocol:
//! HTTP 429, 5xx and no answer are transient and other 4xx permanent; SMTP 4xx replies and no
//! answer are transient and 5xx permanent.

pub mod file;
pub mod resend;
pub mod smtp;

use crate::message::SendError;

/// The longest idempotency key accepted, in bytes (Resend allows 256; a file name and a
/// `Message-ID` line stay comfortably short with 200).
pub const MAX_KEY_LEN: usize = 200;

/// Checks that `key` can be a Resend `Idempotency-Key`, the left part of a `Message-ID`
/// (RFC 5322 `dot-atom-text`) and a file name all at once: 1 to [`MAX_KEY_LEN`] ASCII
/// letters, digits, `-`, `_` and `.`, with no leading, trailing or doubled dot. The queue's
/// `apex-email-<event id>` always passes. Errors: [`SendError::Permanent`], as the same key
/// can never pass.
pub fn check_idempotency_key(key: &str) -> Result<(), SendError> {
    let ok = !key.is_empty()
        && key.len() <= MAX_KEY_LEN
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !key.starts_with('.')
        && !key.ends_with('.')
        && !key.contains("..");
    if ok {
        Ok(())
    } else {
        Err(SendError::Permanent {
            reason: format!(
                "idempotency key {key:?} is not 1-{MAX_KEY_LEN} letters, digits, '-', '_' or single dots"
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_that_are_safe_everywhere() {
        for good in ["apex-email-42", "apex-email-0b1c.2", "A_b-9"] {
            assert_eq!(check_idempotency_key(good), Ok(()), "{good}");
        }
        let long = "k".repeat(MAX_KEY_LEN + 1);
        for bad in [
            "", ".hidden", "a..b", "end.", "a/b", "../x", "a b", "a@b", "ü", &long,
        ] {
            assert!(check_idempotency_key(bad).is_err(), "{bad}");
        }
    }
}
