//! Dashboard tokens: HS256 JWTs signed with `APEX_JWT_SECRET`, `sub` the customer id, `exp`
//! required. `apexctl token` mints them ([`dashboard_token`]) and `apex-server` checks them
//! ([`verify`]); both go through `jsonwebtoken`, so the JOSE encoding, the HMAC and its
//! constant-time comparison are a maintained library's.
//!
//! The rules of [`verify`], in the order they are checked:
//! - three base64url parts, the header a JSON *object* (an array or anything else is refused
//!   before any signature work) with a string `alg`;
//! - the algorithm is pinned: `alg` must be `HS256`, nothing else is tried, so `none` and
//!   algorithm-confusion tokens are refused (`UnsupportedAlgorithm`); `typ`, when present, is `JWT`; a `crit` header
//!   is refused (we understand no extension);
//! - the HMAC-SHA256 over the first two parts as sent, compared in constant time;
//! - the claims a JSON object; `exp` required and checked without leeway against the time the
//!   caller passes (the dashboard mints short tokens from the same clock family, and tests
//!   move the clock), `nbf` honoured when present, NumericDates by the whole second;
//! - `sub` a customer id ([`crate::ids::is_customer_id`]): the only identity a request has,
//!   so a customer can never name another customer's data.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};

use crate::ids::is_customer_id;

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not three base64url parts of JSON objects.
    #[error("the token is not a well-formed JWT")]
    Malformed,
    /// `alg` is not HS256.
    #[error("only HS256 tokens are accepted")]
    UnsupportedAlgorithm,
    /// The MAC does not match.
    #[error("the token's signature is not valid")]
    BadSignature,
    /// `exp` is missing.
    #[error("the token has no exp claim")]
    MissingExpiry,
    /// `exp` has passed.
    #[error("the token has expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("the token is not valid yet")]
    NotYetValid,
    /// `sub` is missing or not a customer id (the edge also answers this for a customer id
    /// that names no customer).
    #[error("the token's sub is not a known customer")]
    InvalidSubject,
}

/// The verified identity of a dashboard request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The customer id.
    pub customer_id: String,
    /// Expiry, unix seconds.
    pub expires_at: i64,
}

/// A token cannot be signed with an empty secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the signing secret is empty")]
pub struct EmptySecret;

/// Signs `claims` (a JSON object) as an HS256 JWT with header `{"typ":"JWT","alg":"HS256"}`.
pub fn sign(claims: &Value, secret: &[u8]) -> Result<String, EmptySecret> {
    let key = EncodingKey::from_secret(secret).map_err(|_| EmptySecret)?;
    // HS256 over a serialized JSON value has no other way to fail.
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &key).map_err(|_| EmptySecret)
}

/// A token for `customer_id`, valid from `now` (unix seconds) for `ttl_secs` seconds.
pub fn dashboard_token(
    customer_id: &str,
    secret: &[u8],
    now: i64,
    ttl_secs: i64,
) -> Result<String, EmptySecret> {
    sign(
        &serde_json::json!({
            "sub": customer_id,
            "iat": now,
            "exp": now.saturating_add(ttl_secs),
        }),
        secret,
    )
}

/// The JSON object a base64url part decodes to.
fn object_part(part: &str) -> Result<Map<String, Value>, TokenError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| TokenError::Malformed)?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(TokenError::Malformed),
    }
}

/// A NumericDate claim: seconds, a fraction counting by the whole second.
fn numeric_date(value: &Value) -> Result<i64, TokenError> {
    value
        .as_i64()
        .or_else(|| {
            value
                .as_f64()
                .filter(|f| f.is_finite())
                // `as` saturates: 1e300 is i64::MAX, never a wrapped value.
                .map(|f| f.floor() as i64)
        })
        .ok_or(TokenError::Malformed)
}

