//! The operator endpoints: `/metrics` (Prometheus and OpenMetrics), `/v1/stats`, `/v1/sinks`,
//! `/healthz`, `/readyz`, `/openapi.json` and the operator console page (`/console`, `/live`). Parsed into an [`Ops`] command
//! (method, token), then applied: metrics and stats gather every executor's snapshot over the
//! control mesh (never behind appends).
//!
//! Invariant: `/healthz` answers while the process serves at all; `/readyz` is 503 while any
//! shard's log refuses writes, before every executor recovered, (ownership) before the
//! placement was first read, and (replicated durability) while the streams cannot store.

use serde::Serialize;

use crate::config::Durability;
use crate::http::parse::Request;
use crate::metrics::{ExecSnapshot, ProcessInfo};
use crate::net::auth::{self, Need};
use crate::net::http::live;
use crate::net::http::response::Response;
use crate::node::Shared;
use crate::shard::core::Core;

/// The OpenAPI 3 document of the HTTP API (kept true by tests/openapi.rs).
pub const OPENAPI_JSON: &str = include_str!("../../../docs/openapi.json");

/// A parsed request of this resource.
pub enum Ops {
    /// `GET /metrics`; OpenMetrics when the scraper accepts it.
    Metrics {
        /// Answer in OpenMetrics (else the classic text format).
        openmetrics: bool,
    },
    /// `GET /openapi.json`.
    OpenApi,
    /// `GET /console` (also at `/live`).
    Live,
    /// `GET /v1/sinks`.
    Sinks,
    /// `GET /v1/stats`.
    Stats,
    /// `GET /healthz`.
    Health,
    /// `GET /readyz`.
    Ready,
}

impl Ops {
    /// Parses a request for one of this resource's paths (`None`: not one of them).
    pub fn parse(shared: &Shared, req: &Request<'_>) -> Option<Result<Ops, Response>> {
        let (op, ops_token) = match req.path {
            "/metrics" => {
                let openmetrics = req
                    .accept
                    .is_some_and(|a| a.contains("application/openmetrics-text"));
                (Ops::Metrics { openmetrics }, false)
            }
            "/openapi.json" => (Ops::OpenApi, false),
            "/live" | "/console" => (Ops::Live, false),
            "/v1/sinks" => (Ops::Sinks, true),
            "/v1/stats" => (Ops::Stats, true),
            "/healthz" => (Ops::Health, false),
            "/readyz" => (Ops::Ready, false),
            _ => return None,
        };
        if req.method != "GET" {
            return Some(Err(Response::error(405, "method not allowed")));
        }
        if ops_token {
            if let Err(r) = auth::check(shared, req, Need::Read(None)) {
                return Some(Err(r.into()));
            }
        }
        Some(Ok(op))
    }

    /// Answers the command.
    pub async fn apply(self, core: &Core) -> Response {
        let shared = &core.shared;
        match self {
            Ops::Metrics { openmetrics } => metrics(core, openmetrics).await,
            Ops::OpenApi => Response::json(200, OPENAPI_JSON.to_owned()),
            Ops::Live => Response {
                status: 200,
                content_type: live::content_type_and_headers(),
                body: live::page_html().to_owned(),
            },
            Ops::Sinks => {
                let rows = shared
                    .sinks
                    .as_ref()
                    .map(|s| s.status())
                    .unwrap_or_default();
                Response::json(
                    200,
                    format!(
                        r#"{{"sinks":{}}}"#,
                        serde_json::to_string(&rows).expect("serializable")
                    ),
                )
            }
            Ops::Stats => stats(core).await,
            Ops::Health => health(shared, false),
            Ops::Ready => health(shared, true),
        }
    }
}

