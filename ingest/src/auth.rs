//! Dashboard authentication: `Authorization: Bearer <jwt>`, HS256 with `APEX_JWT_SECRET`.
//!
//! The algorithm is pinned: the header must say `"alg":"HS256"` and nothing else is tried, so
//! `alg: none` and algorithm-confusion tokens are refused before any signature work. The MAC
//! is compared in constant time, before the claims are read. `exp` is required and checked
//! without leeway (the dashboard mints short tokens from the same clock family); `nbf` is
//! honoured when present; `sub` is the customer id, the only identity a request has, so a
//! customer can never name another customer's data. Admin endpoints use a separate static
//! token (`APEX_ADMIN_TOKEN`), compared in constant time.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use hyper::HeaderMap;
use hyper::header::AUTHORIZATION;
use serde::Deserialize;
use sha2::Sha256;

/// Why a token was refused. Every case is a 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// No `Authorization` header, or not `Bearer`.
    Missing,
    /// Not three base64url parts of JSON.
    Malformed,
    /// `alg` is not HS256.
    UnsupportedAlgorithm,
    /// The MAC does not match.
    BadSignature,
    /// `exp` is missing.
    MissingExpiry,
    /// `exp` has passed.
    Expired,
    /// `nbf` is in the future.
    NotYetValid,
    /// `sub` is missing or not a customer id.
    InvalidSubject,
}

impl AuthError {
    /// The error code and message of the 401.
    pub fn describe(self) -> (&'static str, &'static str) {
        match self {
            AuthError::Missing => (
                "missing_token",
                "send Authorization: Bearer <token> (a dashboard JWT)",
            ),
            AuthError::Malformed => ("invalid_token", "the token is not a well-formed JWT"),
            AuthError::UnsupportedAlgorithm => {
                ("unsupported_algorithm", "only HS256 tokens are accepted")
            }
            AuthError::BadSignature => ("invalid_signature", "the token's signature is not valid"),
            AuthError::MissingExpiry => ("missing_expiry", "the token has no exp claim"),
            AuthError::Expired => ("token_expired", "the token has expired"),
            AuthError::NotYetValid => ("token_not_yet_valid", "the token is not valid yet"),
            AuthError::InvalidSubject => {
                ("invalid_subject", "the token's sub is not a known customer")
            }
        }
    }
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    typ: Option<String>,
    crit: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawClaims {
    sub: Option<serde_json::Value>,
    exp: Option<serde_json::Value>,
    nbf: Option<serde_json::Value>,
}

/// The verified identity of a dashboard request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The customer id.
    pub customer_id: String,
    /// Expiry, unix seconds.
    pub expires_at: i64,
}

fn numeric_date(value: &serde_json::Value) -> Result<i64, AuthError> {
    // NumericDate may carry a fraction; the whole second is what counts.
    value
        .as_i64()
        .or_else(|| {
            value
                .as_f64()
                .filter(|f| f.is_finite())
                .map(|f| f.floor() as i64)
        })
        .ok_or(AuthError::Malformed)
}

/// True for `cus_` and 1 to 64 letters, digits or underscores (the customers table's rule).
pub fn is_customer_id(text: &str) -> bool {
    text.strip_prefix("cus_").is_some_and(|rest| {
        !rest.is_empty()
            && rest.len() <= 64
            && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    })
}

/// Parses a JOSE header or claims set, which must be a JSON object (serde would also take
/// an array for a struct).
fn object<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, AuthError> {
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(value @ serde_json::Value::Object(_)) => {
            serde_json::from_value(value).map_err(|_| AuthError::Malformed)
        }
        _ => Err(AuthError::Malformed),
    }
}

