//! `geobeat token ...`: mints a token from the command line, and revokes tokens without
//! rotating the secret (`revoke`, `unrevoke`, `revocations`), and names a token by its id
//! (`id`). It owns the command's rules (default lifetimes per scope, the order of secret sources,
//! never creating a secret, which data directory a revocation goes to, refusing a `--before` in
//! the future); the token format and the secret are `auth`'s, the revocation list `revoke`'s,
//! the arguments `config`'s.
//!
//! Invariants: minting prints only the token; a secret is never created here (a secret only
//! `token` knows would sign tokens no server accepts); a revocation is only written into a
//! directory that holds a geobeat data directory's meta file (a mistyped `--data-dir` must not
//! record a revocation no server reads).

use std::io;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::auth::{
    parse_ttl, scope_kind, try_mint, MintError, Scope, Secret, SecretError, TokenId, TtlError,
    DATA_DIR_DEFAULT, DATA_DIR_ENV, SECRET_ENV, SECRET_FILE_ENV, SECRET_FILE_NAME,
    TTL_DEFAULT_LONG, TTL_DEFAULT_OPS,
};
use crate::config::{TokenArgs, TokenKind, TokenSubject};
use crate::limits::{REVOCATIONS_POLL_INTERVAL, TOKEN_BYTES_MAX};
use crate::revoke::{self, Revocation, TimeError};

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
    /// The revocation list could not be read or written.
    #[error(transparent)]
    Revocations(#[from] revoke::Error),
    /// Bad `--before`.
    #[error("--before: {0}")]
    Time(#[from] TimeError),
    /// `--before` names a time to come.
    #[error(
        "--before {given} is in the future (now is {now}): it would also refuse tokens minted \
         from now until then; give a past time, or leave --before out to revoke up to now"
    )]
    FutureTime {
        /// The time given, as RFC 3339.
        given: String,
        /// Now, as RFC 3339.
        now: String,
    },
    /// The data directory named is not one (no meta file).
    #[error(
        "{} is not a geobeat data directory (no geobeat.meta there; from {from}): revocations \
         are recorded in the server's data directory; pass it with --data-dir DIR (or \
         GEOBEAT_DATA_DIR)",
        path.display()
    )]
    NotDataDir {
        /// The directory.
        path: PathBuf,
        /// Where the path came from (`--data-dir`, the environment, the default).
        from: &'static str,
    },
    /// A flag given to a subcommand it means nothing to.
    #[error("{flag} does not apply to `geobeat token {command}`; leave it out")]
    NotApplicable {
        /// The flag.
        flag: &'static str,
        /// The subcommand.
        command: &'static str,
    },
    /// `unrevoke` of a subject with no revocation.
    #[error(
        "no revocation of {kind} {subject:?} is recorded in {}; `geobeat token revocations` \
         lists what is",
        path.display()
    )]
    NotRevoked {
        /// Scope kind.
        kind: &'static str,
        /// The subject.
        subject: String,
        /// The list.
        path: PathBuf,
    },
    /// `id` got no token.
    #[error("{0}; give the token as the argument or on standard input (geobeat token id < FILE)")]
    TokenInput(&'static str),
}

/// `geobeat token ...`: runs the subcommand and returns what to print (minting: only the
/// token, one line).
pub fn run_token_command(args: &TokenArgs) -> Result<String, TokenCommandError> {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| TokenCommandError::Clock("system clock before 1970"))?
        .as_millis() as u64;
    if let TokenKind::Id { token: None } = &args.kind {
        let mut line = String::new();
        io::stdin()
            .read_line(&mut line)
            .map_err(|_| TokenCommandError::TokenInput("could not read standard input"))?;
        let args = TokenArgs {
            kind: TokenKind::Id {
                token: Some(line.trim().to_owned()),
            },
            ..args.clone()
        };
        return run_token_command_with(&args, &|name| std::env::var(name).ok(), now_ms);
    }
    run_token_command_with(args, &|name| std::env::var(name).ok(), now_ms)
}

