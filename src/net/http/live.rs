//! The operator console, served at `/console` and at `/live` (the older debugging map's address):
//! one self-contained HTML file (`console.html`, compiled in) with an offline basemap (Natural
//! Earth land and borders, `console_basemap.json`, built once by `tools/basemap.py` from the npm
//! package `world-atlas`; see `console_basemap.NOTICE`) spliced into its script at start. The page
//! speaks the public API as any client would: `/v1/devices` (list, details, history),
//! `/v1/geofences` (list, draw, edit, delete), `/v1/stats` and `/v1/sinks` (health) and the
//! subscription WebSocket (live positions, fence events), all with the ops token the operator
//! pastes. This module owns serving that page and its security headers; it does not own the
//! protocols and holds no data (the page is public; the data needs the token). Invariant: the
//! Content-Security-Policy allows exactly the page's own inline `<script>` and `<style>` (by
//! SHA-256, computed from the page as served, so an edit can never leave a stale hash) plus
//! connections to this origin, and nothing else: no external resource can load even if the page
//! were changed to ask for one.

use std::sync::OnceLock;

use base64::Engine as _;
use sha2::{Digest, Sha256};

/// The page as written, with [`BASEMAP_MARKER`] where the basemap goes.
pub const PAGE_TEMPLATE: &str = include_str!("console.html");

/// The basemap: one line of JSON (see `tools/basemap.py` for its encoding), ASCII only.
pub const BASEMAP_JSON: &str = include_str!("console_basemap.json");

/// The one place in [`PAGE_TEMPLATE`]'s script that the basemap replaces (a JavaScript
/// expression: without the splice the page still runs, with an empty map).
pub const BASEMAP_MARKER: &str = "/*BASEMAP*/null";

/// The page, as served: the template with the basemap spliced in (once; the CSP hashes this).
pub fn page_html() -> &'static str {
    static PAGE: OnceLock<String> = OnceLock::new();
    PAGE.get_or_init(|| {
        assert_eq!(PAGE_TEMPLATE.matches(BASEMAP_MARKER).count(), 1);
        PAGE_TEMPLATE.replace(BASEMAP_MARKER, BASEMAP_JSON.trim_end())
    })
}

/// The text between the first `<tag>` and the following `</tag>` of `html` (`tag` without the
/// angle brackets), or `None` when there is no such element.
pub fn inline_element<'a>(html: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = html.find(&open)? + open.len();
    let len = html[start..].find(&close)?;
    Some(&html[start..start + len])
}

