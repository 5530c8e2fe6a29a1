//! Access tokens, in the style of shared-access signatures: a scope (device, gateway, ops,
//! subscriber), a subject and an expiry, signed with HMAC-SHA256 under the server secret. It owns
//! the token text form, minting, verification, the secret (generation, file storage with strict
//! permissions, environment form); the `geobeat token` command is `tokens`. It does not decide what a
//! scope may do on an endpoint: callers match on [`Scope`].
//!
//! Token text: `gb2.<d|g|o|s>.<base64url-nopad subject>.<issued unix ms>.<expiry unix
//! seconds>.<base64url-nopad mac>` where the MAC is HMAC-SHA256 over the exact text before the
//! last dot. Tokens minted before issue 16 have the `gb1` form, the same without the issue time;
//! they still verify (with no issue time, which a revocation of their subject treats as "issued
//! before any time": see `crate::revoke`). Tokens carry no server-side state; a subject's tokens
//! issued before a time are revoked through the data directory's revocation list
//! (`crate::revoke`), every token at once by rotating the secret.
//!
//! A [`TokenId`] names a token in logs and answers (a short hash of its text): log lines never
//! carry the token itself.
//!
//! Invariants: a token verifies only if its MAC matches under the secret (compared in constant
//! time), it is not expired, and its scope and subject obey the same rules [`mint`] enforces;
//! the secret file is never created or loaded readable by group or others.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use hmac::{Hmac, Mac as _};
use rand::RngCore as _;
use sha2::Sha256;

use crate::limits::{DEVICE_ID_BYTES_MAX, SECRET_FILE_BYTES_MAX, TOKEN_BYTES_MAX, TOKEN_TTL_MAX};
use crate::record::validate_device_id;

/// Bytes of server secret.
pub const SECRET_BYTES: usize = 32;
/// Version tag at the start of every token minted now (with an issue time).
pub const TOKEN_VERSION: &str = "gb2";
/// Version tag of tokens minted before issue 16 (no issue time); still accepted.
pub const TOKEN_VERSION_1: &str = "gb1";
/// Name of the secret file inside the data directory.
pub const SECRET_FILE_NAME: &str = "secret";
/// Environment variable holding the secret itself (64 hex digits or base64 of 32 bytes).
pub const SECRET_ENV: &str = "GEOBEAT_SECRET";
/// Environment variable naming a secret file (like `--secret-file`).
pub const SECRET_FILE_ENV: &str = "GEOBEAT_SECRET_FILE";
/// Environment variable naming the data directory (like `--data-dir`).
pub const DATA_DIR_ENV: &str = "GEOBEAT_DATA_DIR";
/// Default data directory.
pub const DATA_DIR_DEFAULT: &str = "./shards";
/// Default lifetime of device, gateway and subscriber tokens: a year (devices in the field are
/// costly to re-provision; `geobeat token revoke` revokes a subject's tokens).
pub const TTL_DEFAULT_LONG: Duration = Duration::from_secs(365 * 86_400);
/// Default lifetime of ops tokens: 30 days (they read every device's location).
pub const TTL_DEFAULT_OPS: Duration = Duration::from_secs(30 * 86_400);

type HmacSha256 = Hmac<Sha256>;

/// The server's signing key. `Debug` does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret([u8; SECRET_BYTES]);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Why a secret could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// A file system operation failed.
    #[error("secret file {}: {op} failed: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was attempted.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The secret file is readable or writable by group or others.
    #[error(
        "secret file {} has mode {mode:04o}, which lets group or others access it; \
         run `chmod 600 {}` (or remove it to have a new one created)",
        path.display(),
        path.display()
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// `geobeat token` found no secret anywhere it looked (it never creates one: a secret only
    /// `token` knows signs tokens no server accepts).
    #[error(
        "no secret found; looked at: {}. The server creates <data-dir>/secret on its first start: \
         pass its data directory with --data-dir DIR (or GEOBEAT_DATA_DIR), its secret file with \
         --secret-file FILE (or GEOBEAT_SECRET_FILE), or the secret itself in GEOBEAT_SECRET",
        looked.join("; ")
    )]
    NotFound {
        /// Every place consulted, each with what was found there.
        looked: Vec<String>,
    },
    /// The secret text is not 64 hex digits nor base64 of 32 bytes.
    #[error("secret from {origin} is malformed: {detail}")]
    Format {
        /// Where it came from (a path, or the environment variable's name).
        origin: String,
        /// What is wrong.
        detail: &'static str,
    },
}

