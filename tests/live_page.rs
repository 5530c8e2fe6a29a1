//! The operator console (`/console`, also served at `/live`) on the real binary: it is served
//! publicly with a strict Content-Security-Policy; opened in headless Chromium with an ops token
//! while simulated devices move, it draws them and they visibly move (asserted on screenshots:
//! pixels of the page's device-dot colour); and an operator's session is scripted end to end
//! (token pasted, basemap, device list and search, details and track, a geofence drawn, saved,
//! entered and edited, health figures, no console errors, no request off the origin).
//!
//! Chromium is driven over the DevTools protocol (`--remote-debugging-port`, spoken here with
//! tungstenite) rather than with `chromium --screenshot --virtual-time-budget=..`: virtual time
//! runs ahead of the wall clock while the page only waits on a live WebSocket, so such a
//! screenshot is taken about two seconds after start whatever the budget, with only the first
//! few events drawn and no way to take a second one later in the same page. Over the protocol
//! the tests wait (in real time) until the page reports what it did, click and type with
//! `Input.*` events as a user would, and take screenshots when there is something to see.
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

/// The browser tests run one at a time: two Chromiums on a busy 2-core machine slow each other
/// down several times over (seen: 12 s alone, 70 s side by side), for no added coverage.
static BROWSING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_browser_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    BROWSING.lock().unwrap_or_else(|p| p.into_inner())
}

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
        "connect-src 'self';",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(part), "{part} missing in {csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    // Only this origin: no scheme or host sources (the WebSocket is covered by 'self').
    assert!(
        !csp.contains(" ws:") && !csp.contains(" wss:") && !csp.contains("://"),
        "{csp}"
    );
    assert!(
        head.contains("\r\nx-content-type-options: nosniff"),
        "{head}"
    );
    assert!(head.contains("\r\nreferrer-policy: no-referrer"), "{head}");
    assert_eq!(body, geobeat::net::http::live::page_html());
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
/// kept (the console test reads the page's network and console events from them).
struct Cdp {
    ws: Ws,
    next_id: u64,
    log: PathBuf,
    /// Every event received while waiting for answers, in order (at most [`CDP_EVENTS_MAX`]).
    events: Vec<Value>,
}

/// Events a [`Cdp`] keeps (a test's worth; beyond it they are dropped and the test fails).
const CDP_EVENTS_MAX: usize = 100_000;

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
            events: Vec::new(),
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
            if v.get("method").is_some() {
                assert!(
                    self.events.len() < CDP_EVENTS_MAX,
                    "too many DevTools events"
                );
                self.events.push(v);
                continue;
            }
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
        // Network, console and log events from the first request on (the console test checks
        // them; the live test ignores them).
        for domain in ["Network.enable", "Runtime.enable", "Log.enable"] {
            cdp.call(domain, json!({}), Some(&session));
        }
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

