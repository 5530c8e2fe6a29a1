//! Token minting and verification: round trips for every scope, and refusal of forged, expired,
//! tampered, wrongly-signed and malformed tokens; `gb1` tokens (before issue times) still
//! verify; token ids; plus the `geobeat token` command (secret source order, default TTLs,
//! output is only the token, the issue time is the command's clock).

use std::collections::HashMap;
use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use clap::Parser as _;
use geobeat::auth::{mint, try_mint, verify, Scope, Secret, TokenError, TokenId, SECRET_FILE_NAME};
use geobeat::config::{Cli, Command, TokenArgs};
use geobeat::tokens::{run_token_command_with, TokenCommandError};
use proptest::prelude::*;

const NOW: u64 = 1_732_200_000;

fn secret(seed: u8) -> Secret {
    Secret::from_bytes([seed; 32])
}

fn scopes() -> Vec<Scope> {
    vec![
        Scope::Device("truck-0042".into()),
        Scope::Device("ünïcode-é".into()),
        Scope::Gateway("fleet-a/".into()),
        Scope::Gateway(String::new()),
        Scope::Ops,
        Scope::Subscriber("fleet-".into()),
    ]
}

#[test]
fn every_scope_round_trips() {
    // mint -> verify yields the same scope, expiry and issue time, before expiry; the id is
    // the token's.
    let s = secret(1);
    for scope in scopes() {
        let token = try_mint(&s, &scope, NOW * 1000 + 7, NOW + 60).unwrap();
        assert!(
            token.starts_with(&format!("gb2.{}.", scope.letter())),
            "{token}"
        );
        let claims = verify(&s, &token, NOW).unwrap();
        assert_eq!(claims.scope, scope);
        assert_eq!(claims.expires_at_s, NOW + 60);
        assert_eq!(claims.issue.at_ms, Some(NOW * 1000 + 7));
        assert_eq!(claims.issue.id, TokenId::of(&token));
    }
    // `mint` stamps the wall clock.
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let claims = verify(&s, &mint(&s, &Scope::Ops, u64::MAX / 2), NOW).unwrap();
    assert!(claims.issue.at_ms.unwrap() >= before);
}

