//! The one auth guard of the network edge: every request that needs a token (WebSocket
//! upgrades, HTTP reads and writes) goes through [`check`] with what it needs ([`Need`]). It owns
//! finding the bearer token, verifying it against the server's secret and clock, the scope rules
//! of each need, and the exact refusal each gets (docs/PROTOCOL.md, docs/openapi.json); it does
//! not answer the request (the caller sends the [`Refusal`]). The phone apps' HTTP endpoints,
//! which cannot set a bearer header, go through [`check_device`] (token also from the
//! `Authorization: Basic` password).
//!
//! It also applies the revocation list (`crate::revoke`, the server's copy in `Shared`): a
//! revoked token is refused at connect like an expired one (401 `token_revoked: ...`; MQTT:
//! [`admit_mqtt`]), and [`revoked_live`] is what a live connection asks when the list changed
//! (the per-executor watch is `net::revoke`). Refusals and closes for a revoked token are logged
//! with the token's id ([`crate::auth::TokenId`]), never the token.
//!
//! Invariant: every refusal is a 401 whose body never echoes the token; WebSocket upgrades name
//! the parameter at fault (`"param":"token"`), HTTP endpoints do not (their documented bodies).

use std::time::Duration;

use crate::auth::{scope_kind, Claims, Issue, Scope};
use crate::http::parse::{self, Request};
use crate::limits::REPEAT_LOG_INTERVAL_MS;
use crate::node::Shared;
use crate::proto::mqtt::codec::Version;
use crate::proto::mqtt::session::{self, reason, Admitted, ConnectRefusal};
use crate::ratelog::LogEvery;
use crate::revoke::Revocation;

/// The WebSocket close reason (with 1008), MQTT reason string and refusal prefix when a token is
/// revoked.
pub const TOKEN_REVOKED: &str = "token_revoked";

/// What a request needs its token to allow.
#[derive(Debug, Clone, Copy)]
pub enum Need<'a> {
    /// `/v1/ingest`: a device or gateway token.
    Ingest,
    /// `/v1/subscribe`: an ops or subscriber token.
    Subscribe,
    /// A read about one device (an ops token, or a subscriber token whose prefix the id
    /// starts with), or with `None` a read or write that only ops may make.
    Read(Option<&'a str>),
    /// A read that is not about one device but open to subscribers too (geofences).
    OpsOrSubscriber,
}

/// A refused request: the status (401) and the JSON body to answer with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status.
    pub status: u16,
    /// JSON body.
    pub body: String,
}

impl Need<'_> {
    /// The answer when no token (or, for HTTP, an undecodable one) was given.
    fn missing(&self) -> &'static str {
        match self {
            Need::Ingest | Need::Subscribe => "missing token",
            Need::Read(_) => "missing ops token",
            Need::OpsOrSubscriber => "missing ops or subscriber token",
        }
    }

    /// The parameter named in refusals (WebSocket upgrades only).
    fn param(&self) -> Option<&'static str> {
        match self {
            Need::Ingest | Need::Subscribe => Some("token"),
            Need::Read(_) | Need::OpsOrSubscriber => None,
        }
    }

    /// Whether `scope` may do what this need names; `Err` is the refusal message.
    fn allows(&self, scope: &Scope) -> Result<(), &'static str> {
        let ok = match (self, scope) {
            (Need::Ingest, Scope::Device(_) | Scope::Gateway(_)) => true,
            (Need::Ingest, _) => return Err("token scope does not allow ingest"),
            (Need::Subscribe, Scope::Ops | Scope::Subscriber(_)) => true,
            (Need::Subscribe, _) => {
                return Err(
                    "token scope does not allow subscribing (use an ops or subscriber token)",
                )
            }
            (Need::Read(_), Scope::Ops) => true,
            (Need::Read(Some(id)), Scope::Subscriber(prefix)) => id.starts_with(prefix.as_str()),
            (Need::OpsOrSubscriber, Scope::Ops | Scope::Subscriber(_)) => true,
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            Err("token scope does not allow this query")
        }
    }
}