impl Secret {
    /// A fresh random secret from the operating system's generator.
    pub fn generate() -> Secret {
        let mut key = [0u8; SECRET_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut key);
        Secret(key)
    }

    /// A secret from raw bytes (tests, embedding).
    pub fn from_bytes(bytes: [u8; SECRET_BYTES]) -> Secret {
        Secret(bytes)
    }

    /// Parses the text form used by `GEOBEAT_SECRET` and secret files: 64 hexadecimal digits, or
    /// base64 (standard or URL-safe alphabet, padded or not) of exactly 32 bytes. Surrounding
    /// whitespace is ignored.
    pub fn from_env_value(text: &str) -> Result<Secret, SecretError> {
        Secret::parse(text, SECRET_ENV)
    }

    fn parse(text: &str, origin: &str) -> Result<Secret, SecretError> {
        let text = text.trim();
        let format = |detail| SecretError::Format {
            origin: origin.to_owned(),
            detail,
        };
        if text.is_empty() {
            return Err(format("empty"));
        }
        let mut key = [0u8; SECRET_BYTES];
        if text.len() == 2 * SECRET_BYTES && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            for (i, pair) in text.as_bytes().chunks_exact(2).enumerate() {
                let s = std::str::from_utf8(pair).map_err(|_| format("not hex"))?;
                key[i] = u8::from_str_radix(s, 16).map_err(|_| format("not hex"))?;
            }
            return Ok(Secret(key));
        }
        let mut buf = [0u8; 64];
        for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
            if let Ok(n) = engine.decode_slice(text, &mut buf) {
                if n != SECRET_BYTES {
                    return Err(format("base64 does not decode to exactly 32 bytes"));
                }
                key.copy_from_slice(&buf[..n]);
                return Ok(Secret(key));
            }
        }
        Err(format("expected 64 hex digits or base64 of 32 bytes"))
    }

    /// The hex text form (as written to secret files).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Loads a secret file, refusing one that group or others may access.
    pub fn load(path: &Path) -> Result<Secret, SecretError> {
        let io_err = |op, source| SecretError::Io {
            path: path.to_owned(),
            op,
            source,
        };
        // O_NONBLOCK: a FIFO given by mistake must not hang startup (regular files ignore it).
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| io_err("open", e))?;
        let meta = file.metadata().map_err(|e| io_err("stat", e))?;
        if !meta.is_file() {
            return Err(io_err(
                "read",
                io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
            ));
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(SecretError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
        let mut text = String::new();
        file.take(SECRET_FILE_BYTES_MAX)
            .read_to_string(&mut text)
            .map_err(|e| io_err("read", e))?;
        Secret::parse(&text, &path.display().to_string())
    }

    /// Loads the secret file at `path`, or creates it (mode 0600, parent directories as needed)
    /// with a fresh secret if it does not exist. Creation is atomic and never overwrites: the
    /// secret is written and synced to a temporary file opened with `O_EXCL`, then hard-linked to
    /// `path` (which fails if `path` appeared meanwhile, in which case that file is loaded).
    pub fn load_or_create(path: &Path) -> Result<Secret, SecretError> {
        match Secret::load(path) {
            Err(SecretError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
            other => return other,
        }
        let io_err = |path: &Path, op, source| SecretError::Io {
            path: path.to_owned(),
            op,
            source,
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&dir).map_err(|e| io_err(&dir, "create directory", e))?;
        let secret = Secret::generate();
        let tmp = dir.join(format!(
            ".{}.tmp.{}.{:08x}",
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or(SECRET_FILE_NAME),
            std::process::id(),
            rand::random::<u32>()
        ));
        let write_tmp = || -> io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(format!("{}\n", secret.to_hex()).as_bytes())?;
            f.sync_all()
        };
        if let Err(e) = write_tmp() {
            let _ = fs::remove_file(&tmp);
            return Err(io_err(&tmp, "create", e));
        }
        let linked = fs::hard_link(&tmp, path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                // Make the new name durable; a failure here only risks a regenerated secret
                // after a crash, before any token could have been minted from this one.
                if let Ok(d) = File::open(&dir) {
                    let _ = d.sync_all();
                }
                Ok(secret)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Secret::load(path),
            Err(e) => Err(io_err(path, "link", e)),
        }
    }
}

