//! Fuzz target: HTTP request-head parsing and the helpers the server applies to a parsed head
//! (`geobeat::http::parse`): `parse_head`, query-parameter iteration and percent-decoding,
//! `bearer_token`, `websocket_accept`, plus `percent_encode`/`percent_decode` round trips.
//! Checks: no panic; a complete head respects every bound and framing rule the module promises
//! (head within `HTTP_HEAD_BYTES_MAX`, URI within `HTTP_URI_BYTES_MAX`, unambiguous body framing,
//! declared body within `HTTP_BODY_BYTES_MAX`); a prefix of a complete head is never accepted as
//! a different complete head; decoding an encoding gives the text back.
#![no_main]

use geobeat::http::parse::{self, Parsed};
use geobeat::limits::{HTTP_BODY_BYTES_MAX, HTTP_HEAD_BYTES_MAX, HTTP_URI_BYTES_MAX};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse::parse_head(data) {
        Ok(Parsed::Complete(req)) => {
            assert!(req.head_bytes <= data.len() && req.head_bytes <= HTTP_HEAD_BYTES_MAX);
            assert!(data[..req.head_bytes].ends_with(b"\n"));
            assert!(req.path.starts_with('/') || req.path == "*");
            assert!(req.path.len() + req.query.len() < HTTP_URI_BYTES_MAX + 1);
            assert!(req.minor_version <= 1);
            assert!(!(req.chunked && req.content_length.is_some()));
            assert!(!(req.chunked && req.minor_version == 0));
            assert!(req
                .content_length
                .is_none_or(|n| n <= HTTP_BODY_BYTES_MAX as u64));
            if req.minor_version == 1 {
                assert!(req.host.is_some());
            }
            // Bytes after the head (a body or a pipelined request) do not change the head.
            let head = &data[..req.head_bytes];
            match parse::parse_head(head) {
                Ok(Parsed::Complete(again)) => assert_eq!(again, req),
                other => panic!("the head alone parses differently: {other:?}"),
            }
            let mut buf = Vec::new();
            for p in parse::query_params(req.query) {
                assert!(!p.key.contains('&') && !p.value.contains('&'));
                let _ = parse::percent_decode(p.key, &mut buf);
                let _ = parse::percent_decode(p.value, &mut buf);
            }
            let _ = parse::query_param(req.query, "limit", &mut buf);
            let mut scratch = Vec::new();
            if let Ok(Some(t)) = parse::bearer_token(&req, &mut scratch) {
                assert!(!t.is_empty());
            }
            if let Ok(accept) = parse::websocket_accept(&req) {
                assert_eq!(accept.len(), 28, "base64 of a SHA-1");
            }
        }
        Ok(Parsed::Partial) => {
            assert!(data.len() < HTTP_HEAD_BYTES_MAX);
        }
        Err(e) => {
            assert!(matches!(e.status(), 400 | 413 | 414 | 431));
            let (status, body) = parse::json_error(e.status(), &e.to_string(), None);
            assert_eq!(status, e.status());
            let _: serde_json::Value = serde_json::from_str(&body).expect("JSON error body");
        }
    }
    // Query-string helpers on arbitrary text.
    if let Ok(text) = std::str::from_utf8(data) {
        let mut buf = Vec::new();
        let _ = parse::query_param(text, "token", &mut buf);
        let mut enc = String::new();
        parse::percent_encode(text, &mut enc);
        assert!(enc.bytes().all(|b| b.is_ascii_graphic()));
        let back = parse::percent_decode(&enc, &mut buf).expect("an encoding decodes");
        assert_eq!(back, text);
    }
});
