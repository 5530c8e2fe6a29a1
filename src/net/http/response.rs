//! [`Response`]: a complete HTTP answer as the resources build it, and the JSON error bodies
//! every endpoint shares. It owns no routing.

use serde::Serialize;

use crate::http::parse;
use crate::net::auth::Refusal;

/// A complete response.
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Content type of `body` (may be followed by further fixed header lines, CRLF-separated:
    /// see `live::content_type_and_headers`).
    pub content_type: &'static str,
    /// The body.
    pub body: String,
}

impl Response {
    /// A JSON answer.
    pub fn json(status: u16, body: String) -> Response {
        Response {
            status,
            content_type: "application/json",
            body,
        }
    }

    /// A JSON error: `{"error": message}`.
    pub fn error(status: u16, message: &str) -> Response {
        Response::json(status, error_body(message))
    }

    /// A 400 naming the parameter at fault.
    pub fn param_error(message: &str, param: &str) -> Response {
        let (status, body) = parse::json_error(400, message, Some(param));
        Response::json(status, body)
    }
}

/// A JSON error body: `{"error": message}` (the status line's reason phrase is
/// [`parse::status_text`], the one table).
pub fn error_body(message: &str) -> String {
    #[derive(Serialize)]
    struct E<'a> {
        error: &'a str,
    }
    serde_json::to_string(&E { error: message }).expect("serializing a string cannot fail")
}

impl From<Refusal> for Response {
    fn from(r: Refusal) -> Response {
        Response::json(r.status, r.body)
    }
}