/// Where a secret comes from, in order: `secret_file` if given, else the `GEOBEAT_SECRET` value
/// if given, else `<data_dir>/secret` (created if missing). `serve` uses this; `token` uses the
/// same order without creating anything (see [`run_token_command_with`]).
pub fn resolve_secret(
    secret_file: Option<&Path>,
    env_secret: Option<&str>,
    data_dir: &Path,
) -> Result<Secret, SecretError> {
    if let Some(path) = secret_file {
        return Secret::load(path);
    }
    if let Some(value) = env_secret {
        return Secret::from_env_value(value);
    }
    Secret::load_or_create(&data_dir.join(SECRET_FILE_NAME))
}

/// What a token allows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Ingest for exactly this device id.
    Device(String),
    /// Ingest for every device whose id starts with this prefix (empty: all devices).
    Gateway(String),
    /// Operations: read any device, admin endpoints.
    Ops,
    /// Read/subscribe to devices whose id starts with this prefix (empty: all devices).
    Subscriber(String),
}

impl Scope {
    /// The one-letter scope tag in the token text.
    pub fn letter(&self) -> char {
        match self {
            Scope::Device(_) => 'd',
            Scope::Gateway(_) => 'g',
            Scope::Ops => 'o',
            Scope::Subscriber(_) => 's',
        }
    }

    /// The subject (device id or prefix; empty for ops).
    pub fn subject(&self) -> &str {
        match self {
            Scope::Device(s) | Scope::Gateway(s) | Scope::Subscriber(s) => s,
            Scope::Ops => "",
        }
    }

    /// Builds a scope from its letter and subject, checking the subject rules.
    fn from_parts(letter: &str, subject: String) -> Result<Scope, &'static str> {
        let scope = match letter {
            "d" => Scope::Device(subject),
            "g" => Scope::Gateway(subject),
            "o" if subject.is_empty() => Scope::Ops,
            "o" => return Err("ops tokens have no subject"),
            "s" => Scope::Subscriber(subject),
            _ => return Err("unknown scope letter"),
        };
        scope.check_subject()?;
        Ok(scope)
    }

    /// Checks the subject against the scope's rules (the reason when refused).
    pub fn check_subject(&self) -> Result<(), &'static str> {
        match self {
            Scope::Device(id) => validate_device_id(id).map_err(|e| e.reason()),
            Scope::Gateway(p) | Scope::Subscriber(p) => {
                if p.len() > DEVICE_ID_BYTES_MAX {
                    Err("prefix longer than a device id")
                } else if p.chars().any(char::is_control) {
                    Err("prefix contains a control character")
                } else {
                    Ok(())
                }
            }
            Scope::Ops => Ok(()),
        }
    }
}

/// What a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The scope and subject.
    pub scope: Scope,
    /// Expiry, Unix seconds (the token is valid strictly before it).
    pub expires_at_s: u64,
    /// When and which: what a revocation and a log line need.
    pub issue: Issue,
}

/// When a token was issued and its id: what a connection keeps of its token for revocation
/// checks and log lines (never the token itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Issue {
    /// Issue time, Unix milliseconds; `None` for a `gb1` token (minted before issue times).
    pub at_ms: Option<u64>,
    /// The token's id.
    pub id: TokenId,
}

/// Bytes of SHA-256 kept in a [`TokenId`].
const TOKEN_ID_BYTES: usize = 6;

/// A token's id: the first 48 bits of SHA-256 over the token's text, shown as 12 hex digits. Log
/// lines and refusals name tokens by it, never by their text (which is a bearer credential). It
/// is defined for any text, so a malformed or forged token has one too; it reveals nothing of
/// the MAC. Whoever holds a token computes its id with `geobeat token id`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenId([u8; TOKEN_ID_BYTES]);

impl TokenId {
    /// The id of `token` (any text).
    pub fn of(token: &str) -> TokenId {
        use sha2::Digest as _;
        let digest = Sha256::digest(token.as_bytes());
        let mut id = [0u8; TOKEN_ID_BYTES];
        id.copy_from_slice(&digest[..TOKEN_ID_BYTES]);
        TokenId(id)
    }
}

impl std::fmt::Display for TokenId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for TokenId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenId({self})")
    }
}

/// Why a token was refused. Callers answer all three with 401 and must not echo the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token of this format (or too long).
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// The MAC does not match (forged, tampered, or another server's secret). The text says so,
    /// because a token minted against the wrong data directory is the usual cause.
    #[error(
        "bad token signature: the token was not signed by this server's secret (mint it with \
         `geobeat token` using the server's --data-dir, --secret-file or GEOBEAT_SECRET)"
    )]
    BadSignature,
    /// Authentic but expired.
    #[error("token expired at {expires_at_s} (unix seconds)")]
    Expired {
        /// When it expired.
        expires_at_s: u64,
    },
}

