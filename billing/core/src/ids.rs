//! Identifiers: new ones from the operating system's CSPRNG, in base62 so they survive URLs,
//! shells and spreadsheets unquoted, and the one rule of what a customer id looks like
//! ([`is_customer_id`]), which the edge checks and sign-up makes.

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// `len` uniformly random base62 characters.
pub fn random_base62(len: usize) -> String {
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        getrandom::fill(&mut buf).expect("the OS random source is unavailable");
        // 248 = 4 * 62: rejecting the bytes above it keeps every character equally likely.
        for &b in buf.iter().filter(|&&b| b < 248) {
            if out.len() == len {
                break;
            }
            out.push(BASE62[usize::from(b % 62)] as char);
        }
    }
    out
}

/// A new customer id, `cus_` and 16 base62 characters (95 bits).
pub fn new_customer_id() -> String {
    format!("cus_{}", random_base62(16))
}

/// True for `cus_` and 1 to 64 letters, digits or underscores: every id [`new_customer_id`]
/// makes, and the ids the `customers` table's check takes (`^cus_[A-Za-z0-9_]+$`) up to a
/// length the edge is willing to look up.
pub fn is_customer_id(text: &str) -> bool {
    text.strip_prefix("cus_").is_some_and(|rest| {
        !rest.is_empty()
            && rest.len() <= 64
            && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    })
}

/// A new API key id, `key_` and 16 base62 characters. The id is public; the key is not.
pub fn new_key_id() -> String {
    format!("key_{}", random_base62(16))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_their_prefix_length_and_alphabet() {
        let id = new_customer_id();
        assert!(id.starts_with("cus_") && id.len() == 20, "{id}");
        assert!(id[4..].bytes().all(|b| BASE62.contains(&b)));
        assert_ne!(new_key_id(), new_key_id());
        assert!(is_customer_id(&id));
    }

    #[test]
    fn customer_ids_have_one_shape() {
        for good in ["cus_a", "cus_0123456789abcdef", "cus_imported_id_1"] {
            assert!(is_customer_id(good), "{good}");
        }
        let long = format!("cus_{}", "x".repeat(65));
        for bad in [
            "",
            "cus_",
            "cus",
            "admin",
            "cus_a b",
            "cus_a;drop",
            "cus_é",
            long.as_str(),
        ] {
            assert!(!is_customer_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn every_character_appears() {
        let sample = random_base62(20_000);
        for &c in BASE62 {
            assert!(sample.as_bytes().contains(&c), "{} never drawn", c as char);
        }
    }
}
