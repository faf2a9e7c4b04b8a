//! Random identifiers from the operating system's CSPRNG, in base62 so they survive URLs,
//! shells and spreadsheets unquoted.

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
    }

    #[test]
    fn every_character_appears() {
        let sample = random_base62(20_000);
        for &c in BASE62 {
            assert!(sample.as_bytes().contains(&c), "{} never drawn", c as char);
        }
    }
}
