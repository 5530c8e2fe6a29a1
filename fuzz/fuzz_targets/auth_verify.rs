//! Fuzz target: access tokens (`geobeat::auth::verify` and `try_mint`). Even first byte: the rest
//! is verified as a token string under a fixed secret (almost always refused; never a panic, and
//! never accepted unless it is exactly what `try_mint` would produce for its claims). Odd first byte:
//! a token is minted from fuzz-chosen scope letter, subject and expiry, must verify to the same
//! claims (before expiry) or be refused (at or after it), and after one fuzz-chosen edit must be
//! refused or verify to the very same claims.
#![no_main]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use geobeat::auth::{try_mint, verify, Claims, Scope, Secret};
use hmac::{Hmac, Mac as _};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;

/// The token minted for `claims`: by `try_mint` (`gb2`, with an issue time), or as builds before
/// issue times minted a `gb1` token (HMAC-SHA256 over the same fields without the issue time).
fn canonical(secret_bytes: [u8; 32], claims: &Claims) -> String {
    let secret = Secret::from_bytes(secret_bytes);
    if let Some(at_ms) = claims.issue.at_ms {
        return try_mint(&secret, &claims.scope, at_ms, claims.expires_at_s)
            .expect("verified claims mint");
    }
    let signed = format!(
        "gb1.{}.{}.{}",
        claims.scope.letter(),
        URL_SAFE_NO_PAD.encode(claims.scope.subject()),
        claims.expires_at_s
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(&secret_bytes).expect("any key length");
    mac.update(signed.as_bytes());
    format!(
        "{signed}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

fuzz_target!(|data: &[u8]| {
    let secret_bytes = [7u8; 32];
    let secret = Secret::from_bytes(secret_bytes);
    let now_s = 1_732_200_000u64;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let token = String::from_utf8_lossy(rest);
        if let Ok(claims) = verify(&secret, &token, now_s) {
            assert_eq!(
                canonical(secret_bytes, &claims),
                token,
                "only minted tokens verify"
            );
        }
        return;
    }
    // Structured: [letter][expiry delta u32][edit pos u16][edit byte][subject...]
    if rest.len() < 8 {
        return;
    }
    let letter = rest[0] % 4;
    let delta = u32::from_le_bytes(rest[1..5].try_into().unwrap());
    let edit_pos = usize::from(u16::from_le_bytes(rest[5..7].try_into().unwrap()));
    let edit_byte = rest[7];
    let subject = String::from_utf8_lossy(&rest[8..]).into_owned();
    let scope = match letter {
        0 => Scope::Device(subject),
        1 => Scope::Gateway(subject),
        2 => Scope::Ops,
        _ => Scope::Subscriber(subject),
    };
    let expires = now_s - 1000 + u64::from(delta);
    let issued_ms = (now_s - 500 + u64::from(delta % 1000)) * 1000 + u64::from(edit_byte);
    let Ok(token) = try_mint(&secret, &scope, issued_ms, expires) else {
        return;
    };
    match verify(&secret, &token, now_s) {
        Ok(claims) => {
            assert!(now_s < expires);
            assert_eq!(claims.scope, scope);
            assert_eq!(claims.expires_at_s, expires);
            assert_eq!(claims.issue.at_ms, Some(issued_ms));
        }
        Err(e) => assert!(now_s >= expires, "a fresh token was refused: {e}"),
    }
    // One edit: refused, or (when the edit left the text unchanged) the same claims.
    let mut edited = token.clone().into_bytes();
    let at = edit_pos % edited.len();
    edited[at] = edit_byte;
    let edited = String::from_utf8_lossy(&edited).into_owned();
    if let Ok(claims) = verify(&secret, &edited, now_s) {
        assert_eq!(edited, token, "an edited token verified");
        assert_eq!(claims.scope, scope);
    }
    // Another secret never accepts it.
    assert!(verify(&Secret::from_bytes([8u8; 32]), &token, now_s).is_err());
});
