//! Parsing one HTTP/1.x request head (with httparse) into the few fields geobeat acts on, with
//! every bound and request-smuggling rule enforced; query-string iteration with percent-decoding
//! into a reusable buffer; bearer-token extraction; the WebSocket upgrade check and accept key;
//! JSON error bodies. It does not read sockets, bodies (beyond validating their framing headers)
//! or route requests.
//!
//! Invariants: a [`Request`] only exists for a head within `HTTP_HEAD_BYTES_MAX`, a URI within
//! `HTTP_URI_BYTES_MAX`, at most `HTTP_HEADERS_MAX` headers, unambiguous body framing (at most one
//! `Content-Length`, never together with `Transfer-Encoding`, which may only be exactly
//! `chunked`) and a declared body within [`body_bytes_max`] (`HTTP_BODY_BYTES_MAX`, except
//! `FENCE_BODY_BYTES_MAX` for `PUT /v1/geofences/{name}`, `FENCE_BULK_BODY_BYTES_MAX` for
//! `POST /v1/geofences`). Any [`HeadError`] means: answer with [`HeadError::status`] and close
//! the connection (the next request's start is unknown).

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use crate::limits::{
    BASIC_CREDENTIALS_BYTES_MAX, FENCE_BODY_BYTES_MAX, FENCE_BULK_BODY_BYTES_MAX,
    HTTP_BODY_BYTES_MAX, HTTP_HEADERS_MAX, HTTP_HEAD_BYTES_MAX, HTTP_URI_BYTES_MAX,
};
use crate::proto::ack::write_json_string;

/// A parsed request head. Header values are those of the single occurrence (duplicates of these
/// headers are refused), except `Connection` and `Upgrade`, which may repeat (list headers): the
/// first value is kept and the `*_has_*` flags cover all occurrences.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'b> {
    /// Method, e.g. `GET`.
    pub method: &'b str,
    /// Path of the request target (before `?`), starting with `/` (or exactly `*`).
    pub path: &'b str,
    /// Raw query string (after `?`, without it); empty if none.
    pub query: &'b str,
    /// HTTP minor version: 0 or 1.
    pub minor_version: u8,
    /// Bytes of the head including the blank line: the body (if any) starts here.
    pub head_bytes: usize,
    /// `Host`.
    pub host: Option<&'b str>,
    /// `Authorization`.
    pub authorization: Option<&'b str>,
    /// First `Upgrade` value.
    pub upgrade: Option<&'b str>,
    /// First `Connection` value.
    pub connection: Option<&'b str>,
    /// Some `Upgrade` header lists the `websocket` protocol.
    pub upgrade_has_websocket: bool,
    /// Some `Connection` header lists the `upgrade` option.
    pub connection_has_upgrade: bool,
    /// Some `Connection` header lists `close`.
    pub connection_has_close: bool,
    /// `Sec-WebSocket-Key`.
    pub sec_websocket_key: Option<&'b str>,
    /// `Sec-WebSocket-Version`.
    pub sec_websocket_version: Option<&'b str>,
    /// Some `Sec-WebSocket-Protocol` header lists `mqtt` (MQTT over WebSocket).
    pub sec_websocket_protocol_mqtt: bool,
    /// `Accept` (first one; content negotiation for `/metrics`).
    pub accept: Option<&'b str>,
    /// `Content-Length`, parsed.
    pub content_length: Option<u64>,
    /// `Transfer-Encoding: chunked` was given.
    pub chunked: bool,
}

impl Request<'_> {
    /// Whether the connection may serve another request after this one (HTTP/1.1 without
    /// `Connection: close`).
    pub fn keep_alive(&self) -> bool {
        self.minor_version == 1 && !self.connection_has_close
    }
}

/// Outcome of parsing the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<'b> {
    /// A complete head.
    Complete(Request<'b>),
    /// More bytes are needed (and may still fit the bounds).
    Partial,
}

/// Why a request head was refused; answer with [`HeadError::status`], then close.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// Head longer than `HTTP_HEAD_BYTES_MAX`.
    #[error("request head too large")]
    HeadTooLarge,
    /// Request target longer than `HTTP_URI_BYTES_MAX`.
    #[error("request URI too long")]
    UriTooLong,
    /// More than `HTTP_HEADERS_MAX` headers.
    #[error("too many headers")]
    TooManyHeaders,
    /// Not a well-formed HTTP/1.x request head.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// Declared body larger than [`body_bytes_max`] allows.
    #[error("request body too large")]
    BodyTooLarge,
    /// Ambiguous body framing (request smuggling risk).
    #[error("ambiguous request framing: {0}")]
    Smuggling(&'static str),
}