/// The scope a revocation subject names.
fn subject_scope(subject: &TokenSubject) -> Scope {
    match subject {
        TokenSubject::Device { id } => Scope::Device(id.clone()),
        TokenSubject::Gateway { prefix } => Scope::Gateway(prefix.clone()),
        TokenSubject::Ops => Scope::Ops,
        TokenSubject::Subscriber { prefix } => Scope::Subscriber(prefix.clone()),
    }
}

/// The data directory of a revocation subcommand: `--data-dir`, `GEOBEAT_DATA_DIR` or
/// `./shards`, which must hold a meta file.
fn revocation_dir(
    args: &TokenArgs,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<PathBuf, TokenCommandError> {
    let (dir, from) = match (&args.data_dir, env(DATA_DIR_ENV)) {
        (Some(d), _) => (d.clone(), "--data-dir"),
        (None, Some(d)) if !d.is_empty() => (PathBuf::from(d), DATA_DIR_ENV),
        _ => (
            PathBuf::from(DATA_DIR_DEFAULT),
            "the default data directory",
        ),
    };
    if !dir.join(crate::datadir::META_FILE).is_file() {
        let path = std::path::absolute(&dir).unwrap_or(dir);
        return Err(TokenCommandError::NotDataDir { path, from });
    }
    Ok(dir)
}

/// A subject as the command's output shows it.
fn shown(scope: &Scope) -> String {
    match scope {
        Scope::Ops => "ops".to_owned(),
        s => format!("{} {:?}", scope_kind(s), s.subject()),
    }
}

/// The revocation subcommands (`revoke`, `unrevoke`, `revocations`); `None` for the others.
fn run_revocation_command(
    args: &TokenArgs,
    env: &dyn Fn(&str) -> Option<String>,
    now_ms: u64,
) -> Option<Result<String, TokenCommandError>> {
    let command = match &args.kind {
        TokenKind::Revoke { .. } => "revoke",
        TokenKind::Unrevoke { .. } => "unrevoke",
        TokenKind::Revocations => "revocations",
        _ => return None,
    };
    let run = || -> Result<String, TokenCommandError> {
        for (given, flag) in [
            (args.ttl.is_some(), "--ttl"),
            (args.secret_file.is_some(), "--secret-file"),
        ] {
            if given {
                return Err(TokenCommandError::NotApplicable { flag, command });
            }
        }
        let check = |scope: &Scope| {
            scope
                .check_subject()
                .map_err(|reason| MintError::BadSubject {
                    kind: scope_kind(scope),
                    subject: scope.subject().to_owned(),
                    reason,
                })
        };
        match &args.kind {
            TokenKind::Revoke { subject, before } => {
                let scope = subject_scope(subject);
                check(&scope)?;
                let not_before_ms = match before {
                    None => now_ms,
                    Some(text) => revoke::parse_time(text)?,
                };
                if not_before_ms > now_ms {
                    return Err(TokenCommandError::FutureTime {
                        given: revoke::format_time(not_before_ms),
                        now: revoke::format_time(now_ms),
                    });
                }
                let dir = revocation_dir(args, env)?;
                let (entry, changed, file) = revoke::update(&dir, |list, path| {
                    let before = list.get(&scope).cloned();
                    let entry = list.revoke(scope.clone(), not_before_ms, now_ms, path)?;
                    let changed = before.as_ref() != Some(&entry);
                    Ok(((entry, changed, path.to_owned()), changed))
                })?;
                let who = shown(&entry.scope);
                let when = revoke::format_time(entry.not_before_ms);
                Ok(if changed {
                    format!(
                        "revoked {who}: its tokens issued before {when} are refused (recorded in \
                         {}; a running server applies it within about {} s and closes the \
                         connections that use them)",
                        file.display(),
                        // One interval for a reload, one for every executor's look.
                        2 * REVOCATIONS_POLL_INTERVAL.as_secs().max(1)
                    )
                } else {
                    format!(
                        "{who} is already revoked up to {when}, which covers {}; unchanged",
                        revoke::format_time(not_before_ms)
                    )
                })
            }
            TokenKind::Unrevoke { subject } => {
                let scope = subject_scope(subject);
                check(&scope)?;
                let dir = revocation_dir(args, env)?;
                let lifted: Result<Revocation, TokenCommandError> =
                    revoke::update(&dir, |list, path| match list.lift(&scope) {
                        Some(e) => Ok((Ok(e), true)),
                        None => Ok((
                            Err(TokenCommandError::NotRevoked {
                                kind: scope_kind(&scope),
                                subject: scope.subject().to_owned(),
                                path: path.to_owned(),
                            }),
                            false,
                        )),
                    })?;
                let e = lifted?;
                Ok(format!(
                    "lifted the revocation of {} (it refused tokens issued before {})",
                    shown(&e.scope),
                    revoke::format_time(e.not_before_ms)
                ))
            }
            TokenKind::Revocations => {
                let dir = revocation_dir(args, env)?;
                let list = revoke::load(&dir)?;
                if list.is_empty() {
                    return Ok(format!(
                        "no revocations recorded in {}",
                        dir.join(revoke::FILE_NAME).display()
                    ));
                }
                let mut out = format!(
                    "{:<10} {:<26} {:<26} {}",
                    "KIND", "NOT BEFORE", "RECORDED", "SUBJECT"
                );
                for e in list.sorted() {
                    out.push_str(&format!(
                        "\n{:<10} {:<26} {:<26} {}",
                        scope_kind(&e.scope),
                        revoke::format_time(e.not_before_ms),
                        revoke::format_time(e.recorded_ms),
                        match e.scope {
                            Scope::Ops => "-".to_owned(),
                            ref s => format!("{:?}", s.subject()),
                        }
                    ));
                }
                Ok(out)
            }
            _ => unreachable!("only revocation subcommands get here"),
        }
    };
    Some(run())
}

/// [`run_token_command`] with the environment and clock (Unix ms) passed in (for tests); `id`
/// must carry its token here. Secret source order for minting: `--secret-file`,
/// `GEOBEAT_SECRET_FILE`, `GEOBEAT_SECRET`, then `<data-dir>/secret` where the data directory is
/// `--data-dir`, `GEOBEAT_DATA_DIR` or `./shards`. Nothing is ever created: with no secret
/// anywhere the error names every place looked and how to fix it. The revocation subcommands
/// need no secret, only the data directory (same order).
pub fn run_token_command_with(
    args: &TokenArgs,
    env: &dyn Fn(&str) -> Option<String>,
    now_ms: u64,
) -> Result<String, TokenCommandError> {
    if let Some(done) = run_revocation_command(args, env, now_ms) {
        return done;
    }
    let now_s = now_ms / 1000;
    let (scope, default_ttl) = match &args.kind {
        TokenKind::Device { id } => (Scope::Device(id.clone()), TTL_DEFAULT_LONG),
        TokenKind::Gateway { prefix } => (Scope::Gateway(prefix.clone()), TTL_DEFAULT_LONG),
        TokenKind::Ops => (Scope::Ops, TTL_DEFAULT_OPS),
        TokenKind::Subscriber { prefix } => (Scope::Subscriber(prefix.clone()), TTL_DEFAULT_LONG),
        TokenKind::Id { token } => {
            let token = token.as_deref().unwrap_or_default().trim();
            if token.is_empty() {
                return Err(TokenCommandError::TokenInput("no token given"));
            }
            if token.len() > TOKEN_BYTES_MAX || token.contains(char::is_whitespace) {
                return Err(TokenCommandError::TokenInput(
                    "that is not one token (too long, or more than one word)",
                ));
            }
            return Ok(TokenId::of(token).to_string());
        }
        TokenKind::Revoke { .. } | TokenKind::Unrevoke { .. } | TokenKind::Revocations => {
            unreachable!("handled above")
        }
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
    Ok(try_mint(&secret, &scope, now_ms, expires_at_s)?)
}
