//! Starting geobeat anywhere a user runs it (issue 13 §3, §4, §7a; issue 20 §3, §6), against the
//! real binary: `geobeat token` never creates a secret and says where it looked; a token from
//! another secret gets a 401 that says so (logged at info, rate-limited, never the token);
//! io_uring blocked by seccomp and a low locked-memory limit are one clear line and a non-zero
//! exit, not a panic; a port in use is named and leaves the data directory untouched; the start
//! line says what is listened on; logs carry no colours off a terminal and come as JSON lines on
//! request; a restart right after kill -9 with hundreds of connected devices binds at once; data
//! files are 0600, directories 0700, and looser modes are refused at start; `accept` failures
//! under EMFILE are rate-limited.

mod common;

use std::io::Write as _;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::*;
use geobeat::auth::Scope;

/// Runs `cmd` (stdout and stderr to `log`) until it exits, at most 30 s (then kills it and
/// returns `None`); returns the status and the log text.
fn run_to_exit(mut cmd: Command, log: &Path) -> (Option<ExitStatus>, String) {
    let file = std::fs::File::create(log).unwrap();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("spawn geobeat");
    let status = wait_exit(child, Duration::from_secs(30));
    (status, std::fs::read_to_string(log).unwrap_or_default())
}

/// `geobeat serve` on `addr` with data directory `data`.
fn serve_cmd(addr: std::net::SocketAddr, data: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args([
        "serve",
        "--init",
        "--listen",
        &addr.to_string(),
        "--data-dir",
    ])
    .arg(data)
    .args(["--shards", "2"])
    .args(extra)
    .env(MQTT_OFF.0, MQTT_OFF.1)
    .env("RUST_LOG", "geobeat=info");
    cmd
}

/// Asserts a start-up refusal: non-zero exit, the needles in the output, no panic, and the data
/// directory not created.
fn assert_refused(status: Option<ExitStatus>, out: &str, needles: &[&str], data: &Path) {
    assert!(
        status.is_some_and(|s| !s.success()),
        "must exit non-zero: {status:?}\n{out}"
    );
    for n in needles {
        assert!(out.contains(n), "{n:?} missing from:\n{out}");
    }
    assert!(
        !out.contains("panicked") && !out.contains("backtrace"),
        "no panic:\n{out}"
    );
    assert!(!data.exists(), "nothing created in {}", data.display());
}