impl HeadError {
    /// The HTTP status to answer with.
    pub fn status(self) -> u16 {
        match self {
            HeadError::HeadTooLarge | HeadError::TooManyHeaders => 431,
            HeadError::UriTooLong => 414,
            HeadError::Malformed(_) | HeadError::Smuggling(_) => 400,
            HeadError::BodyTooLarge => 413,
        }
    }
}

/// Parses the request head at the start of `buf` (bytes received so far).
pub fn parse_head(buf: &[u8]) -> Result<Parsed<'_>, HeadError> {
    let window = &buf[..buf.len().min(HTTP_HEAD_BYTES_MAX)];
    let mut headers = [httparse::EMPTY_HEADER; HTTP_HEADERS_MAX];
    let mut req = httparse::Request::new(&mut headers);
    let head_bytes = match req.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            let line_done = window.contains(&b'\n');
            // Method (<= 16) + space + target + " HTTP/1.1\r\n".
            if !line_done && window.len() > HTTP_URI_BYTES_MAX + 32 {
                return Err(HeadError::UriTooLong);
            }
            if buf.len() >= HTTP_HEAD_BYTES_MAX {
                return Err(HeadError::HeadTooLarge);
            }
            return Ok(Parsed::Partial);
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
        Err(httparse::Error::Version) => {
            return Err(HeadError::Malformed("unsupported HTTP version"))
        }
        Err(e) => {
            return Err(HeadError::Malformed(match e {
                httparse::Error::HeaderName => "invalid header name",
                httparse::Error::HeaderValue => "invalid header value",
                httparse::Error::NewLine => "invalid line ending",
                _ => "invalid request line",
            }))
        }
    };
    let (Some(method), Some(target), Some(minor_version)) = (req.method, req.path, req.version)
    else {
        return Err(HeadError::Malformed("incomplete request line"));
    };
    if target.len() > HTTP_URI_BYTES_MAX {
        return Err(HeadError::UriTooLong);
    }
    if !(target.starts_with('/') || target == "*") {
        return Err(HeadError::Malformed("request target must be a path"));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut r = Request {
        method,
        path,
        query,
        minor_version,
        head_bytes,
        host: None,
        authorization: None,
        upgrade: None,
        connection: None,
        upgrade_has_websocket: false,
        connection_has_upgrade: false,
        connection_has_close: false,
        sec_websocket_key: None,
        sec_websocket_version: None,
        sec_websocket_protocol_mqtt: false,
        accept: None,
        content_length: None,
        chunked: false,
    };
    let mut transfer_encoding_seen = false;
    for h in req.headers.iter() {
        let name = h.name;
        let value = || header_str(h.value);
        if name.eq_ignore_ascii_case("host") {
            once(&mut r.host, value()?, "duplicate Host")?;
        } else if name.eq_ignore_ascii_case("authorization") {
            once(&mut r.authorization, value()?, "duplicate Authorization")?;
        } else if name.eq_ignore_ascii_case("upgrade") {
            let v = value()?;
            r.upgrade.get_or_insert(v);
            r.upgrade_has_websocket |= list_has(v, "websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            let v = value()?;
            r.connection.get_or_insert(v);
            r.connection_has_upgrade |= list_has(v, "upgrade");
            r.connection_has_close |= list_has(v, "close");
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            r.sec_websocket_protocol_mqtt |= list_has(value()?, "mqtt");
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            once(
                &mut r.sec_websocket_key,
                value()?,
                "duplicate Sec-WebSocket-Key",
            )?;
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            once(
                &mut r.sec_websocket_version,
                value()?,
                "duplicate Sec-WebSocket-Version",
            )?;
        } else if name.eq_ignore_ascii_case("accept") {
            let v = value()?;
            r.accept.get_or_insert(v);
        } else if name.eq_ignore_ascii_case("content-length") {
            if r.content_length.is_some() {
                return Err(HeadError::Smuggling("more than one Content-Length"));
            }
            let v = value()?;
            if v.is_empty() || v.len() > 19 || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HeadError::Smuggling("Content-Length is not a plain number"));
            }
            r.content_length = Some(
                v.parse()
                    .map_err(|_| HeadError::Smuggling("Content-Length out of range"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if transfer_encoding_seen {
                return Err(HeadError::Smuggling("more than one Transfer-Encoding"));
            }
            transfer_encoding_seen = true;
            if !value()?.eq_ignore_ascii_case("chunked") {
                return Err(HeadError::Smuggling("Transfer-Encoding other than chunked"));
            }
            r.chunked = true;
        }
    }
    if r.chunked && r.content_length.is_some() {
        return Err(HeadError::Smuggling(
            "both Content-Length and Transfer-Encoding",
        ));
    }
    if r.chunked && minor_version == 0 {
        return Err(HeadError::Smuggling("Transfer-Encoding in HTTP/1.0"));
    }
    if minor_version == 1 && r.host.is_none() {
        return Err(HeadError::Malformed("missing Host"));
    }
    if r.content_length
        .is_some_and(|n| n > body_bytes_max(method, path) as u64)
    {
        return Err(HeadError::BodyTooLarge);
    }
    Ok(Parsed::Complete(r))
}

/// The largest request body accepted for `method` on `path`: `HTTP_BODY_BYTES_MAX`, except
/// `FENCE_BODY_BYTES_MAX` for `PUT /v1/geofences/{name}` (a polygon of many vertices) and
/// `FENCE_BULK_BODY_BYTES_MAX` for `POST /v1/geofences` (a bulk import), the routes that need
/// more. Checked before any body byte is read.
pub fn body_bytes_max(method: &str, path: &str) -> usize {
    if method == "PUT" && path.starts_with("/v1/geofences/") {
        FENCE_BODY_BYTES_MAX
    } else if method == "POST" && path == "/v1/geofences" {
        FENCE_BULK_BODY_BYTES_MAX
    } else {
        HTTP_BODY_BYTES_MAX
    }
}

/// A header value as trimmed UTF-8.
fn header_str(v: &[u8]) -> Result<&str, HeadError> {
    std::str::from_utf8(v)
        .map(str::trim)
        .map_err(|_| HeadError::Malformed("non-UTF-8 header value"))
}

/// Stores a header that may appear only once.
fn once<'b>(slot: &mut Option<&'b str>, v: &'b str, what: &'static str) -> Result<(), HeadError> {
    if slot.is_some() {
        return Err(HeadError::Malformed(what));
    }
    *slot = Some(v);
    Ok(())
}

/// Whether comma-separated header list `value` contains `token` (case-insensitive).
fn list_has(value: &str, token: &str) -> bool {
    value
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// A query string parameter, still percent-encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryParam<'a> {
    /// Raw key.
    pub key: &'a str,
    /// Raw value (empty for `key` without `=`).
    pub value: &'a str,
}

/// Iterates the `&`-separated parameters of a raw query string (empty segments skipped).
pub fn query_params(query: &str) -> impl Iterator<Item = QueryParam<'_>> {
    query.split('&').filter(|s| !s.is_empty()).map(|s| {
        let (key, value) = s.split_once('=').unwrap_or((s, ""));
        QueryParam { key, value }
    })
}

