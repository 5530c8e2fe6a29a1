//! The `/live` page: one self-contained HTML file (`live.html`, compiled in) that subscribes over
//! `/v1/subscribe` and draws the subscribed devices on a canvas map without tiles. This module
//! owns serving that page and its security headers; it does not own the subscription protocol
//! (the page speaks it as any client would) and holds no data (the page is public; the data
//! needs the token the page is opened with). Invariant: the Content-Security-Policy allows
//! exactly the page's own inline `<script>` and `<style>` (by SHA-256, computed from the
//! compiled-in file, so an edit of the page can never leave a stale hash) plus connections to
//! this origin, and nothing else: no external resource can load even if the page were changed
//! to ask for one.

use std::sync::OnceLock;

use base64::Engine as _;
use sha2::{Digest, Sha256};

/// The page, as served.
pub const PAGE_HTML: &str = include_str!("live.html");

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
        let script = inline_element(PAGE_HTML, "script").expect("live.html has a <script>");
        let style = inline_element(PAGE_HTML, "style").expect("live.html has a <style>");
        // connect-src: 'self' covers fetch (fence outlines); ws:/wss: cover the WebSocket for
        // browsers that do not map 'self' to the ws schemes (CSP level 2).
        format!(
            "default-src 'none'; script-src {}; style-src {}; connect-src 'self' ws: wss:; \
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
        // Checks that the CSP carries the hashes of exactly the page's inline script and style,
        // and that the page names no external resource (no src/href attributes, no url(), no
        // @import), so the strict policy costs the page nothing.
        let csp = content_security_policy();
        let script = inline_element(PAGE_HTML, "script").unwrap();
        assert!(script.contains("/v1/subscribe"));
        assert!(csp.contains(&hash_source(script)), "{csp}");
        assert!(csp.contains(&hash_source(inline_element(PAGE_HTML, "style").unwrap())));
        assert!(csp.starts_with("default-src 'none';"));
        assert!(!csp.contains("unsafe"), "{csp}");
        assert_eq!(PAGE_HTML.matches("<script").count(), 1);
        assert_eq!(PAGE_HTML.matches("<style").count(), 1);
        for banned in [" src=", " href=", "url(", "@import", "http://", "https://"] {
            assert!(!PAGE_HTML.contains(banned), "live.html contains {banned:?}");
        }
        // No header line may be smuggled in from the page: the head is fixed text.
        let head = content_type_and_headers();
        assert!(head.starts_with("text/html; charset=utf-8\r\n"));
        assert_eq!(head.matches("\r\n").count(), 4);
        assert!(!head.ends_with("\r\n"));
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
