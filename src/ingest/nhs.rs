//! NHS numbers and the linkage key. An NHS number is normalised (spaces removed) and its
//! Modulus 11 check digit validated before it is turned into `person_id`, a keyed
//! HMAC-SHA-256 of the normalised number: the same number gives the same pseudonym under the
//! same key in every dataset, and without the key nobody can reverse or recompute it.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Why a value is not a usable NHS number. The reasons are what the quarantine report counts;
/// they never carry the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum NhsNumberProblem {
    Missing,
    NotTenDigits,
    CheckDigit,
}

impl NhsNumberProblem {
    pub fn reason(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::NotTenDigits => "not 10 digits",
            Self::CheckDigit => "check digit invalid",
        }
    }
}

/// The ten digits of `raw` with spaces removed, if they form a valid NHS number.
pub fn normalise(raw: &str) -> Result<[u8; 10], NhsNumberProblem> {
    let mut digits = [0u8; 10];
    let mut n = 0;
    for b in raw.bytes() {
        match b {
            b' ' | b'\t' => continue,
            b'0'..=b'9' if n < 10 => {
                digits[n] = b;
                n += 1;
            }
            _ => return Err(NhsNumberProblem::NotTenDigits),
        }
    }
    match n {
        0 => Err(NhsNumberProblem::Missing),
        10 if check_digit(&digits[..9]) == Some(digits[9] - b'0') => Ok(digits),
        10 => Err(NhsNumberProblem::CheckDigit),
        _ => Err(NhsNumberProblem::NotTenDigits),
    }
}

/// The Modulus 11 check digit of the first nine digits (ASCII), or `None` where the
/// remainder gives 10, which no valid NHS number has.
pub fn check_digit(first_nine: &[u8]) -> Option<u8> {
    let sum: u32 = first_nine
        .iter()
        .zip((2..=10).rev())
        .map(|(d, weight)| u32::from(d - b'0') * weight)
        .sum();
    match 11 - sum % 11 {
        11 => Some(0),
        10 => None,
        check => Some(check as u8),
    }
}

/// A secret HMAC key. It never prints.
#[derive(Clone)]
pub struct LinkageKey(Vec<u8>);

impl std::fmt::Debug for LinkageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkageKey(<redacted>)")
    }
}

/// Fewest key bytes accepted: the key is what stops anyone recomputing pseudonyms.
pub const MIN_KEY_BYTES: usize = 32;

impl LinkageKey {
    /// A key from hex text (surrounding whitespace ignored), at least [`MIN_KEY_BYTES`] bytes.
    pub fn from_hex(text: &str) -> Result<Self, String> {
        let bytes = hex::decode(text.trim()).map_err(|_| "the key file must hold hex digits only".to_owned())?;
        if bytes.len() < MIN_KEY_BYTES {
            return Err(format!(
                "the key is {} bytes; at least {MIN_KEY_BYTES} are needed",
                bytes.len()
            ));
        }
        Ok(Self(bytes))
    }

    /// A fresh key from the operating system's secure random source, as hex for a key file.
    pub fn generate_hex() -> String {
        let mut bytes = [0u8; MIN_KEY_BYTES];
        rustls::crypto::aws_lc_rs::default_provider()
            .secure_random
            .fill(&mut bytes)
            .expect("the system's secure random source works");
        hex::encode(bytes)
    }
}

/// Turns NHS numbers into `person_id`s under one key.
#[derive(Clone)]
pub struct Pseudonymiser {
    keyed: Hmac<Sha256>,
}

/// Characters in a `person_id`: the first 128 bits of the HMAC, in lower-case hex.
pub const PERSON_ID_LEN: usize = 32;

impl Pseudonymiser {
    pub fn new(key: &LinkageKey) -> Self {
        Self {
            keyed: Hmac::<Sha256>::new_from_slice(&key.0).expect("HMAC takes keys of any length"),
        }
    }

    /// The pseudonym of a normalised NHS number.
    pub fn person_id(&self, nhs_number: &[u8; 10]) -> [u8; PERSON_ID_LEN] {
        let mut mac = self.keyed.clone();
        mac.update(nhs_number);
        let digest = mac.finalize().into_bytes();
        let mut out = [0u8; PERSON_ID_LEN];
        hex::encode_to_slice(&digest[..PERSON_ID_LEN / 2], &mut out).expect("sizes match");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modulus_11_accepts_valid_and_rejects_the_rest() {
        // 943 476 5919 is the NHS's own published example of a valid number.
        assert_eq!(normalise("943 476 5919"), Ok(*b"9434765919"));
        assert_eq!(normalise("9434765918"), Err(NhsNumberProblem::CheckDigit));
        assert_eq!(normalise(""), Err(NhsNumberProblem::Missing));
        assert_eq!(normalise("   "), Err(NhsNumberProblem::Missing));
        assert_eq!(normalise("943476591"), Err(NhsNumberProblem::NotTenDigits));
        assert_eq!(normalise("94347659190"), Err(NhsNumberProblem::NotTenDigits));
        assert_eq!(normalise("943-476-5919"), Err(NhsNumberProblem::NotTenDigits));
        // First nine digits whose remainder gives 10: no check digit makes them valid.
        let nine = (100_000_000u32..)
            .map(|n| n.to_string())
            .find(|s| check_digit(s.as_bytes()).is_none())
            .unwrap();
        for d in 0..10 {
            assert_eq!(normalise(&format!("{nine}{d}")), Err(NhsNumberProblem::CheckDigit));
        }
    }

    #[test]
    fn pseudonyms_depend_on_the_key_and_the_number() {
        let a = Pseudonymiser::new(&LinkageKey::from_hex(&"11".repeat(32)).unwrap());
        let b = Pseudonymiser::new(&LinkageKey::from_hex(&"22".repeat(32)).unwrap());
        let n = normalise("9434765919").unwrap();
        assert_eq!(a.person_id(&n), a.person_id(&normalise("943 476 5919").unwrap()));
        assert_ne!(a.person_id(&n), b.person_id(&n));
        assert_ne!(a.person_id(&n), a.person_id(&normalise("4010232137").unwrap()));
        let id = a.person_id(&n);
        assert!(id.iter().all(u8::is_ascii_hexdigit));
        assert!(LinkageKey::from_hex("abcd").unwrap_err().contains("at least 32"));
        assert!(LinkageKey::from_hex("zz").is_err());
        assert_eq!(
            format!("{:?}", LinkageKey::from_hex(&"11".repeat(32)).unwrap()),
            "LinkageKey(<redacted>)"
        );
    }
}