/// Why a query component could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// `%` not followed by two hex digits.
    #[error("bad percent escape")]
    BadEscape,
    /// The decoded bytes are not UTF-8.
    #[error("decoded text is not UTF-8")]
    NotUtf8,
}

/// Percent-decodes `raw` (form encoding: `+` is a space) into `out` (cleared first), returning
/// the decoded text. `out` is reused across calls.
pub fn percent_decode<'o>(raw: &str, out: &'o mut Vec<u8>) -> Result<&'o str, DecodeError> {
    out.clear();
    let b = raw.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = |c: u8| (c as char).to_digit(16);
                let (Some(hi), Some(lo)) = (
                    b.get(i + 1).copied().and_then(hex),
                    b.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(DecodeError::BadEscape);
                };
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    std::str::from_utf8(out).map_err(|_| DecodeError::NotUtf8)
}

/// Percent-encodes `s` for a query component (unreserved characters stay, everything else,
/// space included, becomes `%XX`), appending to `out`.
pub fn percent_encode(s: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xF)]));
        }
    }
}

/// The decoded value of the first parameter whose decoded key is `name`, decoded into `buf`.
pub fn query_param<'o>(
    query: &str,
    name: &str,
    buf: &'o mut Vec<u8>,
) -> Result<Option<&'o str>, DecodeError> {
    let mut found = None;
    for p in query_params(query) {
        let matches = if p.key.contains(['%', '+']) {
            percent_decode(p.key, buf)? == name
        } else {
            p.key == name
        };
        if matches {
            found = Some(p.value);
            break;
        }
    }
    match found {
        Some(raw) => percent_decode(raw, buf).map(Some),
        None => Ok(None),
    }
}