/// Verifies `token` against `secret` at `now` (unix seconds).
pub fn verify(token: &str, secret: &[u8], now: i64) -> Result<Claims, AuthError> {
    let mut parts = token.split('.');
    let (Some(header_part), Some(payload_part), Some(signature_part), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed);
    };
    let decode = |part: &str| {
        URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| AuthError::Malformed)
    };
    let header: Header =
        serde_json::from_slice(&decode(header_part)?).map_err(|_| AuthError::Malformed)?;
    if header.alg != "HS256" {
        return Err(AuthError::UnsupportedAlgorithm);
    }
    if header
        .typ
        .as_deref()
        .is_some_and(|t| !t.eq_ignore_ascii_case("JWT"))
        || header.crit.is_some()
    {
        return Err(AuthError::Malformed);
    }
    let signature = decode(signature_part)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    // The signing input is the first two parts as sent, with their dot.
    mac.update(&token.as_bytes()[..header_part.len() + 1 + payload_part.len()]);
    mac.verify_slice(&signature)
        .map_err(|_| AuthError::BadSignature)?;
    let claims: RawClaims = object(&decode(payload_part)?)?;
    let expires_at = numeric_date(claims.exp.as_ref().ok_or(AuthError::MissingExpiry)?)?;
    if now >= expires_at {
        return Err(AuthError::Expired);
    }
    if let Some(nbf) = &claims.nbf
        && now < numeric_date(nbf)?
    {
        return Err(AuthError::NotYetValid);
    }
    let customer_id = match claims.sub {
        Some(serde_json::Value::String(sub)) if is_customer_id(&sub) => sub,
        _ => return Err(AuthError::InvalidSubject),
    };
    Ok(Claims {
        customer_id,
        expires_at,
    })
}