/// Why a token could not be minted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MintError {
    /// The subject breaks the scope's rules (e.g. an invalid device id).
    #[error("invalid {kind} subject {subject:?}: {reason}")]
    BadSubject {
        /// Scope kind.
        kind: &'static str,
        /// The subject given.
        subject: String,
        /// What is wrong.
        reason: &'static str,
    },
}

fn mac_over(secret: &Secret, text: &str) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(&secret.0).expect("HMAC accepts any key length");
    mac.update(text.as_bytes());
    mac
}

/// Mints a token for `scope` issued now (the wall clock) and valid until `expires_at_s` (Unix
/// seconds).
///
/// # Panics
/// If the scope's subject breaks its rules (an invalid device id, an over-long prefix): callers
/// with trusted, already-checked subjects use this; untrusted input goes through [`try_mint`].
pub fn mint(secret: &Secret, scope: &Scope, expires_at_s: u64) -> String {
    let issued_at_ms = crate::rt::now_ms().max(0) as u64;
    try_mint(secret, scope, issued_at_ms, expires_at_s).unwrap_or_else(|e| panic!("{e}"))
}

/// Mints a token for `scope` issued at `issued_at_ms` (Unix milliseconds) and valid until
/// `expires_at_s` (Unix seconds), refusing a subject that breaks the scope's rules.
pub fn try_mint(
    secret: &Secret,
    scope: &Scope,
    issued_at_ms: u64,
    expires_at_s: u64,
) -> Result<String, MintError> {
    scope
        .check_subject()
        .map_err(|reason| MintError::BadSubject {
            kind: scope_kind(scope),
            subject: scope.subject().to_owned(),
            reason,
        })?;
    let mut text = format!(
        "{TOKEN_VERSION}.{}.{}.{issued_at_ms}.{expires_at_s}",
        scope.letter(),
        URL_SAFE_NO_PAD.encode(scope.subject())
    );
    let tag = mac_over(secret, &text).finalize().into_bytes();
    text.push('.');
    URL_SAFE_NO_PAD.encode_string(tag, &mut text);
    debug_assert!(
        text.len() <= TOKEN_BYTES_MAX,
        "subject bounds keep tokens short"
    );
    Ok(text)
}

/// The scope's name as the command line spells it (`device`, `gateway`, `ops`, `subscriber`).
pub fn scope_kind(scope: &Scope) -> &'static str {
    match scope {
        Scope::Device(_) => "device",
        Scope::Gateway(_) => "gateway",
        Scope::Ops => "ops",
        Scope::Subscriber(_) => "subscriber",
    }
}

/// A decimal number of at most 20 digits (no sign, no spaces), or `None`.
fn decimal(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 20 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Verifies `token` at time `now_s` (Unix seconds): structure, then MAC (constant-time), then
/// subject rules, then expiry. Both token versions verify (`gb1` without an issue time).
pub fn verify(secret: &Secret, token: &str, now_s: u64) -> Result<Claims, TokenError> {
    if token.len() > TOKEN_BYTES_MAX {
        return Err(TokenError::Malformed("too long"));
    }
    let (signed, mac_b64) = token
        .rsplit_once('.')
        .ok_or(TokenError::Malformed("missing parts"))?;
    let mut parts = signed.split('.');
    let version = parts.next().unwrap_or_default();
    let fields = match version {
        TOKEN_VERSION_1 => 3,
        TOKEN_VERSION => 4,
        _ => return Err(TokenError::Malformed("unknown token version")),
    };
    let mut field = [""; 4];
    for slot in field.iter_mut().take(fields) {
        *slot = parts.next().ok_or(TokenError::Malformed(
            "expected 6 dot-separated parts (5 for a gb1 token)",
        ))?;
    }
    if parts.next().is_some() {
        return Err(TokenError::Malformed(
            "expected 6 dot-separated parts (5 for a gb1 token)",
        ));
    }
    let (letter, subject_b64) = (field[0], field[1]);
    let (issued, expiry) = if fields == 4 {
        (Some(field[2]), field[3])
    } else {
        (None, field[2])
    };
    if !matches!(letter, "d" | "g" | "o" | "s") {
        return Err(TokenError::Malformed("unknown scope letter"));
    }
    let issued_at_ms = match issued {
        None => None,
        Some(text) => Some(
            decimal(text).ok_or(TokenError::Malformed("issue time is not unix milliseconds"))?,
        ),
    };
    if expiry.is_empty() || expiry.len() > 20 || !expiry.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TokenError::Malformed("expiry is not unix seconds"));
    }
    let expires_at_s: u64 = expiry
        .parse()
        .map_err(|_| TokenError::Malformed("expiry out of range"))?;
    let mut tag = [0u8; 48];
    let n = URL_SAFE_NO_PAD
        .decode_slice(mac_b64, &mut tag)
        .map_err(|_| TokenError::Malformed("signature is not base64url"))?;
    if n != 32 {
        return Err(TokenError::Malformed("signature has the wrong length"));
    }
    mac_over(secret, signed)
        .verify_slice(&tag[..n])
        .map_err(|_| TokenError::BadSignature)?;
    let subject = URL_SAFE_NO_PAD
        .decode(subject_b64)
        .map_err(|_| TokenError::Malformed("subject is not base64url"))?;
    let subject =
        String::from_utf8(subject).map_err(|_| TokenError::Malformed("subject is not UTF-8"))?;
    let scope = Scope::from_parts(letter, subject).map_err(TokenError::Malformed)?;
    if now_s >= expires_at_s {
        return Err(TokenError::Expired { expires_at_s });
    }
    Ok(Claims {
        scope,
        expires_at_s,
        issue: Issue {
            at_ms: issued_at_ms,
            id: TokenId::of(token),
        },
    })
}