/// Checks `req`'s token for `need`: the verified claims, or the 401 to answer with.
pub fn check(shared: &Shared, req: &Request<'_>, need: Need<'_>) -> Result<Claims, Refusal> {
    let refuse = |message: &str| {
        let (status, body) = parse::json_error(401, message, need.param());
        Refusal { status, body }
    };
    let mut scratch = Vec::new();
    let token = match parse::bearer_token(req, &mut scratch) {
        Ok(Some(t)) => t,
        Ok(None) => return Err(refuse(need.missing())),
        Err(_) if need.param().is_some() => return Err(refuse("malformed token")),
        Err(_) => return Err(refuse(need.missing())),
    };
    let claims = crate::auth::verify(&shared.secret, token, crate::rt::now_s())
        .map_err(|e| refuse(&e.to_string()))?;
    not_revoked(shared, &claims).map_err(|m| refuse(&m))?;
    need.allows(&claims.scope).map_err(refuse)?;
    Ok(claims)
}

thread_local! {
    /// Rate limit of the "token refused: revoked" line, per executor thread.
    static REVOKED_LOG: LogEvery =
        const { LogEvery::new(Duration::from_millis(REPEAT_LOG_INTERVAL_MS)) };
    /// Rate limit of the "connection closed: token revoked" line, per executor thread.
    static CLOSED_LOG: LogEvery =
        const { LogEvery::new(Duration::from_millis(REPEAT_LOG_INTERVAL_MS)) };
}

/// The refusal text for a token `r` revokes: names the subject, the time, the token's id and
/// the fix, never the token.
fn revoked_message(scope: &Scope, issue: &Issue, r: &Revocation) -> String {
    let who = match scope {
        Scope::Ops => "ops".to_owned(),
        s => format!("{} {:?}", scope_kind(s), s.subject()),
    };
    let before = crate::revoke::format_time(r.not_before_ms);
    match issue.at_ms {
        Some(_) => format!(
            "{TOKEN_REVOKED}: the {who} tokens issued before {before} are revoked (this token's \
             id: {}); use a token minted since",
            issue.id
        ),
        None => format!(
            "{TOKEN_REVOKED}: the {who} tokens are revoked up to {before} and this token (id {}) \
             is an old gb1 token without an issue time, so it counts as issued before; use a \
             token minted since",
            issue.id
        ),
    }
}

thread_local! {
    /// This executor's "the revocation list changed" signal: `net::revoke`'s watch notifies it,
    /// live WebSocket connections wait on it (one waiter slot each, no timer).
    static REVOCATIONS_CHANGED: std::rc::Rc<crate::rt::Signal> = crate::rt::Signal::new();
}

/// This executor's "the revocation list changed" signal (see [`revoked_live`]).
pub fn revocations_changed() -> std::rc::Rc<crate::rt::Signal> {
    REVOCATIONS_CHANGED.with(|s| s.clone())
}

/// `Err` with the refusal text if `claims`' token is revoked (logged with its id).
fn not_revoked(shared: &Shared, claims: &Claims) -> Result<(), String> {
    let Some(r) = shared.revocations.refuses(&claims.scope, &claims.issue) else {
        return Ok(());
    };
    REVOKED_LOG.with(|every| {
        if let Some(suppressed) = every.check() {
            tracing::info!(
                token_id = %claims.issue.id,
                kind = scope_kind(&claims.scope),
                subject = claims.scope.subject(),
                not_before = %crate::revoke::format_time(r.not_before_ms),
                suppressed_since_last = suppressed,
                "token refused: revoked"
            );
        }
    });
    Err(revoked_message(&claims.scope, &claims.issue, &r))
}

/// Refuses an admitted MQTT CONNECT whose token is revoked: CONNACK 0x05 (3.1.1) or 0x86 "bad
/// user name or password" (5), as for an expired token, with the reason `token_revoked`.
pub fn admit_mqtt(shared: &Shared, admitted: Admitted) -> Result<Admitted, ConnectRefusal> {
    match not_revoked(shared, &admitted.claims) {
        Ok(()) => Ok(admitted),
        Err(_) => Err(ConnectRefusal {
            version: admitted.version,
            code: match admitted.version {
                Version::V311 => session::return_code::NOT_AUTHORIZED,
                Version::V5 => reason::BAD_CREDENTIALS,
            },
            reason: TOKEN_REVOKED,
        }),
    }
}