/// The CSP source expression of an inline element's text: `'sha256-<base64>'`.
fn hash_source(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    format!(
        "'sha256-{}'",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

/// The Content-Security-Policy of the page.
pub fn content_security_policy() -> &'static str {
    static CSP: OnceLock<String> = OnceLock::new();
    CSP.get_or_init(|| {
        let page = page_html();
        let script = inline_element(page, "script").expect("console.html has a <script>");
        let style = inline_element(page, "style").expect("console.html has a <style>");
        // connect-src 'self' covers fetch (the HTTP API) and, in CSP level 3 (every current
        // browser), the WebSocket to this host and port (ws: or wss: by the page's scheme); no
        // other host, not even another WebSocket server, can be reached.
        format!(
            "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; \
             img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            hash_source(script),
            hash_source(style)
        )
    })
}

/// The value given as the response's content type: the type itself followed by the page's
/// security headers. The HTTP writer prints it after `content-type: ` and ends it with CRLF, so
/// further header lines ride along separated by CRLF (all of it fixed text, never request data).
pub fn content_type_and_headers() -> &'static str {
    static HEAD: OnceLock<String> = OnceLock::new();
    HEAD.get_or_init(|| {
        format!(
            "text/html; charset=utf-8\r\ncontent-security-policy: {}\r\n\
             x-content-type-options: nosniff\r\nreferrer-policy: no-referrer\r\n\
             cache-control: no-cache",
            content_security_policy()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_pins_the_inline_script_and_style_and_nothing_external() {
        // Checks that the CSP carries the hashes of exactly the served page's inline script and
        // style (basemap included), and that the page names no external resource (no src/href
        // attributes, no url(), no @import, no absolute URL), so the strict policy costs the
        // page nothing.
        let page = page_html();
        let csp = content_security_policy();
        let script = inline_element(page, "script").unwrap();
        assert!(script.contains("/v1/subscribe"));
        assert!(script.contains(BASEMAP_JSON.trim_end()));
        assert!(!page.contains(BASEMAP_MARKER));
        assert!(csp.contains(&hash_source(script)), "{csp}");
        assert!(csp.contains(&hash_source(inline_element(page, "style").unwrap())));
        assert!(csp.starts_with("default-src 'none';"));
        assert!(!csp.contains("unsafe"), "{csp}");
        assert_eq!(page.matches("<script").count(), 1);
        assert_eq!(page.matches("<style").count(), 1);
        for banned in [
            " src=", " href=", "url(", "@import", "http://", "https://", " style=",
        ] {
            assert!(
                !page.contains(banned),
                "the console page contains {banned:?}"
            );
        }
        // No inline event handler attributes (` onclick=` ..): the CSP would block them.
        let handler = page.match_indices(" on").find(|(i, _)| {
            let rest = &page[i + 3..];
            let letters = rest.len()
                - rest
                    .trim_start_matches(|c: char| c.is_ascii_lowercase())
                    .len();
            letters > 0 && rest[letters..].starts_with('=')
        });
        assert!(handler.is_none(), "inline handler at {handler:?}");
        // No header line may be smuggled in from the page: the head is fixed text.
        let head = content_type_and_headers();
        assert!(head.starts_with("text/html; charset=utf-8\r\n"));
        assert_eq!(head.matches("\r\n").count(), 4);
        assert!(!head.ends_with("\r\n"));
    }

    #[test]
    fn basemap_is_small_plain_and_well_formed() {
        // Checks the compiled-in basemap: under 200 KB, one line of JSON whose strings use only
        // the base64url alphabet (nothing that could close the script element or need escaping),
        // with land rings and border lines whose encoded integers come in (lon, lat) pairs that
        // stay on the globe (longitudes run on past ±180 where a ring crosses the antimeridian).
        assert!(BASEMAP_JSON.len() < 200_000, "{}", BASEMAP_JSON.len());
        assert_eq!(BASEMAP_JSON.trim_end().lines().count(), 1);
        let v: serde_json::Value = serde_json::from_str(BASEMAP_JSON).unwrap();
        assert_eq!(v["v"], 1);
        let q = v["q"].as_i64().unwrap();
        const ALPHABET: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        for (kind, min_count) in [("land", 50), ("borders", 100)] {
            let lines = v[kind].as_array().unwrap();
            assert!(lines.len() >= min_count, "{kind}: {}", lines.len());
            for line in lines {
                let mut nums = Vec::new();
                let (mut acc, mut shift) = (0i64, 0);
                for c in line.as_str().unwrap().chars() {
                    let b = ALPHABET.find(c).expect("base64url") as i64;
                    acc |= (b & 31) << shift;
                    if b & 32 != 0 {
                        shift += 5;
                        continue;
                    }
                    nums.push(if acc & 1 == 1 {
                        -(acc + 1) / 2
                    } else {
                        acc / 2
                    });
                    (acc, shift) = (0, 0);
                }
                assert_eq!(shift, 0, "{kind}: a line ends inside a number");
                assert!(nums.len() >= 4 && nums.len() % 2 == 0, "{kind}: {nums:?}");
                let (mut x, mut y) = (0, 0);
                for p in nums.chunks(2) {
                    (x, y) = (x + p[0], y + p[1]);
                    assert!(
                        x.abs() <= 360 * q && y.abs() <= 90 * q,
                        "{kind}: ({x}, {y})"
                    );
                }
            }
        }
    }

    #[test]
    fn inline_element_finds_the_text_between_tags() {
        // Checks the extraction the hashes depend on, including a missing element.
        assert_eq!(inline_element("a<b>x</b>c", "b"), Some("x"));
        assert_eq!(inline_element("<b></b>", "b"), Some(""));
        assert_eq!(inline_element("<b>x", "b"), None);
        assert_eq!(inline_element("x", "b"), None);
    }
}
