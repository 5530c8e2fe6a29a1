//! The `/live` page on the real binary: it is served publicly with a strict Content-Security-Policy,
//! and, opened in headless Chromium with an ops token while simulated devices move, it draws them
//! and they visibly move (asserted on screenshots: pixels of the page's device-dot colour).
//!
//! Chromium is driven over the DevTools protocol (`--remote-debugging-port`, spoken here with
//! tungstenite) rather than with `chromium --screenshot --virtual-time-budget=..`: virtual time
//! runs ahead of the wall clock while the page only waits on a live WebSocket, so such a
//! screenshot is taken about two seconds after start whatever the budget, with only the first
//! few events drawn and no way to take a second one later in the same page. Over the protocol
//! the test waits (in real time) until the page reports what it drew, then takes two
//! screenshots 1.5 s apart.
//!
//! Needs Debian's `chromium` (`apt-get install chromium`; another binary via `GEOBEAT_CHROMIUM`).
//! Without it the browser test fails, unless `GEOBEAT_SKIP_CHROMIUM=1` is set.

mod common;
use common::*;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

/// Simulated devices (ids `live-0` ..).
const DEVICES: usize = 6;
/// The page's device-dot colour (`COLORS.dot` in live.html), used for nothing else on the page.
const DOT_RGB: [u8; 3] = [0xe4, 0x57, 0x2e];
/// Per-channel tolerance when matching the dot colour (antialiased edges do not match, which
/// is fine: a dot's interior does).
const DOT_TOLERANCE: u8 = 8;
/// Viewport of the screenshots.
const VIEWPORT: (u32, u32) = (1000, 700);

/// Servers of this file start one at a time (several geobeat processes starting at the same
/// instant on a busy 2-core machine have been seen to hang while joining their executors'
/// channel meshes, see tests/subscribe.rs; not what these tests are about).
static STARTING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn start(dir: &Path) -> Server {
    let _one = STARTING.lock().unwrap_or_else(|p| p.into_inner());
    Server::start(dir, &[])
}

/// The response head (status line and headers, lower-cased) and body of one plain request.
fn request(addr: std::net::SocketAddr, method: &str, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("complete response");
    (head.to_ascii_lowercase(), body.to_string())
}

#[test]
fn live_page_is_public_self_contained_and_locked_down() {
    // Checks the route: GET /live without any token answers the compiled-in page as HTML with
    // a CSP that forbids everything but the page's own inline code and same-origin
    // connections, other methods are 405, and the page asks for no external resource.
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let (head, body) = request(server.addr, "GET", "/live");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        head.contains("\r\ncontent-type: text/html; charset=utf-8\r\n"),
        "{head}"
    );
    let csp = head
        .lines()
        .find_map(|l| l.strip_prefix("content-security-policy: "))
        .expect("a content-security-policy header");
    for part in [
        "default-src 'none'",
        "script-src 'sha256-",
        "style-src 'sha256-",
        "connect-src 'self' ws: wss:",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(part), "{part} missing in {csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    assert!(
        head.contains("\r\nx-content-type-options: nosniff"),
        "{head}"
    );
    assert!(head.contains("\r\nreferrer-policy: no-referrer"), "{head}");
    assert_eq!(body, geobeat::net::http::live::PAGE_HTML);
    assert!(body.contains("/v1/subscribe?token="));
    let (head, _) = request(server.addr, "POST", "/live");
    assert!(head.starts_with("http/1.1 405"), "{head}");
    // Query strings (the token) do not change the route.
    let (head, _) = request(server.addr, "GET", "/live?token=x");
    assert!(head.starts_with("http/1.1 200"), "{head}");
}