/// The bearer token of `headers`, if the `Authorization` header is `Bearer <token>`.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Constant-time equality of two secrets: their SHA-256 digests are compared with no early
/// exit, so neither the contents nor the length of the expected one leak.
pub fn secrets_equal(given: &str, expected: &str) -> bool {
    use sha2::Digest;
    let (a, b) = (Sha256::digest(given), Sha256::digest(expected));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use apex_billing::tokens::sign;
    use serde_json::json;

    const SECRET: &[u8] = b"test-secret-test-secret-test-secret!";
    const NOW: i64 = 1_790_000_000;

    fn token(claims: &serde_json::Value) -> String {
        sign(claims, SECRET)
    }

    fn with_header(header: &str, claims: &serde_json::Value, secret: &[u8]) -> String {
        let h = URL_SAFE_NO_PAD.encode(header);
        let p = URL_SAFE_NO_PAD.encode(claims.to_string());
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(format!("{h}.{p}").as_bytes());
        format!(
            "{h}.{p}.{}",
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
        )
    }

    #[test]
    fn a_good_token_names_its_customer() {
        let t = token(&json!({"sub": "cus_abc123", "exp": NOW + 60}));
        assert_eq!(
            verify(&t, SECRET, NOW),
            Ok(Claims {
                customer_id: "cus_abc123".into(),
                expires_at: NOW + 60
            })
        );
        // Fractional NumericDates count by the whole second.
        let t = token(&json!({"sub": "cus_abc123", "exp": (NOW + 60) as f64 + 0.5}));
        assert!(verify(&t, SECRET, NOW).is_ok());
    }

    #[test]
    fn expiry_and_not_before_are_enforced() {
        assert_eq!(
            verify(&token(&json!({"sub": "cus_a", "exp": NOW})), SECRET, NOW),
            Err(AuthError::Expired)
        );
        assert_eq!(
            verify(
                &token(&json!({"sub": "cus_a", "exp": NOW - 1000})),
                SECRET,
                NOW
            ),
            Err(AuthError::Expired)
        );
        assert_eq!(
            verify(&token(&json!({"sub": "cus_a"})), SECRET, NOW),
            Err(AuthError::MissingExpiry)
        );
        assert_eq!(
            verify(
                &token(&json!({"sub": "cus_a", "exp": "tomorrow"})),
                SECRET,
                NOW
            ),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            verify(
                &token(&json!({"sub": "cus_a", "exp": NOW + 60, "nbf": NOW + 10})),
                SECRET,
                NOW
            ),
            Err(AuthError::NotYetValid)
        );
        assert!(
            verify(
                &token(&json!({"sub": "cus_a", "exp": NOW + 60, "nbf": NOW})),
                SECRET,
                NOW
            )
            .is_ok()
        );
    }

    #[test]
    fn algorithms_other_than_hs256_are_refused() {
        let claims = json!({"sub": "cus_a", "exp": NOW + 60});
        // alg none with an empty signature, and with a signature.
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        assert_eq!(
            verify(&none, SECRET, NOW),
            Err(AuthError::UnsupportedAlgorithm)
        );
        for alg in [
            "none", "None", "HS512", "HS384", "RS256", "ES256", "hs256", "",
        ] {
            let t = with_header(&format!(r#"{{"alg":"{alg}"}}"#), &claims, SECRET);
            assert_eq!(
                verify(&t, SECRET, NOW),
                Err(AuthError::UnsupportedAlgorithm),
                "{alg}"
            );
        }
        let t = with_header(r#"{"typ":"JWT"}"#, &claims, SECRET);
        assert_eq!(verify(&t, SECRET, NOW), Err(AuthError::Malformed));
        let t = with_header(r#"{"alg":"HS256","crit":["exp"]}"#, &claims, SECRET);
        assert_eq!(verify(&t, SECRET, NOW), Err(AuthError::Malformed));
    }

    #[test]
    fn a_wrong_key_or_a_changed_byte_breaks_the_signature() {
        let claims = json!({"sub": "cus_a", "exp": NOW + 60});
        let other = sign(&claims, b"another-secret-another-secret-12345");
        assert_eq!(verify(&other, SECRET, NOW), Err(AuthError::BadSignature));
        let good = token(&claims);
        // Swap the payload for another customer's, keeping the signature.
        let forged_payload =
            URL_SAFE_NO_PAD.encode(json!({"sub": "cus_b", "exp": NOW + 60}).to_string());
        let parts: Vec<&str> = good.split('.').collect();
        let forged = format!("{}.{forged_payload}.{}", parts[0], parts[2]);
        assert_eq!(verify(&forged, SECRET, NOW), Err(AuthError::BadSignature));
        let mut truncated = good.clone();
        truncated.pop();
        assert!(verify(&truncated, SECRET, NOW).is_err());
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let good = token(&json!({"sub": "cus_a", "exp": NOW + 60}));
        for bad in [
            "",
            "abc",
            "a.b",
            "a.b.c.d",
            "...",
            "!!.!!.!!",
            &format!("{good}.extra"),
            &format!("{}=", good),
        ] {
            assert!(verify(bad, SECRET, NOW).is_err(), "{bad:?}");
        }
        // A header or claims set that is a JSON array, not an object.
        let array = with_header(
            r#"["HS256"]"#,
            &json!({"sub": "cus_a", "exp": NOW + 60}),
            SECRET,
        );
        assert_eq!(verify(&array, SECRET, NOW), Err(AuthError::Malformed));
        let not_json = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode("not json"),
            URL_SAFE_NO_PAD.encode("{}")
        );
        assert_eq!(verify(&not_json, SECRET, NOW), Err(AuthError::Malformed));
    }

    #[test]
    fn subjects_must_be_customer_ids() {
        for sub in [
            json!(null),
            json!(42),
            json!("admin"),
            json!("cus_"),
            json!("cus_a b"),
            json!("cus_a;drop"),
        ] {
            let t = token(&json!({"sub": sub, "exp": NOW + 60}));
            assert_eq!(
                verify(&t, SECRET, NOW),
                Err(AuthError::InvalidSubject),
                "{sub}"
            );
        }
        assert_eq!(
            verify(&token(&json!({"exp": NOW + 60})), SECRET, NOW),
            Err(AuthError::InvalidSubject)
        );
    }

    #[test]
    fn bearer_tokens_and_admin_secrets() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer(&headers), None);
        headers.insert(AUTHORIZATION, "Bearer abc.def.ghi".parse().unwrap());
        assert_eq!(bearer(&headers), Some("abc.def.ghi"));
        headers.insert(AUTHORIZATION, "bearer   xyz ".parse().unwrap());
        assert_eq!(bearer(&headers), Some("xyz"));
        headers.insert(AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&headers), None);
        headers.insert(AUTHORIZATION, "Bearer ".parse().unwrap());
        assert_eq!(bearer(&headers), None);
        assert!(secrets_equal("s3cret-admin-token", "s3cret-admin-token"));
        assert!(!secrets_equal("s3cret-admin-tokeN", "s3cret-admin-token"));
        assert!(!secrets_equal("short", "s3cret-admin-token"));
    }
}