/// `/healthz` and `/readyz`.
fn health(shared: &Shared, ready: bool) -> Response {
    if ready {
        if let Some(body) = storage_faults_body(shared) {
            return Response::json(503, body);
        }
    }
    if !shared.ready() {
        return Response::json(503, r#"{"status":"starting"}"#.into());
    }
    // Ownership: not ready until the placement was read once (before that every device would
    // be told to retry); a load balancer sends devices elsewhere meanwhile.
    let placing = shared
        .replication
        .as_ref()
        .and_then(|plan| plan.placement.as_ref())
        .is_some_and(|p| !p.ready.load(std::sync::atomic::Ordering::Acquire));
    if ready && placing {
        return Response::json(503, r#"{"status":"placing"}"#.into());
    }
    if ready {
        if let Some(body) = replication_unavailable_body(shared) {
            return Response::json(503, body);
        }
    }
    // A sink that cannot be reached does not make the server unready: ingest goes on and the
    // shard logs hold the backlog. /readyz names it (details, with the server's message, are in
    // the log and the authenticated /v1/sinks).
    let failing = match (ready, shared.sinks.as_ref()) {
        (true, Some(s)) => s.failing(),
        _ => Vec::new(),
    };
    if failing.is_empty() {
        Response::json(200, r#"{"status":"ok"}"#.into())
    } else {
        let failing = serde_json::to_string(&failing).expect("serializable");
        Response::json(
            200,
            format!(r#"{{"status":"ok","sinks_failing":{failing}}}"#),
        )
    }
}

fn process_info(shared: &Shared) -> ProcessInfo {
    ProcessInfo {
        uptime_s: shared.started.elapsed().as_secs_f64(),
        durability: match shared.cfg.durability {
            Durability::Strict => "strict",
            Durability::Relaxed => "relaxed",
            Durability::Replicated => "replicated",
        },
        connections_total: shared
            .connections_open
            .load(std::sync::atomic::Ordering::Relaxed),
        sinks: shared
            .sinks
            .as_ref()
            .map(|s| s.status())
            .unwrap_or_default(),
        os: crate::metrics::ProcStats::read(),
        replication_lag: shared
            .replication
            .as_ref()
            .map(|plan| {
                (0..shared.shard_count as usize)
                    .map(|k| {
                        let durable = shared.feeds[k].durable().0;
                        (k as u32, durable.saturating_sub(plan.replicated(k)))
                    })
                    .collect()
            })
            .unwrap_or_default(),
        ownership_stepdowns: shared
            .replication
            .as_ref()
            .and_then(|plan| plan.placement.as_ref())
            .map(|p| p.stepdowns.load(std::sync::atomic::Ordering::Relaxed)),
        view_lag: shared
            .replication
            .as_ref()
            .and_then(|plan| plan.view.as_ref())
            .map(|v| {
                v.lag(crate::rt::now_ms())
                    .into_iter()
                    .map(|l| {
                        (
                            crate::replicate::stream_name(l.stream as u32),
                            l.messages,
                            l.seconds.unwrap_or(f64::NAN),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
        view_problems: shared
            .replication
            .as_ref()
            .and_then(|plan| plan.view.as_ref())
            .map(|v| {
                use std::sync::atomic::Ordering::Relaxed;
                (v.damaged.load(Relaxed), v.refused.load(Relaxed))
            }),
    }
}

/// `/metrics`: OpenMetrics when the scraper asks for it (Prometheus does), else the classic
/// Prometheus text format.
async fn metrics(core: &Core, openmetrics: bool) -> Response {
    let snaps = core.on_all(|c: &Core| c.snapshot()).await;
    let text = crate::metrics::render(snaps, process_info(&core.shared));
    if openmetrics {
        Response {
            status: 200,
            content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body: text,
        }
    } else {
        Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: crate::metrics::to_classic(&text),
        }
    }
}

async fn stats(core: &Core) -> Response {
    #[derive(Serialize)]
    struct Stats {
        uptime_s: f64,
        durability: &'static str,
        connections_total: usize,
        shard_count: u32,
        executors: Vec<ExecSnapshot>,
        /// `--durability replicated`: per shard, durable vs replicated positions and the lag.
        #[serde(skip_serializing_if = "Option::is_none")]
        replication: Option<serde_json::Value>,
    }
    let info = process_info(&core.shared);
    let body = Stats {
        uptime_s: info.uptime_s,
        durability: info.durability,
        connections_total: info.connections_total,
        shard_count: core.shared.shard_count,
        executors: core.on_all(|c: &Core| c.snapshot()).await,
        replication: core
            .shared
            .replication
            .as_ref()
            .map(|plan| plan.report(|k| core.shared.feeds[k].durable().0)),
    };
    Response::json(200, serde_json::to_string(&body).expect("serializable"))
}

/// `/readyz`'s body while replicated durability cannot ack: some shard's replication loop has
/// had no working NATS connection (or the streams stored nothing it sent) for
/// [`REPLICATE_UNREADY_AFTER`], or this cluster node's lease has not been stored for that long
/// plus a lease interval (the other nodes are about to take its units):
/// `{"status":"replication_unavailable","shards":[{"shard":N,"error":..,"nats_unreachable_ms":M}],
/// "lease_age_ms":L}`; `None` otherwise (and always without replication).
fn replication_unavailable_body(shared: &Shared) -> Option<String> {
    use crate::limits::{PLACEMENT_LEASE_INTERVAL, REPLICATE_UNREADY_AFTER};
    let plan = shared.replication.as_ref()?;
    let now = crate::rt::now_ms();
    let after = REPLICATE_UNREADY_AFTER.as_millis() as u64;
    let shards: Vec<serde_json::Value> = plan
        .status
        .iter()
        .enumerate()
        .filter_map(|(k, st)| {
            let ms = st.unreachable_for_ms(now);
            (ms >= after).then(|| {
                serde_json::json!({
                    "shard": k,
                    "error": format!("no working NATS connection for {ms} ms: acks wait"),
                    "nats_unreachable_ms": ms,
                })
            })
        })
        .collect();
    let lease_age = plan.placement.as_ref().and_then(|p| p.lease_age_ms(now));
    let lease_stale =
        lease_age.is_some_and(|ms| ms >= after + PLACEMENT_LEASE_INTERVAL.as_millis() as u64);
    if shards.is_empty() && !lease_stale {
        return None;
    }
    let mut body = serde_json::json!({"status": "replication_unavailable", "shards": shards});
    if let Some(ms) = lease_age {
        body["lease_age_ms"] = ms.into();
    }
    Some(body.to_string())
}

/// `/readyz`'s body while some shard's log refuses writes (failed sync, directory removed):
/// `{"status":"storage_unavailable","shards":[{"shard":N,"error":"..."}]}`; `None` when all
/// shards accept. Liveness (`/healthz`) is not affected: the process still serves reads.
fn storage_faults_body(shared: &Shared) -> Option<String> {
    let faults: Vec<serde_json::Value> = shared
        .storage_faults
        .iter()
        .enumerate()
        .filter_map(|(k, f)| f.get().map(|e| serde_json::json!({"shard": k, "error": e})))
        .collect();
    if faults.is_empty() {
        return None;
    }
    Some(serde_json::json!({"status": "storage_unavailable", "shards": faults}).to_string())
}
