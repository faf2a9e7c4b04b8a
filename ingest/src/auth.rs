//! Who a request is: the bearer credential of `Authorization` (the one parser of that header,
//! for API keys, dashboard tokens and the admin token alike), dashboard JWTs checked by
//! `apex_billing::tokens` (HS256 pinned, `exp` required, `sub` the customer), and the admin
//! token compared in constant time. Every refusal here is a 401 with a stable code.

use apex_billing::tokens::TokenError;
use hyper::HeaderMap;
use hyper::header::AUTHORIZATION;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Why a dashboard request was refused. Every case is a 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// No `Authorization` header, or not `Bearer`.
    Missing,
    /// The token was refused.
    Token(TokenError),
}

impl AuthError {
    /// The error code and message of the 401 (a token's message is its refusal's own text).
    pub fn describe(self) -> (&'static str, String) {
        match self {
            AuthError::Missing => (
                "missing_token",
                "send Authorization: Bearer <token> (a dashboard JWT)".into(),
            ),
            AuthError::Token(e) => (token_code(e), e.to_string()),
        }
    }
}

/// The API's stable code of a token refusal.
fn token_code(error: TokenError) -> &'static str {
    match error {
        TokenError::Malformed => "invalid_token",
        TokenError::UnsupportedAlgorithm => "unsupported_algorithm",
        TokenError::BadSignature => "invalid_signature",
        TokenError::MissingExpiry => "missing_expiry",
        TokenError::Expired => "token_expired",
        TokenError::NotYetValid => "token_not_yet_valid",
        TokenError::InvalidSubject => "invalid_subject",
    }
}

/// The `Authorization` header is there but is not `Bearer <credential>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotBearer;

/// The credential of `Authorization: Bearer <credential>` (scheme case-insensitive, the
/// credential trimmed): `Ok(None)` without the header, `Err` when it is something else
/// (another scheme, an empty credential, bytes that are not text).
pub fn bearer(headers: &HeaderMap) -> Result<Option<&str>, NotBearer> {
    let Some(value) = headers.get(AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.to_str().map_err(|_| NotBearer)?;
    match value.split_once(' ') {
        Some((scheme, credential))
            if scheme.eq_ignore_ascii_case("bearer") && !credential.trim().is_empty() =>
        {
            Ok(Some(credential.trim()))
        }
        _ => Err(NotBearer),
    }
}

/// Constant-time equality of two secrets: their SHA-256 digests are compared with `subtle`,
/// so neither the contents nor the length of the expected one leak through timing.
pub fn secrets_equal(given: &str, expected: &str) -> bool {
    let (a, b) = (Sha256::digest(given), Sha256::digest(expected));
    a.ct_eq(&b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_credentials_are_parsed_once_for_everyone() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer(&headers), Ok(None));
        headers.insert(AUTHORIZATION, "Bearer abc.def.ghi".parse().unwrap());
        assert_eq!(bearer(&headers), Ok(Some("abc.def.ghi")));
        headers.insert(AUTHORIZATION, "bearer   xyz ".parse().unwrap());
        assert_eq!(bearer(&headers), Ok(Some("xyz")));
        for bad in ["Basic abc", "Bearer ", "Bearer", "Token x"] {
            headers.insert(AUTHORIZATION, bad.parse().unwrap());
            assert_eq!(bearer(&headers), Err(NotBearer), "{bad:?}");
        }
        headers.insert(
            AUTHORIZATION,
            hyper::header::HeaderValue::from_bytes(b"Bearer \xff").unwrap(),
        );
        assert_eq!(bearer(&headers), Err(NotBearer));
    }

    #[test]
    fn admin_secrets_compare_by_digest() {
        assert!(secrets_equal("s3cret-admin-token", "s3cret-admin-token"));
        assert!(!secrets_equal("s3cret-admin-tokeN", "s3cret-admin-token"));
        assert!(!secrets_equal("short", "s3cret-admin-token"));
        assert!(!secrets_equal("", "s3cret-admin-token"));
    }

    #[test]
    fn every_token_refusal_has_its_code() {
        let codes: Vec<&str> = [
            AuthError::Missing,
            AuthError::Token(TokenError::Malformed),
            AuthError::Token(TokenError::UnsupportedAlgorithm),
            AuthError::Token(TokenError::BadSignature),
            AuthError::Token(TokenError::MissingExpiry),
            AuthError::Token(TokenError::Expired),
            AuthError::Token(TokenError::NotYetValid),
            AuthError::Token(TokenError::InvalidSubject),
        ]
        .iter()
        .map(|e| e.describe().0)
        .collect();
        assert_eq!(
            codes,
            [
                "missing_token",
                "invalid_token",
                "unsupported_algorithm",
                "invalid_signature",
                "missing_expiry",
                "token_expired",
                "token_not_yet_valid",
                "invalid_subject"
            ]
        );
    }
}