impl Page<'_> {
    /// Waits until the JavaScript expression `expr` gives a truthy value and returns it; panics
    /// with the page's messages after `limit`.
    fn wait_js(&mut self, what: &str, limit: Duration, expr: &str) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let v = self.eval(expr);
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "page did not reach `{what}` within {limit:?} ({expr} = {v}); status {}; messages: {}",
                self.status(),
                self.eval("document.getElementById('messages').textContent")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// One mouse event at (x, y) in viewport CSS pixels (`kind`: mouseMoved, mousePressed,
    /// mouseReleased), with the left button held for presses, releases and drags.
    fn mouse(&mut self, kind: &str, x: f64, y: f64, held: bool) {
        let mut p = json!({"type": kind, "x": x, "y": y});
        if kind != "mouseMoved" {
            p["button"] = json!("left");
            p["clickCount"] = json!(1);
        } else if held {
            p["button"] = json!("left");
            p["buttons"] = json!(1);
        }
        self.cdp
            .call("Input.dispatchMouseEvent", p, Some(&self.session));
    }

    /// A left click at (x, y), as a user's: move there, press, release.
    fn click_at(&mut self, x: f64, y: f64) {
        self.mouse("mouseMoved", x, y, false);
        self.mouse("mousePressed", x, y, false);
        self.mouse("mouseReleased", x, y, false);
    }

    /// A drag with the left button from `a` to `b` in `steps` moves.
    fn drag(&mut self, a: (f64, f64), b: (f64, f64), steps: u32) {
        self.mouse("mouseMoved", a.0, a.1, false);
        self.mouse("mousePressed", a.0, a.1, false);
        for k in 1..=steps {
            let f = f64::from(k) / f64::from(steps);
            self.mouse(
                "mouseMoved",
                a.0 + (b.0 - a.0) * f,
                a.1 + (b.1 - a.1) * f,
                true,
            );
        }
        self.mouse("mouseReleased", b.0, b.1, false);
    }

    /// The centre of the first element matching `selector`, scrolled into view first; panics
    /// if there is none or it has no size (hidden).
    fn centre_of(&mut self, selector: &str) -> (f64, f64) {
        let sel = serde_json::to_string(selector).unwrap();
        let v = self.eval(&format!(
            "(() => {{ const e = document.querySelector({sel}); if (!e) return null; \
             e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); \
             return r.width > 0 && r.height > 0 ? [r.left + r.width / 2, r.top + r.height / 2] : null; }})()"
        ));
        let xy = v
            .as_array()
            .unwrap_or_else(|| panic!("no visible element {selector}: {v}"));
        (xy[0].as_f64().unwrap(), xy[1].as_f64().unwrap())
    }

    /// Clicks the element matching `selector` at its centre.
    fn click_on(&mut self, selector: &str) {
        let (x, y) = self.centre_of(selector);
        self.click_at(x, y);
    }

    /// Types `text` into the focused element (as an input method would: `input` events fire).
    fn type_text(&mut self, text: &str) {
        self.cdp.call(
            "Input.insertText",
            json!({"text": text}),
            Some(&self.session),
        );
    }

    /// Where the page's map shows (lat, lon), from the view the page publishes on the canvas
    /// (`data-view`: centre latitude, centre longitude, pixels per degree of latitude) and the
    /// page's projection (equirectangular, x scaled by the cosine of the centre latitude).
    fn map_point(&mut self, lat: f64, lon: f64) -> (f64, f64) {
        let v = self.eval(
            "(() => { const c = document.getElementById('map'); const r = c.getBoundingClientRect(); \
             return [c.dataset.view, r.left, r.top, c.clientWidth, c.clientHeight]; })()",
        );
        let view: Vec<f64> = v[0]
            .as_str()
            .expect("the map publishes its view")
            .split(',')
            .map(|x| x.parse().unwrap())
            .collect();
        let n = |i: usize| v[i].as_f64().unwrap();
        let (lat0, lon0, ppd) = (view[0], view[1], view[2]);
        let kx = lat0.to_radians().cos().max(0.05);
        (
            n(1) + n(3) / 2.0 + (lon - lon0) * kx * ppd,
            n(2) + n(4) / 2.0 - (lat - lat0) * ppd,
        )
    }

    /// This page's DevTools events received so far.
    fn events(&self) -> Vec<Value> {
        self.cdp
            .events
            .iter()
            .filter(|e| e["sessionId"].as_str() == Some(self.session.as_str()))
            .cloned()
            .collect()
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

    /// Pixels of colour `rgb` (each channel within `tolerance`) inside the box
    /// `x0..x1, y0..y1` (viewport pixels).
    fn count(
        &self,
        rgb: [u8; 3],
        tolerance: u8,
        (x0, y0, x1, y1): (usize, usize, usize, usize),
    ) -> usize {
        let mut n = 0;
        for y in y0..y1.min(self.height) {
            for x in x0..x1.min(self.width) {
                let p = &self.rgb[(y * self.width + x) * 3..][..3];
                if (0..3).all(|c| p[c].abs_diff(rgb[c]) <= tolerance) {
                    n += 1;
                }
            }
        }
        n
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
    let _one = one_browser_at_a_time();
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

/// The console's basemap land colour (`COLORS.land` in console.html).
const LAND_RGB: [u8; 3] = [0xef, 0xec, 0xe3];
/// The console's water colour (`COLORS.water`).
const WATER_RGB: [u8; 3] = [0xd4, 0xe4, 0xee];
/// The selected device's track colour (`COLORS.track`), used for nothing else.
const TRACK_RGB: [u8; 3] = [0x93, 0x33, 0xea];
/// A geofence's fill (`COLORS.fenceFill`, the outline colour at 10 % opacity) over land:
/// 0.1 × (15, 118, 110) + 0.9 × LAND_RGB.
const FENCE_FILL_ON_LAND_RGB: [u8; 3] = [217, 224, 215];

/// Fails the test unless Chromium is there (or GEOBEAT_SKIP_CHROMIUM=1 says to skip: `false`).
fn need_chromium(test: &str) -> bool {
    if chromium_present() {
        return true;
    }
    if std::env::var("GEOBEAT_SKIP_CHROMIUM").as_deref() == Ok("1") {
        eprintln!(
            "\n!!!!!!!!!! live_page: SKIPPED {test}: `{}` is not installed \
             (GEOBEAT_SKIP_CHROMIUM=1) !!!!!!!!!!\n",
            chromium_bin()
        );
        return false;
    }
    panic!(
        "{test} needs headless Chromium: install it with `apt-get update && apt-get install -y \
         chromium` (or point GEOBEAT_CHROMIUM at a binary); GEOBEAT_SKIP_CHROMIUM=1 skips it"
    );
}

/// The fence the console test draws: a box over the east side of the devices' ring, inside the
/// map when it is fitted to the ring (the ring's points within about ±0.4 rad of east lie
/// inside; the ring turns 0.5 rad/s, so with six devices one enters about every two seconds).
const FENCE_BOX: [(f64, f64); 4] = [
    (52.50, 13.445),
    (52.50, 13.495),
    (52.54, 13.495),
    (52.54, 13.445),
];

/// The corners (lat, lon) of the stored fence `name`'s exterior ring, without the closing one.
fn stored_corners(server: &Server, ops: &str, name: &str) -> Vec<(f64, f64)> {
    let (st, body) = server.get(&format!("/v1/geofences/{name}"), Some(ops));
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let ring = v["shape"]["coordinates"][0]
        .as_array()
        .expect("a polygon")
        .clone();
    assert_eq!(ring.first(), ring.last(), "closed ring: {body}");
    ring[..ring.len() - 1]
        .iter()
        .map(|p| (p[1].as_f64().unwrap(), p[0].as_f64().unwrap()))
        .collect()
}

/// Whether `corners` holds a position within `tolerance` degrees of `(lat, lon)`.
fn has_corner(corners: &[(f64, f64)], (lat, lon): (f64, f64), tolerance: f64) -> bool {
    corners
        .iter()
        .any(|c| (c.0 - lat).abs() <= tolerance && (c.1 - lon).abs() <= tolerance)
}

#[test]
fn console_page_is_served_at_console_and_live() {
    // Checks that /console answers the same page and security headers as /live (the older
    // address), publicly, and that other methods are refused.
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let (live_head, live_body) = request(server.addr, "GET", "/live");
    let (head, body) = request(server.addr, "GET", "/console");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body, live_body);
    let csp = |h: &str| {
        h.lines()
            .find(|l| l.starts_with("content-security-policy: "))
            .map(str::to_string)
    };
    assert!(csp(&head).is_some());
    assert_eq!(csp(&head), csp(&live_head));
    assert!(body.contains("basemap: Natural Earth"));
    let (head, _) = request(server.addr, "DELETE", "/console");
    assert!(head.starts_with("http/1.1 405"), "{head}");
}

#[test]
fn console_end_to_end_in_headless_chromium() {
    // Checks the operator console as an operator uses it, in a real headless Chromium driven
    // over the DevTools protocol against the real server with devices moving: the token is
    // pasted (and kept in sessionStorage); the device list shows the fleet and the search
    // narrows it; "World" shows the basemap (screenshot: land and water colours, land on both
    // halves of the map); clicking a device shows its details and draws its track from the
    // history API (screenshot: track colour); a polygon drawn by clicks on the map and saved is
    // stored (GET /v1/geofences/{name} has the clicked corners) and drawn, a device entering it
    // shows up in the fence events, dragging one of its corners in edit mode and saving moves
    // the stored corner, and deleting it (two clicks) removes it; the health panel shows a
    // positive heartbeat rate. Throughout,
    // the page logs no error or warning, throws nothing, and requests nothing but this origin;
    // a reload finds the token again.
    if !need_chromium("the console test") {
        return;
    }
    let _one = one_browser_at_a_time();
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let ops = server.token(&["ops"]);
    let gateway = server.token(&["gateway", "live-"]);
    let stop = Arc::new(AtomicBool::new(false));
    let fleet = std::thread::spawn({
        let (addr, stop) = (server.addr, stop.clone());
        move || run_devices(addr, gateway, stop)
    });
    let origin = format!("http://{}/", server.addr);
    let ws_origin = format!("ws://{}/", server.addr);

    let mut browser = Browser::launch();
    let mut page = Page::open(&mut browser, &format!("{origin}console"));
    let secs = Duration::from_secs;

    // 1. No token yet: the page says so. Paste one.
    page.wait_status("no-token", secs(10), |st| st["state"] == "no-token");
    page.click_on("#token");
    page.type_text(&ops);
    page.click_on("#tokenform button[type=submit]");
    page.wait_status("connected", secs(20), |st| {
        st["state"] == "connected" && st["devices"] == json!(DEVICES.to_string())
    });
    assert_eq!(
        page.eval("sessionStorage.getItem('geobeat.token')"),
        json!(ops)
    );
    assert_eq!(
        page.eval("document.getElementById('token').value"),
        json!("")
    );

    // 2. The device list shows every device with its last-seen age; the search narrows it.
    let rows = "document.querySelectorAll('#devlist li[data-id]').length";
    page.wait_js(
        "the device list",
        secs(10),
        &format!("{rows} === {DEVICES}"),
    );
    let ages = page.eval(
        "[...document.querySelectorAll('#devlist li[data-id] .age')].map((a) => a.textContent)",
    );
    for age in ages.as_array().unwrap() {
        assert!(age.as_str().unwrap().ends_with(" s"), "last-seen age {age}");
    }
    page.click_on("#search");
    page.type_text("live-3");
    page.wait_js("the search", secs(5), &format!("{rows} === 1"));
    assert_eq!(
        page.eval("document.querySelector('#devlist li[data-id]').dataset.id"),
        json!("live-3")
    );

    // 3. The basemap: the whole world, land and water.
    page.click_on("#world");
    std::thread::sleep(Duration::from_millis(300));
    let shot = page.screenshot("console_world.png");
    let map = page.eval(
        "(() => { const r = document.getElementById('map').getBoundingClientRect(); \
         return [r.left, r.top, r.right, r.bottom].map(Math.round); })()",
    );
    let m: Vec<usize> = map
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let (area, mid) = ((m[2] - m[0]) * (m[3] - m[1]), (m[0] + m[2]) / 2);
    let land = shot.count(LAND_RGB, 3, (m[0], m[1], m[2], m[3]));
    let water = shot.count(WATER_RGB, 3, (m[0], m[1], m[2], m[3]));
    // Land is about a third of the world's box in this projection, water the rest plus the
    // margins above and below it.
    assert!(land * 100 >= area * 5, "land {land} of {area} pixels");
    assert!(water * 100 >= area * 30, "water {water} of {area} pixels");
    // Open sea where a ring crossing the antimeridian, drawn naively, would lay a sliver of
    // land across the map (Russia's at about 66°N, Fiji's at about 17°S).
    for (lat, lon) in [(67.0, -5.0), (-17.0, -125.0)] {
        let (x, y) = page.map_point(lat, lon);
        let px = shot.count(
            WATER_RGB,
            3,
            (
                x as usize - 2,
                y as usize - 2,
                x as usize + 3,
                y as usize + 3,
            ),
        );
        assert_eq!(px, 25, "not open sea at {lat}, {lon} ({x}, {y})");
    }
    let west = shot.count(LAND_RGB, 3, (m[0], m[1], mid, m[3]));
    assert!(
        west * 4 >= land / 2 && west < land,
        "land west {west} of {land}: the Americas and Eurasia both drawn"
    );

    // 4. A device's details and track.
    page.click_on("#devlist li[data-id='live-3']");
    page.wait_js(
        "the device's details",
        secs(10),
        "document.getElementById('details').dataset.state === 'ready'",
    );
    let details = page.eval("document.getElementById('details').textContent");
    let details = details.as_str().unwrap();
    assert!(
        details.contains("live-3") && details.contains("25.2 km/h"),
        "{details}"
    );
    let track = page.eval("Number(document.getElementById('details').dataset.track)");
    assert!(track.as_u64().unwrap() >= 10, "track of {track} positions");
    std::thread::sleep(Duration::from_millis(300));
    let shot = page.screenshot("console_track.png");
    // The 3 px line is antialiased: its pixels are shades of the track colour (nothing else on
    // the page is purple).
    let track_px = shot.count(TRACK_RGB, 40, (m[0], m[1], m[2], m[3]));
    assert!(track_px >= 300, "{track_px} track pixels");
    page.click_on("#replay");
    assert_eq!(
        page.eval("document.getElementById('replaypos').value"),
        json!("0")
    );
    page.wait_js(
        "the replay under way",
        secs(5),
        "(v => v > 0 && v < 1000)(Number(document.getElementById('replaypos').value)) \
         && document.getElementById('replaytime').textContent !== ''",
    );

    // 5. Draw a geofence with clicks on the map and save it.
    page.click_on("#fit");
    std::thread::sleep(Duration::from_millis(1500));
    page.click_on("#drawfence");
    let corners: Vec<(f64, f64)> = FENCE_BOX
        .iter()
        .map(|&(lat, lon)| page.map_point(lat, lon))
        .collect();
    for &(x, y) in &corners {
        page.click_at(x, y);
    }
    page.click_at(corners[0].0, corners[0].1); // on the first corner: closes the polygon
    page.wait_js(
        "a closed polygon",
        secs(5),
        "!document.getElementById('savefence').disabled",
    );
    page.click_on("#fencename");
    page.type_text("yard-1");
    page.click_on("#savefence");
    page.wait_js(
        "the fence listed and watched",
        secs(10),
        "document.querySelector('#fencelist li[data-name=\"yard-1\"]') !== null \
         && Number(document.getElementById('fences').dataset.watching) >= 1",
    );
    let (st, list) = server.get("/v1/geofences", Some(&ops));
    assert_eq!(
        (st, list.as_str()),
        (200, r#"{"fences":[{"name":"yard-1"}]}"#)
    );
    let stored = stored_corners(&server, &ops, "yard-1");
    assert_eq!(stored.len(), 4, "{stored:?}");
    for c in FENCE_BOX {
        assert!(
            has_corner(&stored, c, 0.001),
            "corner {c:?} not in {stored:?}"
        );
    }
    page.wait_js(
        "a fence event",
        secs(20),
        "document.querySelector('#fences li[data-fence=\"yard-1\"][data-event=\"enter\"]') !== null",
    );
    let event =
        page.eval("document.querySelector('#fences li[data-fence=\"yard-1\"]').textContent");
    assert!(event.as_str().unwrap().contains("live-"), "{event}");
    let shot = page.screenshot("console_fence.png");
    // Inside the fence, the land under its translucent fill: most of its pixels (devices,
    // trails, the track and the grid cross parts of it).
    let (x0, y1) = page.map_point(FENCE_BOX[0].0, FENCE_BOX[0].1);
    let (x1, y0) = page.map_point(FENCE_BOX[2].0, FENCE_BOX[2].1);
    let inner = (
        x0 as usize + 3,
        y0 as usize + 3,
        x1 as usize - 3,
        y1 as usize - 3,
    );
    let inner_area = (inner.2 - inner.0) * (inner.3 - inner.1);
    let filled = shot.count(FENCE_FILL_ON_LAND_RGB, 3, inner);
    assert!(
        filled * 10 >= inner_area * 6,
        "{filled} of {inner_area} pixels inside the fence filled"
    );

    // 6. Edit it: drag its north-east corner and save.
    page.click_on("#fencelist li[data-name='yard-1'] button[data-action='edit']");
    std::thread::sleep(Duration::from_millis(300));
    // Inward (the view is fitted to the fence: outside it the drag would leave the map).
    let moved_to = (52.533, 13.485);
    let from = page.map_point(FENCE_BOX[2].0, FENCE_BOX[2].1);
    let to = page.map_point(moved_to.0, moved_to.1);
    page.drag(from, to, 8);
    page.click_on("#savefence");
    page.wait_js(
        "the edit saved",
        secs(10),
        "document.getElementById('savefence').disabled \
         && document.getElementById('messages').textContent.includes('replaced geofence yard-1')",
    );
    let stored = stored_corners(&server, &ops, "yard-1");
    assert!(
        has_corner(&stored, moved_to, 0.002),
        "{moved_to:?} not in {stored:?}"
    );
    assert!(!has_corner(&stored, FENCE_BOX[2], 0.002), "{stored:?}");

    // 7. Delete it: two clicks on its delete button (the first only arms it).
    let delete = "#fencelist li[data-name='yard-1'] button[data-action$='delete']";
    page.click_on(delete);
    assert_eq!(
        server.get("/v1/geofences/yard-1", Some(&ops)).0,
        200,
        "one click deletes nothing"
    );
    page.click_on(delete);
    page.wait_js(
        "the fence gone from the list",
        secs(10),
        "document.querySelector('#fencelist li[data-name=\"yard-1\"]') === null",
    );
    assert_eq!(server.get("/v1/geofences/yard-1", Some(&ops)).0, 404);

    // 8. Health numbers.
    page.wait_js(
        "health figures",
        secs(10),
        "Number(document.getElementById('health').dataset.samples) >= 2 \
         && Number(document.getElementById('health').dataset.rate) > 0",
    );
    let rate = page.eval("parseFloat(document.getElementById('h-rate').textContent)");
    assert!(rate.as_f64().unwrap() > 0.0, "{rate}");
    let ack = page.eval("document.getElementById('h-ack').textContent");
    assert!(ack.as_str().unwrap().contains(" ms"), "{ack}");

    // 9. The token outlives a reload of the tab (sessionStorage), not pasted again. (The mark
    // tells the old document from the new one.)
    page.eval("window.beforeReload = true");
    let nav = page.cdp.call(
        "Page.navigate",
        json!({"url": format!("{origin}console")}),
        Some(&page.session),
    );
    assert!(nav.get("errorText").is_none(), "{nav}");
    page.wait_js(
        "connected after a reload",
        secs(20),
        &format!(
            "window.beforeReload === undefined && (s => s !== null && s.dataset.state === \
             'connected' && s.dataset.devices === '{DEVICES}')(document.getElementById('status'))"
        ),
    );

    // 10. Nothing went wrong, and nothing left this origin.
    let events = page.events();
    let mut requests = 0;
    for e in &events {
        let p = &e["params"];
        match e["method"].as_str().unwrap_or("") {
            "Runtime.exceptionThrown" => panic!("the page threw: {e}"),
            "Runtime.consoleAPICalled" => {
                let kind = p["type"].as_str().unwrap_or("");
                assert!(
                    !["error", "warning", "assert"].contains(&kind),
                    "console {kind}: {e}"
                );
            }
            "Log.entryAdded" => {
                let level = p["entry"]["level"].as_str().unwrap_or("");
                assert!(!["error", "warning"].contains(&level), "log {level}: {e}");
            }
            "Network.requestWillBeSent" => {
                let url = p["request"]["url"].as_str().unwrap_or("");
                assert!(url.starts_with(&origin), "a request off this origin: {url}");
                requests += 1;
            }
            "Network.webSocketCreated" => {
                let url = p["url"].as_str().unwrap_or("");
                assert!(
                    url.starts_with(&ws_origin),
                    "a socket off this origin: {url}"
                );
            }
            _ => {}
        }
    }
    let saw = |path: &str| {
        events.iter().any(|e| {
            e["method"] == "Network.requestWillBeSent"
                && e["params"]["request"]["url"]
                    .as_str()
                    .is_some_and(|u| u.starts_with(&format!("{origin}{path}")))
        })
    };
    for path in [
        "v1/devices/live-3/history",
        "v1/stats",
        "v1/geofences/yard-1",
    ] {
        assert!(saw(path), "no request to /{path} among {requests}");
    }
    assert!(
        events
            .iter()
            .any(|e| e["method"] == "Network.webSocketCreated"),
        "no subscription socket"
    );

    stop.store(true, Ordering::Relaxed);
    fleet.join().expect("device thread");
    eprintln!("console test took {:?}", started.elapsed());
}