#[test]
fn token_elsewhere_creates_nothing_and_names_every_place_it_looked() {
    // `cd /somewhere/else && geobeat token ops`: exit 2, no ./shards, and the message names the
    // default secret path and every way to point at the right secret.
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .args(["token", "ops"])
        .current_dir(tmp.path())
        .env_remove("GEOBEAT_SECRET")
        .env_remove("GEOBEAT_SECRET_FILE")
        .env_remove("GEOBEAT_DATA_DIR")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(out.stdout.is_empty(), "no token printed");
    assert!(
        !tmp.path().join("shards").exists(),
        "token created ./shards"
    );
    for n in [
        "shards/secret",
        "--data-dir",
        "--secret-file",
        "GEOBEAT_SECRET",
        "GEOBEAT_SECRET_FILE",
    ] {
        assert!(err.contains(n), "{n:?} missing from: {err}");
    }
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

#[test]
fn foreign_token_401_says_whose_secret_and_is_logged_without_the_token() {
    // A token signed by another secret: the 401 JSON keeps `error` and says the token was not
    // signed by this server's secret, on HTTP and on the ingest upgrade. The refusal is logged
    // at info, at most one line per executor per interval, never with the token.
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("server.log");
    let server = Server::start_logged(&tmp.path().join("data"), &[], &log);
    let foreign = geobeat::auth::mint(
        &geobeat::auth::Secret::from_bytes([7; 32]),
        &Scope::Ops,
        (now_ms() / 1000) as u64 + 3600,
    );
    for _ in 0..50 {
        let (status, body) = server.get("/v1/stats", Some(&foreign));
        assert_eq!(status, 401, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let msg = v["error"].as_str().expect("error field kept");
        assert!(msg.contains("not signed by this server's secret"), "{msg}");
    }
    let device = geobeat::auth::mint(
        &geobeat::auth::Secret::from_bytes([7; 32]),
        &Scope::Device("d1".into()),
        (now_ms() / 1000) as u64 + 3600,
    );
    match ws_connect(&server, &device) {
        Err(tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 401);
            let body = String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default());
            assert!(
                body.contains("not signed by this server's secret"),
                "{body}"
            );
        }
        other => panic!("expected a 401, got {other:?}"),
    }
    std::thread::sleep(Duration::from_millis(200));
    let text = std::fs::read_to_string(&log).unwrap();
    let lines = text
        .lines()
        .filter(|l| l.contains("request refused"))
        .count();
    assert!(
        (1..=2).contains(&lines),
        "one line per executor per interval, got {lines}:\n{text}"
    );
    assert!(text.contains(" INFO ") && text.contains("request refused"));
    assert!(
        !text.contains(&foreign) && !text.contains(&device),
        "token in log"
    );
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[test]
fn io_uring_blocked_by_seccomp_is_one_clear_line() {
    // What Docker >= 25 does by default: a seccomp filter makes io_uring_setup fail with EPERM.
    // geobeat exits non-zero with one line naming the block and the seccomp fix, no panic, and
    // creates nothing.
    #[cfg(target_arch = "x86_64")]
    const AUDIT_ARCH: u32 = 0xC000_003E;
    #[cfg(target_arch = "aarch64")]
    const AUDIT_ARCH: u32 = 0xC000_00B7;
    const IO_URING_SETUP: u32 = 425;
    fn stmt(code: u16, k: u32) -> libc::sock_filter {
        libc::sock_filter {
            code,
            jt: 0,
            jf: 0,
            k,
        }
    }
    fn jeq(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
        libc::sock_filter {
            code: 0x15, // BPF_JMP | BPF_JEQ | BPF_K
            jt,
            jf,
            k,
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut cmd = serve_cmd(free_addr(), &data, &[]);
    // SAFETY: the closure runs in the forked child before exec and only makes two syscalls on
    // data it owns (async-signal-safe).
    unsafe {
        cmd.pre_exec(|| {
            let filter = [
                stmt(0x20, 4), // BPF_LD | BPF_W | BPF_ABS: seccomp_data.arch
                jeq(AUDIT_ARCH, 1, 0),
                stmt(0x06, libc::SECCOMP_RET_ALLOW), // BPF_RET: another arch
                stmt(0x20, 0),                       // seccomp_data.nr
                jeq(IO_URING_SETUP, 0, 1),
                stmt(0x06, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
                stmt(0x06, libc::SECCOMP_RET_ALLOW),
            ];
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr() as *mut libc::sock_filter,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                &prog as *const libc::sock_fprog,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (status, out) = run_to_exit(cmd, &tmp.path().join("out.log"));
    assert_refused(
        status,
        &out,
        &[
            "io_uring is blocked",
            "seccomp=unconfined",
            "io_uring_setup",
        ],
        &data,
    );
    assert_eq!(out.trim().lines().count(), 1, "one line:\n{out}");
}

#[test]
fn locked_memory_limit_too_low_is_one_clear_line() {
    // RLIMIT_MEMLOCK of 64 KiB (soft and hard, as `prlimit --memlock=65536` or a container
    // without --ulimit): one line with the limit, the need and the fixes; no MemLockLimit, no
    // panic, nothing created.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut cmd = serve_cmd(free_addr(), &data, &[]);
    // SAFETY: setrlimit in the forked child before exec, on a struct it owns.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 65_536,
                rlim_max: 65_536,
            };
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (status, out) = run_to_exit(cmd, &tmp.path().join("out.log"));
    let need = geobeat::limits::MEMLOCK_BYTES_MIN.to_string();
    assert_refused(
        status,
        &out,
        &[
            "RLIMIT_MEMLOCK",
            "65536",
            &need,
            "--ulimit memlock=",
            "LimitMEMLOCK=",
        ],
        &data,
    );
    assert!(!out.contains("MemLockLimit("), "{out}");
    assert_eq!(out.trim().lines().count(), 1, "one line:\n{out}");
}

#[test]
fn port_in_use_is_named_and_nothing_is_created() {
    // Another program on the address, then another geobeat on it (SO_REUSEPORT alone would let
    // the second one share the port): each refusal names the address and creates no data
    // directory.
    let tmp = tempfile::tempdir().unwrap();
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = other.local_addr().unwrap();
    let data = tmp.path().join("data");
    let (status, out) = run_to_exit(serve_cmd(addr, &data, &[]), &tmp.path().join("a.log"));
    assert_refused(status, &out, &[&addr.to_string()], &data);
    drop(other);

    let log = tmp.path().join("first.log");
    let first = Server::start_logged(&tmp.path().join("first"), &[], &log);
    let (status, out) = run_to_exit(serve_cmd(first.addr, &data, &[]), &tmp.path().join("b.log"));
    assert_refused(status, &out, &[&first.addr.to_string(), "in use"], &data);
    // The metrics address is checked the same way, before anything is created.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let m = busy.local_addr().unwrap().to_string();
    let (status, out) = run_to_exit(
        serve_cmd(free_addr(), &data, &["--metrics-listen", &m]),
        &tmp.path().join("c.log"),
    );
    assert_refused(status, &out, &[&m], &data);
}

#[test]
fn start_line_plain_text_off_a_terminal_and_json_lines() {
    // stderr to a file, NO_COLOR unset: no ANSI escape in the log, and one info line names the
    // listen address, the metrics address and the data directory. With --log-format json
    // (or GEOBEAT_LOG_FORMAT=json) every line is one JSON object and the start line carries
    // the same as fields.
    let tmp = tempfile::tempdir().unwrap();
    for (round, json) in [(0, false), (1, true)] {
        let data = tmp.path().join(format!("data-{round}"));
        let addr = free_addr();
        let metrics = free_addr();
        let m = metrics.to_string();
        let mut cmd = serve_cmd(addr, &data, &["--metrics-listen", &m]);
        cmd.env_remove("NO_COLOR");
        if json {
            cmd.env("GEOBEAT_LOG_FORMAT", "json");
        }
        let log = tmp.path().join(format!("log-{round}"));
        let file = std::fs::File::create(&log).unwrap();
        let mut child = cmd
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let text = loop {
            let text = std::fs::read_to_string(&log).unwrap();
            if text.contains("listening") {
                break text;
            }
            assert!(child.try_wait().unwrap().is_none(), "exited:\n{text}");
            assert!(Instant::now() < deadline, "no start line:\n{text}");
            std::thread::sleep(Duration::from_millis(20));
        };
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            !text.contains('\u{1b}'),
            "ANSI escape in a log file:\n{text}"
        );
        let line = text.lines().find(|l| l.contains("listening")).unwrap();
        for n in [addr.to_string(), m.clone(), data.display().to_string()] {
            assert!(line.contains(&n), "{n} missing from {line}");
        }
        if json {
            for l in text.lines() {
                let v: serde_json::Value =
                    serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
                assert!(v["timestamp"].is_string() && v["level"].is_string(), "{l}");
                assert!(v["message"].is_string(), "{l}");
            }
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["level"], "INFO");
            assert_eq!(v["listen"], addr.to_string());
            assert_eq!(v["data_dir"], data.display().to_string());
        } else {
            assert!(line.contains(" INFO "), "{line}");
        }
    }
}

#[test]
fn restart_right_after_kill9_with_connected_devices() {
    // A supervisor restarts at once: 300 devices connected (upgraded, holding their sockets,
    // so the killed server's ends wait in FIN_WAIT2) and 100 mid-handshake, kill -9, restart on
    // the same address;
    // then again with the devices closing after the kill (TIME_WAIT). Both restarts bind.
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("server.log");
    let mut server = Server::start_logged(&tmp.path().join("data"), &[], &log);
    for round in 0..2 {
        let mut devices = Vec::new();
        for i in 0..300 {
            let tok = server.token_fast(Scope::Device(format!("r{round}-{i}")));
            devices.push(ws_connect(&server, &tok).expect("device connects"));
        }
        // And some caught mid-handshake (request head not complete yet).
        let mut handshaking = Vec::new();
        for _ in 0..100 {
            let mut s = std::net::TcpStream::connect(server.addr).unwrap();
            s.write_all(b"GET /v1/ingest HTTP/1.1\r\nhost: x\r\n")
                .unwrap();
            handshaking.push(s);
        }
        std::thread::sleep(Duration::from_millis(200));
        server.kill9();
        if round == 1 {
            drop(devices);
            drop(handshaking);
            std::thread::sleep(Duration::from_millis(100));
            server.restart_logged(&log);
        } else {
            server.restart_logged(&log);
            drop(devices);
            drop(handshaking);
        }
        assert_eq!(server.get("/healthz", None).0, 200, "round {round}");
    }
}

#[test]
fn data_files_are_private_and_looser_modes_are_refused() {
    // Everything the server creates is 0600 (files) or 0700 (directories); at start a data
    // directory with anything open to group or others is refused (like the secret file), naming
    // the path, its mode and the chmod; after the chmod it starts. An empty directory made with
    // `mkdir` (0755) becomes the data directory and 0700.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let log = tmp.path().join("server.log");
    let mut server = Server::start_logged(&data, &[], &log);
    let ops = server.token_fast(Scope::Ops);
    let tok = server.token_fast(Scope::Device("m1".into()));
    let mut ws = ws_connect(&server, &tok).unwrap();
    ws.send(Message::text(hb_json(1, 52.5, 13.4, now_ms())))
        .unwrap();
    wait_ack(&mut ws, 1);
    drop(ws);
    let (st, body) = http_body(
        &server,
        "PUT",
        "/v1/geofences/f1",
        Some(&ops),
        r#"{"center":[13.4,52.5],"radius_m":100}"#,
    );
    assert_eq!(st, 200, "{body}");
    assert!(server.sigterm().success());
    let mut seen = 0;
    let mut stack = vec![data.clone()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        let mode = meta.mode() & 0o777;
        if meta.is_dir() {
            assert_eq!(mode, 0o700, "{} is {mode:o}", p.display());
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else {
            assert_eq!(mode, 0o600, "{} is {mode:o}", p.display());
        }
        seen += 1;
    }
    for name in ["geobeat.meta", "geofences.json", "secret"] {
        assert!(data.join(name).exists(), "{name}");
    }
    assert!(seen >= 8, "walked {seen} paths");

    let seg = std::fs::read_dir(data.join("shard-0000"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "seg"))
        .expect("a segment");
    for (path, mode) in [
        (seg.clone(), 0o644),
        (data.join("geofences.json"), 0o640),
        (data.join("shard-0001"), 0o755),
    ] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        let mut cmd = Command::new(bin());
        cmd.args(&server.args).env(MQTT_OFF.0, MQTT_OFF.1);
        let (status, out) = run_to_exit(cmd, &tmp.path().join("refused.log"));
        assert!(status.is_some_and(|s| !s.success()), "{status:?}\n{out}");
        for n in [
            path.display().to_string(),
            format!("{mode:04o}"),
            format!("chmod -R go-rwx {}", data.display()),
        ] {
            assert!(out.contains(&n), "{n:?} missing from:\n{out}");
        }
        let fixed = if path.is_dir() { 0o700 } else { 0o600 };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(fixed)).unwrap();
    }
    server.restart_logged(&log);
    assert_eq!(server.get("/v1/devices/m1", Some(&ops)).0, 200);

    // The repository's `shards/` (the default data directory) ships holding only its README
    // (0755 / 0644 in a checkout): a first start adopts it, private, instead of refusing.
    let shipped = tmp.path().join("shipped");
    std::fs::create_dir(&shipped).unwrap();
    std::fs::set_permissions(&shipped, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(shipped.join("README.md"), "# the on-disk format\n").unwrap();
    std::fs::set_permissions(
        shipped.join("README.md"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let server = Server::start(&shipped, &[]);
    drop(server);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&shipped), 0o700);
    assert_eq!(mode(&shipped.join("README.md")), 0o600);
}

#[test]
fn accept_failures_under_emfile_are_rate_limited() {
    // Take the server's open-file limit down to what it already holds: every accept fails with
    // EMFILE while clients wait in the backlog. The accept loop backs off 10 ms and retries;
    // its warning is logged once per executor per interval, not once per attempt (176 lines/s
    // before).
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("server.log");
    let server = Server::start_logged(&tmp.path().join("data"), &[], &log);
    let pid = server.child.id() as libc::pid_t;
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64;
    let lim = libc::rlimit {
        rlim_cur: open,
        rlim_max: open,
    };
    // SAFETY: prlimit on our own child with a struct we own.
    let r = unsafe {
        libc::prlimit(
            pid,
            libc::RLIMIT_NOFILE,
            &lim as *const libc::rlimit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
    let clients: Vec<_> = (0..8)
        .map(|_| std::net::TcpStream::connect(server.addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let text = std::fs::read_to_string(&log).unwrap();
    let lines = text.lines().filter(|l| l.contains("accept failed")).count();
    assert!(lines >= 1, "EMFILE was hit:\n{}", log_tail(&log, 20));
    assert!(
        lines <= 2,
        "{lines} accept-failure lines in 1.5 s (one per executor expected)"
    );
    drop(clients);
}

#[test]
fn policy_and_size_closes_are_logged_at_info_rate_limited() {
    // Devices closed with 1009 (a message over --frame-bytes-max) are logged at info with the
    // code, one line per executor per interval (the rest counted), never with the token.
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("server.log");
    let server = Server::start_logged(
        &tmp.path().join("data"),
        &["--frame-bytes-max", "1KiB", "--shards", "1"],
        &log,
    );
    let tok = server.token_fast(Scope::Device("big".into()));
    for _ in 0..5 {
        let mut ws = ws_connect(&server, &tok).unwrap();
        ws.send(Message::text("x".repeat(2048))).unwrap();
        assert_eq!(wait_close(&mut ws).0, 1009);
    }
    std::thread::sleep(Duration::from_millis(200));
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("connection closed for bad input"))
        .collect();
    assert_eq!(lines.len(), 1, "one line per interval:\n{text}");
    assert!(
        lines[0].contains("INFO") && lines[0].contains("1009"),
        "{}",
        lines[0]
    );
    assert!(!text.contains(&tok), "token in log");
}

#[test]
fn a_missing_data_directory_or_secret_is_never_silently_recreated() {
    // Issue 20 §1: after `rm -rf` of the data directory (or with a volume not mounted) a restart
    // must not create an empty directory and a new secret that kills every token. Without
    // --init: an absent or empty directory is refused (one line naming --init and restore, exit
    // non-zero, nothing created); an existing directory whose secret is gone is refused naming
    // the file. With --init both start. The repository's shipped `shards/` (only its README)
    // starts without --init.
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("out.log");
    let data = tmp.path().join("data");
    let no_init = |data: &Path| {
        let mut cmd = Command::new(bin());
        cmd.args(["serve", "--listen", &free_addr().to_string(), "--data-dir"])
            .arg(data)
            .args(["--shards", "1"])
            .env(MQTT_OFF.0, MQTT_OFF.1)
            .env("RUST_LOG", "geobeat=info");
        cmd
    };
    // Absent: refused, nothing created.
    let (st, out) = run_to_exit(no_init(&data), &log);
    assert_refused(
        st,
        &out,
        &["no geobeat.meta", "--init", "restore it"],
        &data,
    );

    // First start with --init, a heartbeat stored; then the directory is removed.
    let mut server = Server::start(&data, &["--shards", "1"]);
    let tok = server.token_fast(Scope::Device("d1".into()));
    let mut ws = ws_connect(&server, &tok).unwrap();
    ws.send(Message::text(hb_json(1, 1.0, 2.0, now_ms())))
        .unwrap();
    wait_ack(&mut ws, 1);
    drop(ws);
    server.sigterm();
    std::fs::remove_dir_all(&data).unwrap();
    let (st, out) = run_to_exit(no_init(&data), &log);
    assert_refused(st, &out, &["no geobeat.meta", "--init"], &data);
    // An empty directory (a volume mounted but empty) is refused as well.
    std::fs::create_dir(&data).unwrap();
    let (st, out) = run_to_exit(no_init(&data), &log);
    assert!(st.is_some_and(|s| !s.success()), "{out}");
    assert!(out.contains("--init"), "{out}");
    assert_eq!(
        std::fs::read_dir(&data).unwrap().count(),
        0,
        "nothing created"
    );

    // An existing data directory without its secret: refused naming the file; --init makes one.
    let server = Server::start(&data, &["--shards", "1"]);
    drop(server);
    std::fs::remove_file(data.join("secret")).unwrap();
    let (st, out) = run_to_exit(no_init(&data), &log);
    assert!(st.is_some_and(|s| !s.success()), "{out}");
    assert!(
        out.contains("secret") && out.contains("missing") && out.contains("--init"),
        "{out}"
    );
    assert!(
        !data.join("secret").exists(),
        "no new secret without --init"
    );
    let server = Server::start(&data, &["--shards", "1"]);
    assert!(data.join("secret").exists());
    drop(server);

    // The shipped shards/ (README only) starts without --init.
    let shipped = tmp.path().join("shards");
    std::fs::create_dir(&shipped).unwrap();
    std::fs::write(shipped.join("README.md"), "# format\n").unwrap();
    let addr = free_addr();
    let mut child = Command::new(bin())
        .args(["serve", "--listen", &addr.to_string(), "--data-dir"])
        .arg(&shipped)
        .args(["--shards", "1"])
        .env(MQTT_OFF.0, MQTT_OFF.1)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(http(addr, "GET", "/healthz", None), Ok((200, _))) {
        assert!(child.try_wait().unwrap().is_none(), "exited");
        assert!(Instant::now() < deadline, "not healthy");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(shipped.join("geobeat.meta").exists());
}
