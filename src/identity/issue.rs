//! Tokens for deployments without an identity provider: `sde-gateway issue-token` signs one for
//! a user with the deployment's private signing key, for the issuer, audience and algorithm the
//! gateway's `[identity]` section names, and checks it with the gateway's own verifier before
//! handing it out, so a token that this gateway would refuse is never issued. Deployments with
//! an identity provider (`identity.jwks_url`) get their tokens from it; this refuses them.

use std::path::Path;
use std::sync::Arc;

use super::{IdentityError, TokenIssuer, TokenVerifier};
use crate::clock::SystemClock;
use crate::config::IdentityConfig;

/// The longest lifetime a token may be issued for: a day's work, renewed as it ends.
pub const MOST_TTL_SECS: i64 = 24 * 3600;

/// A lifetime such as `8h`, `30m`, `90s` or `3600` (seconds), at most [`MOST_TTL_SECS`].
pub fn parse_ttl(text: &str) -> Result<i64, String> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&text[..i], c),
        _ => (text, 's'),
    };
    let scale = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        _ => {
            return Err(format!(
                "`{text}`: a lifetime is a number of seconds, or ends in s, m or h"
            ));
        }
    };
    let secs = number
        .parse::<i64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .filter(|s| *s > 0)
        .ok_or_else(|| format!("`{text}`: a lifetime is a positive whole number, such as 8h"))?;
    match secs <= MOST_TTL_SECS {
        true => Ok(secs),
        false => Err(format!(
            "`{text}`: tokens live at most 24h; issue a new one when it ends"
        )),
    }
}

/// Signs a token for `user` that lives `ttl_secs` from now, with the PEM private key at
/// `signing_key`, and verifies it as the gateway configured by `identity` would.
pub async fn issue_token(
    identity: &IdentityConfig,
    signing_key: &Path,
    user: &str,
    ttl_secs: i64,
) -> Result<String, IdentityError> {
    if identity.jwks_url.is_some() {
        return Err(IdentityError::Invalid(
            "this deployment's tokens come from its identity provider (identity.jwks_url)".into(),
        ));
    }
    if user.is_empty() || user.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(IdentityError::Invalid(format!("`{user}` is not a user name")));
    }
    let pem = std::fs::read(signing_key).map_err(|e| IdentityError::Key {
        path: signing_key.display().to_string(),
        message: e.to_string(),
    })?;
    let issuer = TokenIssuer::new(&pem, &identity.algorithm, &identity.issuer, &identity.audience)?;
    let clock: crate::clock::SharedClock = Arc::new(SystemClock);
    let token = issuer.issue(user, clock.now().timestamp(), ttl_secs);
    // The gateway's own check: the key pair matches, and the claims are what it expects.
    TokenVerifier::from_config(identity, clock)?.verify(&token).await.map_err(|e| {
        IdentityError::Invalid(format!(
            "the token signed with {} does not pass this gateway's check ({e}); is it the private half of identity.public_key?",
            signing_key.display()
        ))
    })?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_are_read_with_their_unit_and_bounded() {
        assert_eq!(parse_ttl("8h"), Ok(8 * 3600));
        assert_eq!(parse_ttl("30m"), Ok(1800));
        assert_eq!(parse_ttl("90s"), Ok(90));
        assert_eq!(parse_ttl("3600"), Ok(3600));
        for bad in ["", "0", "-5m", "2d", "25h", "h", "1.5h", "99999999999999999999"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }
}