/// The bearer token of a request: from `Authorization: Bearer <t>` (scheme case-insensitive),
/// else from the `token` query parameter (for clients that cannot set headers, e.g. browsers'
/// WebSocket API). The header wins when both are present. `Ok(None)`: no token given.
pub fn bearer_token<'a>(
    req: &Request<'a>,
    buf: &'a mut Vec<u8>,
) -> Result<Option<&'a str>, DecodeError> {
    if let Some(auth) = req.authorization {
        if let Some((scheme, rest)) = auth.split_once(' ') {
            let token = rest.trim();
            if scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() {
                return Ok(Some(token));
            }
        }
    }
    Ok(query_param(req.query, "token", buf)?.filter(|t| !t.is_empty()))
}

/// `Authorization: Basic` credentials that are not base64 of UTF-8 `user:password` (or are
/// longer than [`BASIC_CREDENTIALS_BYTES_MAX`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed Basic credentials")]
pub struct BadBasic;

/// The user and password of `Authorization: Basic <base64(user:password)>` (scheme
/// case-insensitive, RFC 7617), decoded into `buf`; `Ok(None)` when the request has no Basic
/// credentials. For apps that cannot set headers but can put credentials in a URL.
pub fn basic_credentials<'a>(
    req: &Request<'_>,
    buf: &'a mut Vec<u8>,
) -> Result<Option<(&'a str, &'a str)>, BadBasic> {
    let Some((scheme, rest)) = req.authorization.and_then(|a| a.split_once(' ')) else {
        return Ok(None);
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return Ok(None);
    }
    let encoded = rest.trim();
    if encoded.len() > BASIC_CREDENTIALS_BYTES_MAX {
        return Err(BadBasic);
    }
    buf.clear();
    STANDARD.decode_vec(encoded, buf).map_err(|_| BadBasic)?;
    let text = std::str::from_utf8(buf).map_err(|_| BadBasic)?;
    let (user, password) = text.split_once(':').ok_or(BadBasic)?;
    Ok(Some((user, password)))
}

/// Why a request is not an acceptable WebSocket upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpgradeError {
    /// Not `GET` (answer 405).
    #[error("WebSocket upgrade requires GET")]
    NotGet,
    /// Not HTTP/1.1 (answer 400).
    #[error("WebSocket upgrade requires HTTP/1.1")]
    NotHttp11,
    /// No `Upgrade: websocket` / `Connection: upgrade` (answer 426 with `Upgrade: websocket`).
    #[error("not a WebSocket upgrade request")]
    NotUpgrade,
    /// `Sec-WebSocket-Version` is not 13 (answer 426 with `Sec-WebSocket-Version: 13`).
    #[error("unsupported WebSocket version (13 required)")]
    BadVersion,
    /// `Sec-WebSocket-Key` missing or not base64 of 16 bytes (answer 400).
    #[error("missing or invalid Sec-WebSocket-Key")]
    BadKey,
}

impl UpgradeError {
    /// The HTTP status to answer with.
    pub fn status(self) -> u16 {
        match self {
            UpgradeError::NotGet => 405,
            UpgradeError::NotHttp11 | UpgradeError::BadKey => 400,
            UpgradeError::NotUpgrade | UpgradeError::BadVersion => 426,
        }
    }
}