/// Whether a live connection's token (of `scope`, issued as `issue`) is revoked now; if so,
/// logs the close (`what`: the connection kind) with the token's id. Connections ask this when
/// their executor's revocation signal fires (`net::revoke`).
pub fn revoked_live(shared: &Shared, scope: &Scope, issue: &Issue, what: &'static str) -> bool {
    let Some(r) = shared.revocations.refuses(scope, issue) else {
        return false;
    };
    CLOSED_LOG.with(|every| {
        if let Some(suppressed) = every.check() {
            tracing::info!(
                token_id = %issue.id,
                kind = scope_kind(scope),
                subject = scope.subject(),
                not_before = %crate::revoke::format_time(r.not_before_ms),
                connection = what,
                suppressed_since_last = suppressed,
                "closing a connection: token revoked"
            );
        }
    });
    true
}

/// A device app's verified credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCredentials {
    /// The token's claims (a device or gateway scope).
    pub claims: Claims,
    /// The `Authorization: Basic` user name, if the token came as its password (OwnTracks puts
    /// its device there).
    pub user: Option<String>,
}

/// Checks the token of a phone app's request (OsmAnd, Traccar Client, GPSLogger, OwnTracks):
/// from `Authorization: Bearer`, else the `Authorization: Basic` password, else the `token`
/// query parameter, the apps being able to set a URL but rarely a header. The token must allow
/// ingest (a device or gateway token); which device it may report for is the caller's check.
/// Refusals are HTTP-style 401 bodies (no `param`).
pub fn check_device(shared: &Shared, req: &Request<'_>) -> Result<DeviceCredentials, Refusal> {
    let refuse = |message: &str| {
        let (status, body) = parse::json_error(401, message, None);
        Refusal { status, body }
    };
    let mut basic_buf = Vec::new();
    let basic =
        parse::basic_credentials(req, &mut basic_buf).map_err(|e| refuse(&e.to_string()))?;
    let mut scratch = Vec::new();
    let (token, user) = match (parse::bearer_token(req, &mut scratch), basic) {
        (Ok(Some(t)), None) => (t, None),
        (_, Some((user, password))) if !password.is_empty() => (password, Some(user)),
        (Ok(Some(t)), Some((user, _))) => (t, Some(user)),
        (Err(_), _) => return Err(refuse("malformed token")),
        _ => {
            return Err(refuse(
                "missing token (give ?token= in the URL or the Basic-auth password)",
            ))
        }
    };
    let claims = crate::auth::verify(&shared.secret, token, crate::rt::now_s())
        .map_err(|e| refuse(&e.to_string()))?;
    not_revoked(shared, &claims).map_err(|m| refuse(&m))?;
    Need::Ingest.allows(&claims.scope).map_err(refuse)?;
    Ok(DeviceCredentials {
        claims,
        user: user.filter(|u| !u.is_empty()).map(str::to_owned),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_need_admits_exactly_its_scopes() {
        // The scope table of docs/PROTOCOL.md, and the refusal each need gives.
        let dev = Scope::Device("a-1".into());
        let gw = Scope::Gateway("a-".into());
        let sub = Scope::Subscriber("a-".into());
        let ops = Scope::Ops;
        for (need, admitted) in [
            (Need::Ingest, [true, true, false, false]),
            (Need::Subscribe, [false, false, true, true]),
            (Need::Read(None), [false, false, false, true]),
            (Need::Read(Some("a-7")), [false, false, true, true]),
            (Need::Read(Some("b-7")), [false, false, false, true]),
            (Need::OpsOrSubscriber, [false, false, true, true]),
        ] {
            for (scope, want) in [&dev, &gw, &sub, &ops].into_iter().zip(admitted) {
                assert_eq!(need.allows(scope).is_ok(), want, "{need:?} {scope:?}");
            }
        }
        assert_eq!(
            Need::Ingest.allows(&ops),
            Err("token scope does not allow ingest")
        );
        assert_eq!(
            Need::Read(None).allows(&sub),
            Err("token scope does not allow this query")
        );
    }
}