/// A `gb1` token, as builds before issue times minted it.
fn gb1(s_bytes: [u8; 32], letter: &str, subject: &str, expiry: u64) -> String {
    use hmac::{Hmac, Mac as _};
    let signed = format!("gb1.{letter}.{}.{expiry}", URL_SAFE_NO_PAD.encode(subject));
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&s_bytes).unwrap();
    mac.update(signed.as_bytes());
    format!(
        "{signed}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

#[test]
fn gb1_tokens_still_verify_without_an_issue_time() {
    // Tokens minted before issue times keep working (no issue time); tampering still fails; a
    // gb1 token's parts cannot be passed off as a gb2 token.
    let s = secret(8);
    let t = gb1([8; 32], "d", "truck-9", NOW + 60);
    let claims = verify(&s, &t, NOW).unwrap();
    assert_eq!(claims.scope, Scope::Device("truck-9".into()));
    assert_eq!((claims.expires_at_s, claims.issue.at_ms), (NOW + 60, None));
    assert_eq!(claims.issue.id, TokenId::of(&t));
    assert_eq!(
        verify(&s, &t, NOW + 60),
        Err(TokenError::Expired {
            expires_at_s: NOW + 60
        })
    );
    let parts: Vec<&str> = t.split('.').collect();
    let as_gb2 = format!("gb2.d.{}.0.{}.{}", parts[2], parts[3], parts[4]);
    assert_eq!(verify(&s, &as_gb2, NOW), Err(TokenError::BadSignature));
}

#[test]
fn token_ids_are_short_stable_and_distinct() {
    // 12 hex digits, the same for the same text, different for different tokens, never a part
    // of the token.
    let s = secret(9);
    let a = try_mint(&s, &Scope::Ops, 1, NOW).unwrap();
    let b = try_mint(&s, &Scope::Ops, 2, NOW).unwrap();
    let id = TokenId::of(&a).to_string();
    assert_eq!(id.len(), 12);
    assert!(id.bytes().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(id, TokenId::of(&a).to_string());
    assert_ne!(id, TokenId::of(&b).to_string());
    assert!(!a.contains(&id));
}

#[test]
fn expiry_is_exclusive() {
    // Valid one second before expiry, expired at and after it.
    let s = secret(1);
    let token = mint(&s, &Scope::Ops, NOW);
    assert!(verify(&s, &token, NOW - 1).is_ok());
    assert_eq!(
        verify(&s, &token, NOW),
        Err(TokenError::Expired { expires_at_s: NOW })
    );
    assert_eq!(
        verify(&s, &token, u64::MAX),
        Err(TokenError::Expired { expires_at_s: NOW })
    );
}

#[test]
fn wrong_secret_is_bad_signature() {
    // A token from another server's secret never verifies.
    let token = mint(&secret(1), &Scope::Device("d".into()), NOW + 60);
    assert_eq!(
        verify(&secret(2), &token, NOW),
        Err(TokenError::BadSignature)
    );
}

#[test]
fn tampered_parts_are_bad_signature() {
    // Changing scope letter, subject or expiry (keeping the MAC) breaks the signature.
    let s = secret(3);
    let token = try_mint(&s, &Scope::Device("d-1".into()), NOW * 1000, NOW + 60).unwrap();
    let parts: Vec<&str> = token.split('.').collect();
    let forge_at = |letter: &str, subject: &str, issued: &str, expiry: &str| {
        format!(
            "gb2.{letter}.{}.{issued}.{expiry}.{}",
            URL_SAFE_NO_PAD.encode(subject),
            parts[5]
        )
    };
    let issued = (NOW * 1000).to_string();
    let forge =
        |letter: &str, subject: &str, expiry: &str| forge_at(letter, subject, &issued, expiry);
    // A later issue time (to escape a revocation) breaks the signature too.
    let later_issue = (NOW * 1000 + 1).to_string();
    assert_eq!(
        verify(
            &s,
            &forge_at("d", "d-1", &later_issue, &(NOW + 60).to_string()),
            NOW
        ),
        Err(TokenError::BadSignature)
    );
    let exp = (NOW + 60).to_string();
    assert!(verify(&s, &forge("d", "d-1", &exp), NOW).is_ok(), "control");
    assert_eq!(
        verify(&s, &forge("g", "d-1", &exp), NOW),
        Err(TokenError::BadSignature)
    );
    assert_eq!(
        verify(&s, &forge("s", "d-1", &exp), NOW),
        Err(TokenError::BadSignature)
    );
    assert_eq!(
        verify(&s, &forge("d", "d-2", &exp), NOW),
        Err(TokenError::BadSignature)
    );
    let later = (NOW + 10_000_000).to_string();
    assert_eq!(
        verify(&s, &forge("d", "d-1", &later), NOW),
        Err(TokenError::BadSignature)
    );
    // Ops upgrade attempt: letter o with empty subject.
    assert_eq!(
        verify(&s, &forge("o", "", &exp), NOW),
        Err(TokenError::BadSignature)
    );
}

#[test]
fn forged_mac_is_bad_signature() {
    // A well-formed token with a made-up MAC fails in the MAC check.
    let s = secret(4);
    let forged = format!("gb1.o..{}.{}", NOW + 60, URL_SAFE_NO_PAD.encode([0x5a; 32]));
    assert_eq!(verify(&s, &forged, NOW), Err(TokenError::BadSignature));
    let forged = format!(
        "gb2.o..1.{}.{}",
        NOW + 60,
        URL_SAFE_NO_PAD.encode([0x5a; 32])
    );
    assert_eq!(verify(&s, &forged, NOW), Err(TokenError::BadSignature));
}

#[test]
fn malformed_tokens() {
    // Structure problems are Malformed, checked before any MAC work.
    let s = secret(5);
    let good = mint(&s, &Scope::Device("d".into()), NOW + 60);
    let mac = good.rsplit('.').next().unwrap();
    let cases = [
        String::new(),
        "gb1".into(),
        "gb1.d.ZA.123".into(),
        format!("gb1.d.ZA.{}.{mac}.x", NOW + 60),
        format!("gb2.d.ZA.{}.{mac}", NOW + 60),
        format!("gb1.x.ZA.{}.{mac}", NOW + 60),
        format!("gb1.d.ZA.+{}.{mac}", NOW + 60),
        format!("gb1.d.ZA..{mac}"),
        format!("gb1.d.ZA.{}.{}", NOW + 60, &mac[..20]),
        format!("gb1.d.ZA.{}.{mac}=", NOW + 60),
        format!("gb1.d.ZA.{}.{}", NOW + 60, "!".repeat(43)),
        format!("gb1.d.ZA.99999999999999999999999.{mac}"),
        format!("gb3.d.ZA.1.{}.{mac}", NOW + 60),
        format!("gb2.d.ZA.x1.{}.{mac}", NOW + 60),
        format!("gb2.d.ZA..{}.{mac}", NOW + 60),
        format!("gb2.d.ZA.1.{}.{mac}.x", NOW + 60),
        format!("gb2.d.ZA.-1.{}.{mac}", NOW + 60),
        "x".repeat(600),
    ];
    for token in cases {
        assert!(
            matches!(verify(&s, &token, NOW), Err(TokenError::Malformed(_))),
            "{token:?} -> {:?}",
            verify(&s, &token, NOW)
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn verify_is_total(token in "\\PC{0,200}") {
        // Arbitrary text never panics and never verifies.
        prop_assert!(verify(&secret(6), &token, NOW).is_err());
    }

    #[test]
    fn any_single_edit_breaks_the_token(pos in any::<usize>(), c in "[A-Za-z0-9._=-]") {
        // Replacing any one character of a valid token with a different one makes it fail
        // (non-canonical base64 trailing bits included).
        let s = secret(7);
        let token = mint(&s, &Scope::Gateway("fleet-".into()), NOW + 60);
        let at = pos % token.len();
        let mut edited = token.clone();
        edited.replace_range(at..at + 1, &c);
        prop_assume!(edited != token);
        prop_assert!(verify(&s, &edited, NOW).is_err(), "{} verified", edited);
    }
}

// ---- the `geobeat token` command ----

fn token_args(argv: &[&str]) -> TokenArgs {
    let mut full = vec!["geobeat", "token"];
    full.extend_from_slice(argv);
    match Cli::try_parse_from(full).unwrap().command {
        Command::Token(t) => t,
        other => panic!("expected token, got {other:?}"),
    }
}

fn run(argv: &[&str], env: &[(&str, &str)]) -> Result<String, TokenCommandError> {
    let map: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    run_token_command_with(&token_args(argv), &|k| map.get(k).cloned(), NOW * 1000)
}

fn dir_arg(dir: &Path) -> String {
    dir.to_str().unwrap().to_owned()
}

#[test]
fn token_command_never_creates_a_secret() {
    // Issue 13 §3: with only --data-dir and no secret there, `geobeat token` fails, creates
    // nothing (neither the secret nor the directory), and its message names every place it
    // looked and every way to fix it. Once the server's secret exists (serve creates it with
    // load_or_create), the token signs with it.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("shards");
    let d = dir_arg(&data);
    let err = run(&["device", "truck-1", "--data-dir", &d], &[]).unwrap_err();
    let msg = err.to_string();
    assert!(!data.exists(), "token created {}", data.display());
    for needle in [
        "--secret-file",
        "GEOBEAT_SECRET_FILE",
        "GEOBEAT_SECRET ",
        "--data-dir",
        data.join(SECRET_FILE_NAME).to_str().unwrap(),
    ] {
        assert!(msg.contains(needle), "{needle:?} missing from: {msg}");
    }
    let secret = Secret::load_or_create(&data.join(SECRET_FILE_NAME)).unwrap();
    let token = run(&["device", "truck-1", "--data-dir", &d], &[]).unwrap();
    assert!(
        !token.contains(char::is_whitespace),
        "only the token: {token:?}"
    );
    let claims = verify(&secret, &token, NOW).unwrap();
    assert_eq!(claims.scope, Scope::Device("truck-1".into()));
    assert_eq!(
        claims.issue.at_ms,
        Some(NOW * 1000),
        "issued at the command's clock"
    );
    assert_eq!(
        claims.expires_at_s,
        NOW + 365 * 86_400,
        "default device TTL"
    );
    let ops = run(&["--data-dir", &d, "ops"], &[]).unwrap();
    let claims = verify(&secret, &ops, NOW).unwrap();
    assert_eq!(claims.expires_at_s, NOW + 30 * 86_400, "default ops TTL");
}

#[test]
fn bad_signature_says_whose_secret() {
    // A token signed under another secret is refused with a message that says it was not signed
    // by this server's secret (the server puts this text in its 401 JSON).
    let other = mint(&secret(1), &Scope::Ops, NOW + 60);
    let err = verify(&secret(2), &other, NOW).unwrap_err();
    assert_eq!(err, TokenError::BadSignature);
    assert!(
        err.to_string()
            .contains("not signed by this server's secret"),
        "{err}"
    );
}

#[test]
fn token_command_secret_source_order() {
    // --secret-file beats GEOBEAT_SECRET, which beats GEOBEAT_DATA_DIR/secret.
    let tmp = tempfile::tempdir().unwrap();
    let file_secret = Secret::load_or_create(&tmp.path().join("file-secret")).unwrap();
    let env_secret = Secret::from_bytes([9; 32]);
    let env_hex = env_secret.to_hex();
    let data = tmp.path().join("data");
    let env = [
        ("GEOBEAT_SECRET", env_hex.as_str()),
        ("GEOBEAT_DATA_DIR", data.to_str().unwrap()),
    ];
    let f = dir_arg(&tmp.path().join("file-secret"));
    let t = run(
        &["gateway", "fleet-", "--secret-file", &f, "--ttl", "15m"],
        &env,
    )
    .unwrap();
    let claims = verify(&file_secret, &t, NOW).unwrap();
    assert_eq!(claims.scope, Scope::Gateway("fleet-".into()));
    assert_eq!(claims.expires_at_s, NOW + 900);
    let t = run(&["subscriber", ""], &env).unwrap();
    assert_eq!(
        verify(&env_secret, &t, NOW).unwrap().scope,
        Scope::Subscriber(String::new())
    );
    assert!(
        !data.exists(),
        "no data-dir secret created when GEOBEAT_SECRET is set"
    );
    assert!(
        run(&["ops"], &env[1..]).is_err(),
        "token never creates GEOBEAT_DATA_DIR/secret"
    );
    assert!(!data.exists());
    let data_secret = Secret::load_or_create(&data.join(SECRET_FILE_NAME)).unwrap();
    let t = run(&["ops"], &env[1..]).unwrap();
    assert!(verify(&data_secret, &t, NOW).is_ok());
}

#[test]
fn token_command_errors() {
    // Bad TTL, bad id, missing secret file: clear errors, and no secret created for a typo.
    let tmp = tempfile::tempdir().unwrap();
    let d = dir_arg(&tmp.path().join("data"));
    let err = run(&["device", "x", "--ttl", "3w", "--data-dir", &d], &[]).unwrap_err();
    assert!(matches!(err, TokenCommandError::Ttl(_)), "{err}");
    let long = "x".repeat(65);
    let err = run(&["device", &long, "--data-dir", &d], &[]).unwrap_err();
    assert!(matches!(err, TokenCommandError::Mint(_)), "{err}");
    assert!(!tmp.path().join("data").exists());
    let missing = dir_arg(&tmp.path().join("nope"));
    let err = run(&["ops", "--secret-file", &missing], &[]).unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
    let err = run(&["ops"], &[("GEOBEAT_SECRET", "short")]).unwrap_err();
    assert!(err.to_string().contains("GEOBEAT_SECRET"), "{err}");
}