/// Checks that `req` is a valid WebSocket upgrade (RFC 6455 §4.2.1) and returns the
/// `Sec-WebSocket-Accept` value.
pub fn websocket_accept(req: &Request<'_>) -> Result<String, UpgradeError> {
    if req.method != "GET" {
        return Err(UpgradeError::NotGet);
    }
    if req.minor_version != 1 {
        return Err(UpgradeError::NotHttp11);
    }
    if !(req.upgrade_has_websocket && req.connection_has_upgrade) {
        return Err(UpgradeError::NotUpgrade);
    }
    if req.sec_websocket_version != Some("13") {
        return Err(UpgradeError::BadVersion);
    }
    let key = req.sec_websocket_key.ok_or(UpgradeError::BadKey)?;
    let mut raw = [0u8; 24];
    match STANDARD.decode_slice(key, &mut raw) {
        Ok(16) => {}
        _ => return Err(UpgradeError::BadKey),
    }
    Ok(tungstenite::handshake::derive_accept_key(key.as_bytes()))
}

/// Writes the `101 Switching Protocols` response head for `accept` into `out` (cleared first).
pub fn write_switching_protocols(out: &mut String, accept: &str) {
    out.clear();
    out.push_str("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ");
    out.push_str(accept);
    out.push_str("\r\n\r\n");
}

/// A JSON error body `{"error":"<message>","param":"<param>"}` (`param` omitted when `None`),
/// returned with its status for the caller to send.
pub fn json_error(status: u16, message: &str, param: Option<&str>) -> (u16, String) {
    let mut body = String::with_capacity(32 + message.len());
    body.push_str("{\"error\":");
    write_json_string(&mut body, message);
    if let Some(p) = param {
        body.push_str(",\"param\":");
        write_json_string(&mut body, p);
    }
    body.push('}');
    (status, body)
}

