//! Dashboard tokens: HS256 JWTs signed with `APEX_JWT_SECRET`, `sub` the customer id, `exp`
//! required. `apexctl token` mints them for operators and local trials; `apex-server`
//! verifies them (`ingest/src/auth.rs`).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Signs `claims` (a JSON object) as an HS256 JWT.
pub fn sign(claims: &serde_json::Value, secret: &[u8]) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(format!("{header}.{payload}").as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{header}.{payload}.{signature}")
}

/// A token for `customer_id`, valid from `now` for `ttl_secs` seconds.
pub fn dashboard_token(customer_id: &str, secret: &[u8], now: i64, ttl_secs: i64) -> String {
    sign(
        &serde_json::json!({"sub": customer_id, "iat": now, "exp": now + ttl_secs}),
        secret,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_carry_the_customer_and_expiry() {
        let token = dashboard_token("cus_a", b"secret", 1_000, 60);
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(
            claims,
            serde_json::json!({"sub": "cus_a", "iat": 1_000, "exp": 1_060})
        );
        // A known vector: HMAC-SHA256 over "header.payload" with the key "secret".
        let mut mac = Hmac::<Sha256>::new_from_slice(b"secret").unwrap();
        mac.update(format!("{}.{}", parts[0], parts[1]).as_bytes());
        assert_eq!(
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()),
            parts[2]
        );
    }
}