/// Checks `token` against `secret` at `now` (unix seconds); the rules are in the module docs.
pub fn verify(token: &str, secret: &[u8], now: i64) -> Result<Claims, TokenError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let header = object_part(header)?;
    match header.get("alg") {
        Some(Value::String(alg)) if alg == "HS256" => {}
        Some(Value::String(_)) => return Err(TokenError::UnsupportedAlgorithm),
        // No algorithm, or one that is not even a name: not a JWT header.
        _ => return Err(TokenError::Malformed),
    }
    if header
        .get("typ")
        .is_some_and(|typ| !typ.as_str().is_some_and(|t| t.eq_ignore_ascii_case("JWT")))
        || header.contains_key("crit")
    {
        return Err(TokenError::Malformed);
    }
    // The library checks the algorithm again and the signature; the time rules are ours,
    // against the caller's clock.
    let mut validation = Validation::new(Algorithm::HS256);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    // An empty secret verifies nothing.
    let key = DecodingKey::from_secret(secret).map_err(|_| TokenError::BadSignature)?;
    let decoded = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation).map_err(
        |e| match e.kind() {
            ErrorKind::InvalidSignature => TokenError::BadSignature,
            ErrorKind::InvalidAlgorithm => TokenError::UnsupportedAlgorithm,
            _ => TokenError::Malformed,
        },
    )?;
    let claims = decoded.claims;
    let expires_at = numeric_date(claims.get("exp").ok_or(TokenError::MissingExpiry)?)?;
    if now >= expires_at {
        return Err(TokenError::Expired);
    }
    if let Some(nbf) = claims.get("nbf")
        && now < numeric_date(nbf)?
    {
        return Err(TokenError::NotYetValid);
    }
    match claims.get("sub") {
        Some(Value::String(sub)) if is_customer_id(sub) => Ok(Claims {
            customer_id: sub.clone(),
            expires_at,
        }),
        _ => Err(TokenError::InvalidSubject),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &[u8] = b"test-secret-test-secret-test-secret!";
    const NOW: i64 = 1_790_000_000;

    fn token(claims: &Value) -> String {
        sign(claims, SECRET).unwrap()
    }

    /// A token with any header, signed over its parts as given (jsonwebtoken's own HMAC).
    fn with_header(header: &str, claims: &Value, secret: &[u8]) -> String {
        let h = URL_SAFE_NO_PAD.encode(header);
        let p = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signature = jsonwebtoken::crypto::sign(
            format!("{h}.{p}").as_bytes(),
            &EncodingKey::from_secret(secret).unwrap(),
            Algorithm::HS256,
        )
        .unwrap();
        format!("{h}.{p}.{signature}")
    }

    #[test]
    fn tokens_carry_the_customer_and_expiry() {
        let token = dashboard_token("cus_a", SECRET, NOW, 60).unwrap();
        assert_eq!(dashboard_token("cus_a", b"", NOW, 60), Err(EmptySecret));
        assert_eq!(verify(&token, b"", NOW), Err(TokenError::BadSignature));
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims, json!({"sub": "cus_a", "iat": NOW, "exp": NOW + 60}));
        let header: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header["alg"], "HS256");
        assert_eq!(
            verify(&token, SECRET, NOW),
            Ok(Claims {
                customer_id: "cus_a".into(),
                expires_at: NOW + 60
            })
        );
    }

    #[test]
    fn signatures_match_an_independent_implementation() {
        // Computed with Python: base64url(hmac.new(b"secret", b"eyJhbGciOiJIUzI1NiJ9.e30",
        // hashlib.sha256).digest()), unpadded.
        let signature = jsonwebtoken::crypto::sign(
            b"eyJhbGciOiJIUzI1NiJ9.e30",
            &EncodingKey::from_secret(b"secret").unwrap(),
            Algorithm::HS256,
        )
        .unwrap();
        assert_eq!(signature, "XmNK3GpH3Ys_7wsYBfq4C3M6goz71I7dTgUkuIa5lyQ");
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
        let check = |claims: Value| verify(&token(&claims), SECRET, NOW);
        assert_eq!(
            check(json!({"sub": "cus_a", "exp": NOW})),
            Err(TokenError::Expired)
        );
        assert_eq!(
            check(json!({"sub": "cus_a", "exp": NOW - 1000})),
            Err(TokenError::Expired)
        );
        assert_eq!(
            check(json!({"sub": "cus_a"})),
            Err(TokenError::MissingExpiry)
        );
        assert_eq!(
            check(json!({"sub": "cus_a", "exp": "tomorrow"})),
            Err(TokenError::Malformed)
        );
        assert_eq!(
            check(json!({"sub": "cus_a", "exp": NOW + 60, "nbf": NOW + 10})),
            Err(TokenError::NotYetValid)
        );
        assert!(check(json!({"sub": "cus_a", "exp": NOW + 60, "nbf": NOW})).is_ok());
        // Hostile numbers saturate; they never wrap into a valid window.
        assert!(check(json!({"sub": "cus_a", "exp": 1e300})).is_ok());
        assert_eq!(
            check(json!({"sub": "cus_a", "exp": -1e300})),
            Err(TokenError::Expired)
        );
        assert_eq!(
            check(json!({"sub": "cus_a", "exp": NOW + 60, "nbf": 1e300})),
            Err(TokenError::NotYetValid)
        );
        assert_eq!(
            check(json!({"sub": "cus_a", "exp": i64::MIN})),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn algorithms_other_than_hs256_are_refused() {
        let claims = json!({"sub": "cus_a", "exp": NOW + 60});
        for header in [
            r#"{"alg":"none","typ":"JWT"}"#,
            r#"{"alg":"HS512","typ":"JWT"}"#,
            r#"{"alg":"RS256","typ":"JWT"}"#,
            r#"{"alg":"hs256","typ":"JWT"}"#,
        ] {
            assert_eq!(
                verify(&with_header(header, &claims, SECRET), SECRET, NOW),
                Err(TokenError::UnsupportedAlgorithm),
                "{header}"
            );
        }
        // alg none with an empty signature.
        let unsigned = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        assert_eq!(
            verify(&unsigned, SECRET, NOW),
            Err(TokenError::UnsupportedAlgorithm)
        );
    }

    #[test]
    fn signatures_and_shapes_are_checked() {
        let claims = json!({"sub": "cus_a", "exp": NOW + 60});
        let good = token(&claims);
        assert_eq!(
            verify(&good, b"another-secret-another-secret-!!", NOW),
            Err(TokenError::BadSignature)
        );
        // A claims part swapped under a good signature.
        let parts: Vec<&str> = good.split('.').collect();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(json!({"sub": "cus_b", "exp": NOW + 60}).to_string()),
            parts[2]
        );
        assert_eq!(verify(&forged, SECRET, NOW), Err(TokenError::BadSignature));
        for header in [
            r#"{"alg":"HS256","typ":"JWS"}"#,
            r#"{"alg":"HS256","crit":["x"]}"#,
            r#"{"typ":"JWT"}"#,
            r#"{"alg":["HS256"]}"#,
            r#"{"alg":null}"#,
        ] {
            assert_eq!(
                verify(&with_header(header, &claims, SECRET), SECRET, NOW),
                Err(TokenError::Malformed),
                "{header}"
            );
        }
        for bad in [
            "",
            "a.b",
            "a.b.c.d",
            "not-a-jwt",
            "!!!.???.***",
            &format!("{good}.extra"),
            &format!("{good}="),
        ] {
            assert!(verify(bad, SECRET, NOW).is_err(), "{bad:?}");
        }
        // A header or claims set that is a JSON array, not an object, signed correctly.
        for header in [
            r#"["HS256"]"#,
            r#"["HS256","JWT",null]"#,
            "null",
            r#""HS256""#,
        ] {
            assert_eq!(
                verify(&with_header(header, &claims, SECRET), SECRET, NOW),
                Err(TokenError::Malformed),
                "{header}"
            );
        }
        let array_claims = with_header(r#"{"alg":"HS256"}"#, &json!(["cus_a", NOW + 60]), SECRET);
        assert_eq!(
            verify(&array_claims, SECRET, NOW),
            Err(TokenError::Malformed)
        );
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
                Err(TokenError::InvalidSubject),
                "{sub}"
            );
        }
        assert_eq!(
            verify(&token(&json!({"exp": NOW + 60})), SECRET, NOW),
            Err(TokenError::InvalidSubject)
        );
    }
}
