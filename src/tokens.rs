//! `geobeat token ...`: mints a token from the command line. It owns the command's rules (default
//! lifetimes per scope, the order of secret sources, never creating a secret); the token format
//! and the secret are `auth`'s, the arguments `config`'s.
//!
//! Invariant: the command prints only the token, and a secret is never created here (a secret
//! only `token` knows would sign tokens no server accepts).

use std::io;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::auth::{
    parse_ttl, scope_kind, try_mint, MintError, Scope, Secret, SecretError, TtlError,
    DATA_DIR_DEFAULT, DATA_DIR_ENV, SECRET_ENV, SECRET_FILE_ENV, SECRET_FILE_NAME,
    TTL_DEFAULT_LONG, TTL_DEFAULT_OPS,
};
use crate::config::{TokenArgs, TokenKind};

/// Why `geobeat token` failed.
#[derive(Debug, thiserror::Error)]
pub enum TokenCommandError {
    /// No secret could be loaded.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// Bad `--ttl`.
    #[error(transparent)]
    Ttl(#[from] TtlError),
    /// Bad subject.
    #[error(transparent)]
    Mint(#[from] MintError),
    /// The system clock is before 1970 or the expiry overflows.
    #[error("cannot compute the expiry time: {0}")]
    Clock(&'static str),
}

/// `geobeat token ...`: mints a token and returns it (the caller prints only that, one line).
pub fn run_token_command(args: &TokenArgs) -> Result<String, TokenCommandError> {
    let now_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| TokenCommandError::Clock("system clock before 1970"))?
        .as_secs();
    run_token_command_with(args, &|name| std::env::var(name).ok(), now_s)
}

/// [`run_token_command`] with the environment and clock passed in (for tests). Secret source
/// order: `--secret-file`, `GEOBEAT_SECRET_FILE`, `GEOBEAT_SECRET`, then `<data-dir>/secret`
/// where the data directory is `--data-dir`, `GEOBEAT_DATA_DIR` or `./shards`. Nothing is ever
/// created: with no secret anywhere the error names every place looked and how to fix it.
pub fn run_token_command_with(
    args: &TokenArgs,
    env: &dyn Fn(&str) -> Option<String>,
    now_s: u64,
) -> Result<String, TokenCommandError> {
    let (scope, default_ttl) = match &args.kind {
        TokenKind::Device { id } => (Scope::Device(id.clone()), TTL_DEFAULT_LONG),
        TokenKind::Gateway { prefix } => (Scope::Gateway(prefix.clone()), TTL_DEFAULT_LONG),
        TokenKind::Ops => (Scope::Ops, TTL_DEFAULT_OPS),
        TokenKind::Subscriber { prefix } => (Scope::Subscriber(prefix.clone()), TTL_DEFAULT_LONG),
    };
    let ttl = match &args.ttl {
        Some(t) => parse_ttl(t)?,
        None => default_ttl,
    };
    // Check the subject before touching the file system (no secret created for a typo).
    scope
        .check_subject()
        .map_err(|reason| MintError::BadSubject {
            kind: scope_kind(&scope),
            subject: scope.subject().to_owned(),
            reason,
        })?;
    let secret_file = args.secret_file.clone().or_else(|| {
        env(SECRET_FILE_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    let (data_dir, data_dir_from) = match (&args.data_dir, env(DATA_DIR_ENV)) {
        (Some(d), _) => (d.clone(), "--data-dir"),
        (None, Some(d)) if !d.is_empty() => (PathBuf::from(d), DATA_DIR_ENV),
        _ => (
            PathBuf::from(DATA_DIR_DEFAULT),
            "the default data directory",
        ),
    };
    let env_secret = env(SECRET_ENV).filter(|v| !v.is_empty());
    let secret = match (&secret_file, &env_secret) {
        (Some(path), _) => Secret::load(path)?,
        (None, Some(value)) => Secret::from_env_value(value)?,
        (None, None) => {
            // Never create the secret here: a secret only `token` knows signs tokens that no
            // server accepts. See: issue 13 §3.
            let path = data_dir.join(SECRET_FILE_NAME);
            match Secret::load(&path) {
                Err(SecretError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                    let shown = std::path::absolute(&path).unwrap_or(path);
                    return Err(SecretError::NotFound {
                        looked: vec![
                            "--secret-file (not given)".into(),
                            format!("{SECRET_FILE_ENV} (unset)"),
                            format!("{SECRET_ENV} (unset)"),
                            format!("{} (no such file; from {data_dir_from})", shown.display()),
                        ],
                    }
                    .into());
                }
                other => other?,
            }
        }
    };
    let expires_at_s = now_s
        .checked_add(ttl.as_secs())
        .ok_or(TokenCommandError::Clock("expiry overflows"))?;
    Ok(try_mint(&secret, &scope, expires_at_s)?)
}