/// Devices `live-0..DEVICES` on a ring of radius 0.05° around Berlin, turning at 0.5 rad/s, one
/// batch frame every 100 ms through a gateway connection, each frame acknowledged before the
/// next. Runs until `stop`.
fn run_devices(server_addr: std::net::SocketAddr, token: String, stop: Arc<AtomicBool>) {
    let url = format!("ws://{server_addr}/v1/ingest?token={token}");
    let (mut ws, _) = tungstenite::connect(url.as_str()).expect("device connection");
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    }
    let started = Instant::now();
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let t = started.elapsed().as_secs_f64();
        let ts = now_ms();
        let hbs: Vec<String> = (0..DEVICES)
            .map(|i| {
                let a = t * 0.5 + i as f64 * std::f64::consts::TAU / DEVICES as f64;
                seq += 1;
                format!(
                    r#"{{"seq":{seq},"id":"live-{i}","lat":{:.6},"lon":{:.6},"ts":{ts},"speed":7}}"#,
                    52.52 + 0.05 * a.sin(),
                    13.405 + 0.08 * a.cos()
                )
            })
            .collect();
        ws.send(Message::text(format!("[{}]", hbs.join(","))))
            .expect("send heartbeats");
        let errors = wait_ack(&mut ws, seq);
        assert!(errors.is_empty(), "heartbeats refused: {errors:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The Chromium binary to use.
fn chromium_bin() -> String {
    std::env::var("GEOBEAT_CHROMIUM").unwrap_or_else(|_| "chromium".into())
}

/// Whether the browser can be run at all.
fn chromium_present() -> bool {
    Command::new(chromium_bin())
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A headless Chromium with its own profile directory, closed (then killed) on drop.
struct Browser {
    child: Child,
    cdp: Cdp,
    log: PathBuf,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn launch() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let log = profile.path().join("chromium.log");
        let err = std::fs::File::create(&log).unwrap();
        let child = Command::new(chromium_bin())
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--hide-scrollbars",
                "--remote-debugging-port=0",
                &format!("--window-size={},{}", VIEWPORT.0, VIEWPORT.1),
                &format!("--user-data-dir={}", profile.path().display()),
                "about:blank",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromium_bin()));
        // Chromium writes the chosen port and the browser target's path here once it listens.
        let port_file = profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(30);
        let endpoint = loop {
            if let Ok(text) = std::fs::read_to_string(&port_file) {
                let mut lines = text.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                    break format!("ws://127.0.0.1:{port}{path}");
                }
            }
            assert!(
                Instant::now() < deadline,
                "chromium did not open its DevTools port:\n{}",
                log_tail(&log, 30)
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let cdp = Cdp::connect(&endpoint, &log);
        Browser {
            child,
            cdp,
            log,
            _profile: profile,
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Browser.close lets Chromium end its helper processes; the kill is the fallback.
        let _ = self.cdp.send("Browser.close", json!({}), None);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal Chrome DevTools protocol client: numbered calls, answers matched by id, events
/// skipped.
struct Cdp {
    ws: Ws,
    next_id: u64,
    log: PathBuf,
}

impl Cdp {
    fn connect(endpoint: &str, log: &Path) -> Cdp {
        let (ws, _) = tungstenite::connect(endpoint)
            .unwrap_or_else(|e| panic!("DevTools connection to {endpoint}: {e}"));
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        }
        Cdp {
            ws,
            next_id: 0,
            log: log.to_path_buf(),
        }
    }

    /// Sends one call; returns its id.
    fn send(&mut self, method: &str, params: Value, session: Option<&str>) -> Result<u64, String> {
        self.next_id += 1;
        let mut msg = json!({"id": self.next_id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.ws
            .send(Message::text(msg.to_string()))
            .map_err(|e| e.to_string())?;
        Ok(self.next_id)
    }

    /// One call and its result; panics on a protocol error.
    fn call(&mut self, method: &str, params: Value, session: Option<&str>) -> Value {
        let id = self
            .send(method, params, session)
            .unwrap_or_else(|e| panic!("DevTools {method}: {e}"));
        loop {
            let frame = self.ws.read().unwrap_or_else(|e| {
                panic!(
                    "DevTools {method}: {e}\nchromium log:\n{}",
                    log_tail(&self.log, 30)
                )
            });
            let Message::Text(text) = frame else { continue };
            let v: Value = serde_json::from_str(text.as_str()).expect("DevTools sends JSON");
            if v["id"].as_u64() != Some(id) {
                continue;
            }
            assert!(v.get("error").is_none(), "DevTools {method}: {v}");
            return v["result"].clone();
        }
    }
}

/// A page opened over the DevTools protocol.
struct Page<'a> {
    cdp: &'a mut Cdp,
    session: String,
}

impl<'a> Page<'a> {
    fn open(browser: &'a mut Browser, url: &str) -> Page<'a> {
        let cdp = &mut browser.cdp;
        let target = cdp.call("Target.createTarget", json!({"url": "about:blank"}), None);
        let target_id = target["targetId"].as_str().expect("targetId").to_string();
        let attached = cdp.call(
            "Target.attachToTarget",
            json!({"targetId": target_id, "flatten": true}),
            None,
        );
        let session = attached["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_string();
        cdp.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": VIEWPORT.0, "height": VIEWPORT.1, "deviceScaleFactor": 1, "mobile": false}),
            Some(&session),
        );
        let nav = cdp.call("Page.navigate", json!({"url": url}), Some(&session));
        assert!(nav.get("errorText").is_none(), "navigate {url}: {nav}");
        Page { cdp, session }
    }

    /// Evaluates a JavaScript expression and returns its value.
    fn eval(&mut self, expression: &str) -> Value {
        let r = self.cdp.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true}),
            Some(&self.session),
        );
        r["result"]["value"].clone()
    }

    /// The status line's state, as the page publishes it on `#status` (data-* attributes plus
    /// the text), or `Null` before the page's script has run.
    fn status(&mut self) -> Value {
        self.eval(
            "(() => { const s = document.getElementById('status'); \
             return s ? Object.assign({text: s.textContent}, s.dataset) : null; })()",
        )
    }

    /// Waits until `done(status)` holds; panics with the last status after `limit`.
    fn wait_status(&mut self, what: &str, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let st = self.status();
            if done(&st) {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "page did not reach `{what}` within {limit:?}; status {st}; messages: {}",
                self.eval("document.getElementById('messages').textContent")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A screenshot of the viewport as RGB rows.
    fn screenshot(&mut self, save_as: &str) -> Image {
        let shot = self.cdp.call(
            "Page.captureScreenshot",
            json!({"format": "png"}),
            Some(&self.session),
        );
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("screenshot is base64");
        // Kept for a human to look at when the test fails.
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(save_as);
        std::fs::write(&path, &bytes).unwrap();
        eprintln!("live_page: screenshot {}", path.display());
        Image::decode(&bytes)
    }
}

/// A decoded screenshot, 8-bit RGB.
struct Image {
    width: usize,
    height: usize,
    rgb: Vec<u8>,
}

impl Image {
    fn decode(png_bytes: &[u8]) -> Image {
        let mut decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
        decoder.set_transformations(png::Transformations::normalize_to_color8());
        let mut reader = decoder.read_info().expect("a PNG");
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).expect("PNG frame");
        let channels = info.color_type.samples();
        assert!(
            channels >= 3,
            "screenshot colour type {:?}",
            info.color_type
        );
        let rgb = buf[..info.buffer_size()]
            .chunks_exact(channels)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect();
        Image {
            width: info.width as usize,
            height: info.height as usize,
            rgb,
        }
    }

    /// Indexes of the pixels of the device-dot colour.
    fn dot_pixels(&self) -> std::collections::BTreeSet<usize> {
        self.rgb
            .chunks_exact(3)
            .enumerate()
            .filter(|(_, p)| (0..3).all(|c| p[c].abs_diff(DOT_RGB[c]) <= DOT_TOLERANCE))
            .map(|(i, _)| i)
            .collect()
    }
}

#[test]
fn live_page_draws_moving_devices_in_headless_chromium() {
    // Checks the page end to end: simulated devices move (through the real ingest path), the
    // page is opened in headless Chromium with an ops token, connects, subscribes to the whole
    // world by default and reports DEVICES devices; then two screenshots 1.5 s apart must each
    // show DEVICES dots of the page's dot colour, and the dots must have moved between them.
    // Finally the server is stopped and the page must report the close code (1001).
    if !chromium_present() {
        if std::env::var("GEOBEAT_SKIP_CHROMIUM").as_deref() == Ok("1") {
            eprintln!(
                "\n!!!!!!!!!! live_page: SKIPPED the headless-Chromium screenshot test: `{}` is \
                 not installed (GEOBEAT_SKIP_CHROMIUM=1) !!!!!!!!!!\n",
                chromium_bin()
            );
            return;
        }
        panic!(
            "live_page needs headless Chromium: install it with `apt-get update && apt-get install \
             -y chromium` (or point GEOBEAT_CHROMIUM at a binary); GEOBEAT_SKIP_CHROMIUM=1 skips \
             this test"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(dir.path());
    let ops = server.token(&["ops"]);
    let gateway = server.token(&["gateway", "live-"]);
    let stop = Arc::new(AtomicBool::new(false));
    let fleet = std::thread::spawn({
        let (addr, stop) = (server.addr, stop.clone());
        move || run_devices(addr, gateway, stop)
    });

    let mut browser = Browser::launch();
    let log = browser.log.clone();
    let url = format!("http://{}/live?token={ops}", server.addr);
    let mut page = Page::open(&mut browser, &url);
    let num = |st: &Value, k: &str| {
        st[k]
            .as_str()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let st = page.wait_status("connected and drawing", Duration::from_secs(30), |st| {
        st["state"] == "connected"
            && num(st, "drawn") >= DEVICES as u64
            && num(st, "events") >= 4 * DEVICES as u64
    });
    assert_eq!(num(&st, "devices"), DEVICES as u64, "{st}");
    assert_eq!(num(&st, "missed"), 0, "{st}");

    let a = page.screenshot("live_page_a.png");
    std::thread::sleep(Duration::from_millis(1500));
    let b = page.screenshot("live_page_b.png");
    assert_eq!(
        (a.width, a.height),
        (VIEWPORT.0 as usize, VIEWPORT.1 as usize)
    );
    let (da, db) = (a.dot_pixels(), b.dot_pixels());
    // A dot of radius 4 has about 50 pixels, about 35 of them exactly its colour.
    for (name, dots) in [("first", &da), ("second", &db)] {
        assert!(
            (DEVICES * 20..=DEVICES * 60).contains(&dots.len()),
            "{name} screenshot: {} dot pixels for {DEVICES} devices (chromium log:\n{})",
            dots.len(),
            log_tail(&log, 10)
        );
    }
    // The ring turns about 0.75 rad in 1.5 s: every dot travels far beyond its own size.
    let moved = db.difference(&da).count();
    assert!(
        moved >= DEVICES * 15,
        "only {moved} dot pixels are new in the second screenshot: devices did not move"
    );
    let st = page.status();
    assert!(num(&st, "events") > num(&st, "devices") * 10, "{st}");

    stop.store(true, Ordering::Relaxed);
    fleet.join().expect("device thread");
    server.sigterm();
    // The page then retries (and fails) every few seconds; the message list keeps each close.
    page.wait_status("closed", Duration::from_secs(10), |st| {
        st["state"] == "closed"
    });
    let messages = page.eval("document.getElementById('messages').textContent");
    assert!(
        messages
            .as_str()
            .unwrap_or("")
            .contains("connection closed: code 1001"),
        "the page reports the server going away (1001): {messages}"
    );
}
