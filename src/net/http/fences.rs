//! `/v1/geofences` (list, bulk import) and `/v1/geofences/{name}` (get, put, delete): parsed into
//! a [`Fences`] command (path, method, token, name, in the documented order of refusals), then
//! applied against the server's fence registry. Writes (parse, validate, file write, fsync) run
//! on a helper thread, so a 64 MiB body or a 10,000-vertex polygon never stalls the executor.
//!
//! Invariant: every write is all or nothing and persisted before it is answered.

use crate::http::parse::{self, Request};
use crate::net::auth::{self, Need};
use crate::net::http::response::Response;
use crate::node::Shared;

/// A parsed request of this resource.
pub enum Fences<'b> {
    /// `GET /v1/geofences`.
    List,
    /// `POST /v1/geofences` with its body.
    Bulk(&'b [u8]),
    /// `GET /v1/geofences/{name}`.
    Get(String),
    /// `PUT /v1/geofences/{name}` with its body.
    Put(String, &'b [u8]),
    /// `DELETE /v1/geofences/{name}`.
    Delete(String),
}

impl<'b> Fences<'b> {
    /// Parses a request whose path is `/v1/geofences` or starts with `/v1/geofences/`.
    pub fn parse(
        shared: &Shared,
        req: &Request<'_>,
        body: &'b [u8],
    ) -> Result<Fences<'b>, Response> {
        if req.path == "/v1/geofences" {
            let need = match req.method {
                "GET" => Need::OpsOrSubscriber,
                "POST" => Need::Read(None),
                _ => return Err(Response::error(405, "method not allowed")),
            };
            auth::check(shared, req, need)?;
            return Ok(match req.method {
                "GET" => Fences::List,
                _ => Fences::Bulk(body),
            });
        }
        let raw = &req.path["/v1/geofences/".len()..];
        let mut buf = Vec::new();
        let name = match parse::percent_decode(raw, &mut buf) {
            Ok(n) => n.to_owned(),
            Err(_) => return Err(Response::param_error("bad percent-encoding", "name")),
        };
        let need = match req.method {
            "GET" => Need::OpsOrSubscriber,
            "PUT" | "DELETE" => Need::Read(None),
            _ => return Err(Response::error(405, "method not allowed")),
        };
        auth::check(shared, req, need)?;
        if let Err(e) = crate::fence::validate_name(&name) {
            return Err(fence_error(400, &e, "name"));
        }
        Ok(match req.method {
            "GET" => Fences::Get(name),
            "PUT" => Fences::Put(name, body),
            _ => Fences::Delete(name),
        })
    }

    /// Answers the command.
    pub async fn apply(self, shared: &Shared) -> Response {
        match self {
            Fences::List => fence_list(shared),
            Fences::Bulk(body) => fence_bulk(shared, body).await,
            Fences::Get(name) => fence_get(shared, &name),
            Fences::Put(name, body) => fence_put(shared, &name, body).await,
            Fences::Delete(name) => fence_delete(shared, name).await,
        }
    }
}

/// Whether `method` on `path` takes a request body (the geofence writes; every other request
/// with a body is refused before the body is read).
pub fn takes_body(method: &str, path: &str) -> bool {
    match method {
        "POST" => path == "/v1/geofences",
        "PUT" => path.starts_with("/v1/geofences/"),
        _ => false,
    }
}

/// A fence error as JSON: `{"error": <what is wrong>, "reason": <stable reason>, "param": ..}`.
fn fence_error(status: u16, e: &crate::fence::FenceError, param: &str) -> Response {
    Response::json(
        status,
        serde_json::json!({"error": e.to_string(), "reason": e.reason(), "param": param})
            .to_string(),
    )
}