/// The reason phrase of the statuses geobeat sends (`""` for others).
pub fn status_text(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        410 => "Gone",
        411 => "Length Required",
        413 => "Content Too Large",
        414 => "URI Too Long",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(head: &str) -> Request<'_> {
        match parse_head(head.as_bytes()) {
            Ok(Parsed::Complete(r)) => r,
            other => panic!("expected a complete head, got {other:?}"),
        }
    }

    #[test]
    fn basic_credentials_are_decoded() {
        // RFC 7617's example, a password holding a colon, absent and malformed credentials.
        let mut buf = Vec::new();
        let r = complete("GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==\r\n\r\n");
        assert_eq!(
            basic_credentials(&r, &mut buf),
            Ok(Some(("Aladdin", "open sesame")))
        );
        let r = complete("GET / HTTP/1.1\r\nHost: x\r\nauthorization: basic ZGV2OmE6Yg==\r\n\r\n");
        assert_eq!(basic_credentials(&r, &mut buf), Ok(Some(("dev", "a:b"))));
        let r = complete("GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n\r\n");
        assert_eq!(basic_credentials(&r, &mut buf), Ok(None));
        for bad in ["Basic !!!", "Basic bm9jb2xvbg==", "Basic //8="] {
            let head = format!("GET / HTTP/1.1\r\nHost: x\r\nAuthorization: {bad}\r\n\r\n");
            let r = complete(&head);
            assert_eq!(basic_credentials(&r, &mut buf), Err(BadBasic), "{bad}");
        }
    }

    const UPGRADE: &str = "GET /v1/ingest?token=abc HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
        Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\nAuthorization: Bearer t0k\r\n\r\nBODY";

    #[test]
    fn parses_a_websocket_upgrade() {
        // Fields of interest, head length, and the RFC 6455 sample accept key.
        let r = complete(UPGRADE);
        assert_eq!(
            (r.method, r.path, r.query),
            ("GET", "/v1/ingest", "token=abc")
        );
        assert_eq!(r.head_bytes, UPGRADE.len() - 4);
        assert!(r.upgrade_has_websocket && r.connection_has_upgrade && r.keep_alive());
        assert_eq!(
            websocket_accept(&r).unwrap(),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        let mut out = String::new();
        write_switching_protocols(&mut out, "abc");
        assert!(
            out.starts_with("HTTP/1.1 101 ") && out.ends_with("Sec-WebSocket-Accept: abc\r\n\r\n")
        );
    }

    #[test]
    fn upgrade_refusals_have_statuses() {
        // Wrong method, version, missing headers, bad key.
        let r = complete(UPGRADE);
        let mut post = r.clone();
        post.method = "POST";
        assert_eq!(websocket_accept(&post).unwrap_err().status(), 405);
        let mut v = r.clone();
        v.sec_websocket_version = Some("8");
        assert_eq!(websocket_accept(&v).unwrap_err().status(), 426);
        let mut k = r.clone();
        k.sec_websocket_key = Some("c2hvcnQ=");
        assert_eq!(websocket_accept(&k), Err(UpgradeError::BadKey));
        let plain = complete("GET /v1/ingest HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(websocket_accept(&plain), Err(UpgradeError::NotUpgrade));
    }

    #[test]
    fn partial_heads_and_bounds() {
        // Incomplete input asks for more until the bounds are crossed.
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\nHost: x\r\n"),
            Ok(Parsed::Partial)
        );
        assert_eq!(parse_head(b""), Ok(Parsed::Partial));
        let long_uri = format!(
            "GET /{} HTTP/1.1\r\nHost: x\r\n\r\n",
            "a".repeat(HTTP_URI_BYTES_MAX)
        );
        assert_eq!(parse_head(long_uri.as_bytes()), Err(HeadError::UriTooLong));
        let partial_uri = format!("GET /{}", "a".repeat(HTTP_URI_BYTES_MAX + 40));
        assert_eq!(
            parse_head(partial_uri.as_bytes()).unwrap_err().status(),
            414
        );
        let big = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX: {}\r\n",
            "v".repeat(HTTP_HEAD_BYTES_MAX)
        );
        assert_eq!(parse_head(big.as_bytes()).unwrap_err().status(), 431);
        let many: String = (0..=HTTP_HEADERS_MAX)
            .map(|i| format!("X-{i}: v\r\n"))
            .collect();
        let many = format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n");
        assert_eq!(parse_head(many.as_bytes()), Err(HeadError::TooManyHeaders));
        let body = "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 65537\r\n\r\n";
        assert_eq!(parse_head(body.as_bytes()).unwrap_err().status(), 413);
    }

    #[test]
    fn smuggling_is_refused() {
        // Every ambiguous framing is a 400.
        for head in [
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            let err = parse_head(head.as_bytes()).unwrap_err();
            assert!(matches!(err, HeadError::Smuggling(_)), "{head:?}: {err:?}");
            assert_eq!(err.status(), 400);
        }
        assert!(
            complete("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\r\n").chunked
        );
    }

    #[test]
    fn malformed_heads_are_400() {
        // Garbage, missing Host on 1.1, absolute targets, duplicate Host.
        for head in [
            "GARBAGE\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
            "GET / HTTP/2.0\r\nHost: x\r\n\r\n",
        ] {
            assert_eq!(
                parse_head(head.as_bytes()).unwrap_err().status(),
                400,
                "{head:?}"
            );
        }
        let r = complete("GET /healthz HTTP/1.0\r\n\r\n");
        assert_eq!(r.minor_version, 0);
        assert!(!r.keep_alive());
    }

    #[test]
    fn query_and_bearer_tokens() {
        // Decoding, first match wins, header beats query, bad escapes are errors.
        let mut buf = Vec::new();
        assert_eq!(
            query_param("a=1&b=x%20y+z&b=2", "b", &mut buf),
            Ok(Some("x y z"))
        );
        assert_eq!(
            query_param("a=1&%74oken=t", "token", &mut buf),
            Ok(Some("t"))
        );
        assert_eq!(query_param("flag&&a=", "flag", &mut buf), Ok(Some("")));
        assert_eq!(query_param("a=1", "b", &mut buf), Ok(None));
        assert_eq!(
            query_param("a=%zz", "a", &mut buf),
            Err(DecodeError::BadEscape)
        );
        assert_eq!(
            query_param("a=%ff", "a", &mut buf),
            Err(DecodeError::NotUtf8)
        );
        let r = complete(UPGRADE);
        assert_eq!(bearer_token(&r, &mut buf), Ok(Some("t0k")));
        let mut q = r.clone();
        q.authorization = Some("Basic abc");
        assert_eq!(bearer_token(&q, &mut buf), Ok(Some("abc")));
        q.query = "";
        assert_eq!(bearer_token(&q, &mut buf), Ok(None));
    }

    #[test]
    fn json_error_bodies() {
        // Escaped message, optional param.
        assert_eq!(
            json_error(404, "unknown device", None),
            (404, r#"{"error":"unknown device"}"#.into())
        );
        let (s, body) = json_error(400, "bad \"x\"", Some("ttl"));
        assert_eq!(s, 400);
        assert_eq!(body, r#"{"error":"bad \"x\"","param":"ttl"}"#);
        assert_eq!(status_text(431), "Request Header Fields Too Large");
    }
}