/// Why a TTL text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid TTL {input:?}: {reason} (expected a positive number with unit s, m, h or d, e.g. 30d)"
)]
pub struct TtlError {
    /// The text given.
    pub input: String,
    /// What is wrong.
    pub reason: &'static str,
}

/// Parses a duration such as `90s`, `15m`, `12h`, `30d` (positive, at most [`TOKEN_TTL_MAX`]).
/// Also used for other day-scale durations in configuration (e.g. retention).
pub fn parse_ttl(text: &str) -> Result<Duration, TtlError> {
    let err = |reason| TtlError {
        input: text.to_owned(),
        reason,
    };
    let t = text.trim();
    let (digits, unit) = t.split_at(t.len().saturating_sub(1));
    let unit_s: u64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(err("missing or unknown unit")),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err("not a whole number"));
    }
    let n: u64 = digits.parse().map_err(|_| err("number too large"))?;
    if n == 0 {
        return Err(err("must be positive"));
    }
    let secs = n.checked_mul(unit_s).ok_or_else(|| err("too long"))?;
    let ttl = Duration::from_secs(secs);
    if ttl > TOKEN_TTL_MAX {
        return Err(err("longer than 10 years"));
    }
    Ok(ttl)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_parsing() {
        // Units, bounds and garbage.
        assert_eq!(parse_ttl("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_ttl("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_ttl("12h").unwrap(), Duration::from_secs(43_200));
        assert_eq!(parse_ttl("30d").unwrap(), Duration::from_secs(2_592_000));
        for bad in [
            "",
            "d",
            "0d",
            "10",
            "1.5h",
            "-1d",
            "1w",
            "99999999999999999999d",
            "4000d",
            "1 d",
        ] {
            assert!(parse_ttl(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn secret_text_forms() {
        // Hex and all base64 flavours of the same 32 bytes give the same secret.
        let s = Secret::from_bytes(core::array::from_fn(|i| (i * 7 + 250) as u8));
        let hex = s.to_hex();
        assert_eq!(Secret::from_env_value(&hex).unwrap(), s);
        assert_eq!(
            Secret::from_env_value(&format!(" {}\n", hex.to_uppercase())).unwrap(),
            s
        );
        for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
            assert_eq!(Secret::from_env_value(&engine.encode(s.0)).unwrap(), s);
        }
        assert!(Secret::from_env_value("").is_err());
        assert!(Secret::from_env_value(&STANDARD.encode([1u8; 16])).is_err());
        assert!(Secret::from_env_value("zz").is_err());
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
    }

    #[test]
    fn mint_refuses_bad_subjects() {
        // An invalid device id or an over-long prefix cannot be minted.
        let s = Secret::generate();
        assert!(try_mint(&s, &Scope::Device(String::new()), 1, 10).is_err());
        assert!(try_mint(&s, &Scope::Gateway("x".repeat(65)), 1, 10).is_err());
        assert!(try_mint(&s, &Scope::Subscriber("a\nb".into()), 1, 10).is_err());
        assert!(try_mint(&s, &Scope::Gateway(String::new()), 1, 10).is_ok());
        let caught = std::panic::catch_unwind(|| mint(&s, &Scope::Device("a\u{0}".into()), 10));
        assert!(caught.is_err(), "mint panics on an invalid subject");
    }
}