fn unknown_fence() -> Response {
    Response::json(404, r#"{"error":"unknown geofence","param":"name"}"#.into())
}

/// Runs a registry write (file write, fsync, rename) on its own thread, so the executor keeps
/// serving meanwhile; geofence writes are rare operator actions.
async fn off_executor<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = futures_channel::oneshot::channel();
    std::thread::Builder::new()
        .name("geobeat-fences".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .ok()?;
    rx.await.ok()
}

fn fence_list(shared: &Shared) -> Response {
    let (_, set) = shared.fences.snapshot();
    let mut names: Vec<&str> = set.names().collect();
    names.sort_unstable();
    let fences: Vec<serde_json::Value> = names
        .into_iter()
        .map(|n| serde_json::json!({ "name": n }))
        .collect();
    Response::json(200, serde_json::json!({ "fences": fences }).to_string())
}

fn fence_get(shared: &Shared, name: &str) -> Response {
    let (_, set) = shared.fences.snapshot();
    let Some(fence) = set.by_name(name) else {
        return unknown_fence();
    };
    let mut body = String::with_capacity(64);
    body.push_str(r#"{"name":"#);
    body.push_str(&serde_json::to_string(name).expect("serializable"));
    body.push_str(r#","shape":"#);
    body.push_str(&fence.to_json());
    body.push('}');
    Response::json(200, body)
}

async fn fence_put(shared: &Shared, name: &str, body: &[u8]) -> Response {
    use crate::fence::FenceError;
    let registry = shared.fences.clone();
    // Parsing runs on the fence thread with the write: validating a 10,000-position polygon
    // (the self-intersection sweep) must not stall the executor's heartbeats.
    let (n, body) = (name.to_string(), body.to_vec());
    let done = off_executor(move || {
        let fence = crate::fence::Fence::parse(&n, &body).map_err(|e| (e, "body"))?;
        drop(body);
        registry.put(fence).map_err(|e| {
            let param = if matches!(e, FenceError::TooManyVerticesTotal(_)) {
                "body"
            } else {
                "name"
            };
            (e, param)
        })
    })
    .await;
    match done {
        Some(Ok(created)) => Response::json(
            200,
            serde_json::json!({"name": name, "created": created}).to_string(),
        ),
        Some(Err((e, param)))
            if !matches!(e, FenceError::Io { .. } | FenceError::Corrupt { .. }) =>
        {
            fence_error(400, &e, param)
        }
        Some(Err((e, param))) => {
            tracing::error!(error = %e, "could not store a geofence");
            fence_error(500, &e, param)
        }
        None => Response::error(500, "geofence write did not complete"),
    }
}

/// `POST /v1/geofences`: validates the whole batch (with the PUT route's rules), then stores it
/// with one file write and one snapshot, or changes nothing. Parsing runs beside the registry
/// write on the fence thread: a 64 MiB body must not stall the executor's heartbeats.
async fn fence_bulk(shared: &Shared, body: &[u8]) -> Response {
    use crate::fence::{BatchError, FenceError};
    let registry = shared.fences.clone();
    let body = body.to_vec();
    let done = off_executor(move || {
        let batch = crate::fence::parse_batch(&body)?;
        drop(body);
        registry.put_many(batch).map_err(|error| BatchError {
            index: None,
            param: "fences",
            error,
        })
    })
    .await;
    match done {
        Some(Ok((created, replaced))) => Response::json(
            200,
            serde_json::json!({"created": created, "replaced": replaced}).to_string(),
        ),
        Some(Err(e)) if matches!(e.error, FenceError::Io { .. } | FenceError::Corrupt { .. }) => {
            tracing::error!(error = %e.error, "could not store a geofence batch");
            fence_error(500, &e.error, e.param)
        }
        Some(Err(e)) => {
            let mut v = serde_json::json!({
                "error": e.error.to_string(),
                "reason": e.error.reason(),
                "param": e.param,
            });
            if let Some(i) = e.index {
                v["index"] = i.into();
            }
            Response::json(400, v.to_string())
        }
        None => Response::error(500, "geofence write did not complete"),
    }
}

async fn fence_delete(shared: &Shared, name: String) -> Response {
    let registry = shared.fences.clone();
    let n = name.clone();
    match off_executor(move || registry.delete(&n)).await {
        Some(Ok(true)) => Response::json(
            200,
            serde_json::json!({"name": name, "deleted": true}).to_string(),
        ),
        Some(Ok(false)) => unknown_fence(),
        Some(Err(e)) => {
            tracing::error!(error = %e, "could not delete a geofence");
            fence_error(500, &e, "name")
        }
        None => Response::error(500, "geofence write did not complete"),
    }
}
