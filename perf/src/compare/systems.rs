//! The systems the comparison runs and the servers behind them: geobeat (over WebSocket, and over
//! MQTT on a second instance), the null (ceiling) server, Redis with `appendfsync always` and
//! `everysec`, PostgreSQL (one transaction per heartbeat, or per batch) and Mosquitto. It owns starting each server from the machine's own
//! packages on 127.0.0.1 with its own data directory and configuration, waiting until it serves,
//! the `geobeat-load` arguments that point a run at it, and stopping it. It does not run loads or
//! judge results. Invariant: every server this module starts is stopped when its [`Server`] is
//! dropped (SIGTERM, or SIGINT for PostgreSQL's fast shutdown, then SIGKILL after a grace
//! period), so an error anywhere in a comparison leaves no server behind.

use std::fs;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;

/// How long a server may take to start serving.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a server may take to stop before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(15);
/// PostgreSQL settings that differ from the packaged defaults (see [`ServerKind::settings`]).
const POSTGRES_SETTINGS: &[&str] = &[
    "synchronous_commit=on",
    "fsync=on",
    "full_page_writes=on",
    "max_connections=200",
    "shared_buffers=256MB",
    "max_wal_size=8GB",
    "checkpoint_timeout=30min",
];

/// Why a server could not be prepared or started.
#[derive(Debug, Error)]
pub enum ServerError {
    /// A program the comparison needs is not installed.
    #[error("{program} not found ({hint})")]
    Missing {
        /// The program.
        program: String,
        /// How to get it.
        hint: String,
    },
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A preparation step (initdb) exited unsuccessfully.
    #[error("{what} failed: {detail}")]
    Step {
        /// The step.
        what: String,
        /// Exit status and output.
        detail: String,
    },
    /// The server exited or did not answer in time.
    #[error("{server} did not start: {detail}; log: {log}")]
    Start {
        /// Which server.
        server: &'static str,
        /// What was seen.
        detail: String,
        /// Its log file.
        log: PathBuf,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServerError {
    let what = what.into();
    move |source| ServerError::Io { what, source }
}

/// A server program configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServerKind {
    /// `geobeat serve`, strict durability (acks after fdatasync), MQTT listener off.
    Geobeat,
    /// A second `geobeat serve`, strict durability, with its MQTT listener on a free port.
    GeobeatMqtt,
    /// `geobeat-null`: same network stack, stores nothing.
    Null,
    /// `geobeat-floor`: plain epoll, hand-written framing, stores nothing.
    Floor,
    /// redis-server, AOF with `appendfsync always`.
    RedisAlways,
    /// redis-server, AOF with `appendfsync everysec`.
    RedisEverysec,
    /// PostgreSQL with `synchronous_commit=on`.
    Postgres,
    /// Mosquitto with persistence off (its default).
    Mosquitto,
}

impl ServerKind {
    /// Short name used in logs and file names.
    pub fn name(self) -> &'static str {
        match self {
            ServerKind::Geobeat => "geobeat",
            ServerKind::GeobeatMqtt => "geobeat-mqtt",
            ServerKind::Null => "geobeat-null",
            ServerKind::Floor => "geobeat-floor",
            ServerKind::RedisAlways => "redis-always",
            ServerKind::RedisEverysec => "redis-everysec",
            ServerKind::Postgres => "postgres",
            ServerKind::Mosquitto => "mosquitto",
        }
    }
}

/// One system under comparison: a server plus how the load generator talks to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum System {
    /// geobeat, every ack after fdatasync.
    Geobeat,
    /// The null server: the machine's network-and-protocol ceiling.
    Null,
    /// The floor server: the kernel's socket work plus the least framing code (issue 15's
    /// reference).
    Floor,
    /// Redis, AOF fsync before every reply.
    RedisAlways,
    /// Redis, AOF fsync once a second.
    RedisEverysec,
    /// PostgreSQL, one transaction per heartbeat.
    PostgresTx1,
    /// PostgreSQL, one transaction per batch of queued heartbeats.
    PostgresBatch,
    /// geobeat over MQTT 3.1.1, QoS 1, every PUBACK after fdatasync (issue 16).
    GeobeatMqtt,
    /// Mosquitto, QoS 1.
    Mosquitto,
}

/// Every system, in the order runs interleave (geobeat next to its ceiling, geobeat over MQTT
/// next to Mosquitto).
pub const ALL_SYSTEMS: [System; 9] = [
    System::Geobeat,
    System::Null,
    System::Floor,
    System::RedisAlways,
    System::RedisEverysec,
    System::PostgresTx1,
    System::PostgresBatch,
    System::GeobeatMqtt,
    System::Mosquitto,
];

impl System {
    /// Name in tables, files and `--systems`.
    pub fn name(self) -> &'static str {
        match self {
            System::Geobeat => "geobeat",
            System::Null => "null",
            System::Floor => "floor",
            System::RedisAlways => "redis-always",
            System::RedisEverysec => "redis-everysec",
            System::PostgresTx1 => "postgres-tx1",
            System::PostgresBatch => "postgres-batch",
            System::GeobeatMqtt => "geobeat-mqtt",
            System::Mosquitto => "mosquitto",
        }
    }

    /// Parses a `--systems` entry.
    pub fn from_name(name: &str) -> Option<System> {
        ALL_SYSTEMS.into_iter().find(|s| s.name() == name)
    }

    /// The server this system runs on.
    pub fn server(self) -> ServerKind {
        match self {
            System::Geobeat => ServerKind::Geobeat,
            System::Null => ServerKind::Null,
            System::Floor => ServerKind::Floor,
            System::RedisAlways => ServerKind::RedisAlways,
            System::RedisEverysec => ServerKind::RedisEverysec,
            System::PostgresTx1 | System::PostgresBatch => ServerKind::Postgres,
            System::GeobeatMqtt => ServerKind::GeobeatMqtt,
            System::Mosquitto => ServerKind::Mosquitto,
        }
    }

    /// Whether an ack means the heartbeat is on stable storage.
    pub fn durable(self) -> bool {
        matches!(
            self,
            System::Geobeat
                | System::GeobeatMqtt
                | System::RedisAlways
                | System::PostgresTx1
                | System::PostgresBatch
        )
    }

    /// Whether it speaks geobeat's device protocol (and so can take binary frames).
    pub fn speaks_geobeat(self) -> bool {
        matches!(self, System::Geobeat | System::Null | System::Floor)
    }

    /// What an ack means, for the tables.
    pub fn ack_meaning(self) -> &'static str {
        match self {
            System::Geobeat => "durable: fdatasync of the shard log before the ack; keeps history + last location",
            System::Null => "nothing stored (ceiling: same network stack, acks at once)",
            System::Floor => "nothing stored (floor: plain epoll, hand-written framing, acks coalesced per loop)",
            System::RedisAlways => "durable: AOF write + fsync before the reply (GEOADD last + XADD history)",
            System::RedisEverysec => "not durable: AOF fsync once a second (GEOADD last + XADD history)",
            System::PostgresTx1 => "durable: WAL flush per commit, one heartbeat per transaction (history insert + last upsert)",
            System::PostgresBatch => "durable: WAL flush per commit, one transaction per batch of queued heartbeats",
            System::GeobeatMqtt => "durable: PUBACK after fdatasync of the shard log (MQTT 3.1.1, QoS 1); keeps history + last location",
            System::Mosquitto => "not durable: PUBACK from memory (persistence off, its default); keeps neither history nor last location",
        }
    }

    /// `geobeat-load` arguments that point a run at `server`.
    pub fn load_args(self, server: &Server) -> Vec<String> {
        let port = server.port;
        let mut args: Vec<String> = match self {
            System::Geobeat | System::Null | System::Floor => vec![
                "--target".into(),
                "ws".into(),
                "--url".into(),
                format!("ws://127.0.0.1:{port}/v1/ingest"),
            ],
            System::RedisAlways | System::RedisEverysec => vec![
                "--target".into(),
                "redis".into(),
                "--url".into(),
                format!("redis://127.0.0.1:{port}"),
            ],
            System::PostgresTx1 | System::PostgresBatch => vec![
                "--target".into(),
                "postgres".into(),
                "--url".into(),
                format!("postgres://postgres@127.0.0.1:{port}/postgres"),
                "--pg-commit".into(),
                if self == System::PostgresTx1 {
                    "heartbeat".into()
                } else {
                    "batch".into()
                },
            ],
            System::GeobeatMqtt | System::Mosquitto => vec![
                "--target".into(),
                "mqtt".into(),
                "--url".into(),
                format!("mqtt://127.0.0.1:{}", server.mqtt_port.unwrap_or(port)),
            ],
        };
        if let Some(secret) = &server.secret_file {
            // The null server ignores tokens; giving it geobeat's minted device tokens keeps the
            // frames byte-for-byte the same as geobeat's.
            args.push("--secret-file".into());
            args.push(secret.display().to_string());
        }
        args
    }
}

/// Where to find the programs.
#[derive(Debug, Clone)]
pub struct Programs {
    /// Directory of `geobeat`, `geobeat-null`, `geobeat-load`.
    pub bin_dir: PathBuf,
}

impl Programs {
    /// A binary from `bin_dir`.
    pub fn ours(&self, name: &str) -> Result<PathBuf, ServerError> {
        let path = self.bin_dir.join(name);
        if path.is_file() {
            Ok(path)
        } else {
            Err(ServerError::Missing {
                program: path.display().to_string(),
                hint: "build with `cargo build --release --bin geobeat` and \
                       `cargo build --release -p geobeat-perf --features mint --bins`"
                    .into(),
            })
        }
    }
}

/// A program from the machine's packages: first match in `PATH` or the given directories.
pub fn system_program(
    name: &str,
    extra_dirs: &[&str],
    package: &str,
) -> Result<PathBuf, ServerError> {
    let path_var = std::env::var("PATH").unwrap_or_default();
    let dirs = path_var
        .split(':')
        .map(PathBuf::from)
        .chain(extra_dirs.iter().map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(ServerError::Missing {
        program: name.into(),
        hint: format!("apt-get install -y --no-install-recommends {package}"),
    })
}

/// The newest PostgreSQL server binary directory (`/usr/lib/postgresql/<version>/bin`).
pub fn postgres_bin_dir() -> Result<PathBuf, ServerError> {
    let mut best: Option<(u32, PathBuf)> = None;
    if let Ok(entries) = fs::read_dir("/usr/lib/postgresql") {
        for entry in entries.flatten() {
            let Some(version) = entry
                .file_name()
                .to_str()
                .and_then(|v| v.parse::<u32>().ok())
            else {
                continue;
            };
            let bin = entry.path().join("bin");
            if bin.join("postgres").is_file() && best.as_ref().is_none_or(|(v, _)| version > *v) {
                best = Some((version, bin));
            }
        }
    }
    best.map(|(_, bin)| bin).ok_or(ServerError::Missing {
        program: "postgres".into(),
        hint: "apt-get install -y --no-install-recommends postgresql".into(),
    })
}

/// A free TCP port on 127.0.0.1 (bound and released; the server binds it right after).
pub fn free_port() -> Result<u16, ServerError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io_err("bind a free port"))?;
    Ok(listener
        .local_addr()
        .map_err(io_err("read the free port"))?
        .port())
}

/// Uid and gid of a system user, from /etc/passwd.
fn user_ids(user: &str) -> Option<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != user {
            return None;
        }
        let _password = fields.next()?;
        let uid = fields.next()?.parse().ok()?;
        let gid = fields.next()?.parse().ok()?;
        Some((uid, gid))
    })
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    /// Which program and configuration.
    pub kind: ServerKind,
    /// The server process (for PostgreSQL the postmaster, whose children are its backends).
    child: Child,
    /// Its pid (root of the process tree whose CPU is measured).
    pub pid: u32,
    /// Loopback port it serves on (geobeat: the HTTP/WebSocket listener).
    pub port: u16,
    /// geobeat's MQTT listener port, when it has one on.
    pub mqtt_port: Option<u16>,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its log file.
    pub log: PathBuf,
    /// geobeat's secret file (for minting device tokens), also given to the null server's runs.
    pub secret_file: Option<PathBuf>,
    /// Version string of the program.
    pub version: String,
    /// The command line that started it.
    pub command: String,
    /// Settings that differ from the package defaults, for the README.
    pub settings: Vec<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let signal = if self.kind == ServerKind::Postgres {
            libc::SIGINT
        } else {
            libc::SIGTERM
        };
        if let Ok(pid) = i32::try_from(self.pid) {
            // SAFETY: kill has no memory-safety preconditions; the pid is our own child, not yet
            // waited for, so it cannot have been reused.
            unsafe { libc::kill(pid, signal) };
        }
        let deadline = Instant::now() + STOP_GRACE;
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

/// Starts the server of `kind` with its data under `work_dir`.
pub fn start(
    kind: ServerKind,
    work_dir: &Path,
    programs: &Programs,
) -> Result<Server, ServerError> {
    let port = free_port()?;
    let data_dir = work_dir.join(kind.name());
    fs::create_dir_all(&data_dir).map_err(io_err(format!("create {}", data_dir.display())))?;
    let log = work_dir.join(format!("{}.log", kind.name()));
    let log_file = || {
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io_err(format!("open {}", log.display())))
    };
    let mut secret_file = None;
    let mut mqtt_port = None;
    let mut settings = Vec::new();
    let (mut command, version) = match kind {
        ServerKind::Geobeat | ServerKind::GeobeatMqtt | ServerKind::Null | ServerKind::Floor => {
            let binary = if kind == ServerKind::GeobeatMqtt {
                "geobeat"
            } else {
                kind.name()
            };
            let program = programs.ours(binary)?;
            let mut command = Command::new(&program);
            if matches!(kind, ServerKind::Geobeat | ServerKind::GeobeatMqtt) {
                command
                    .arg("serve")
                    .arg("--init")
                    .arg("--listen")
                    .arg(format!("127.0.0.1:{port}"))
                    .arg("--data-dir")
                    .arg(&data_dir)
                    .arg("--mqtt-listen");
                secret_file = Some(data_dir.join("secret"));
                if kind == ServerKind::GeobeatMqtt {
                    let mqtt = free_port()?;
                    command.arg(format!("127.0.0.1:{mqtt}"));
                    mqtt_port = Some(mqtt);
                    settings.push(
                        "defaults: --durability strict, one shard per core; \
                         --mqtt-listen 127.0.0.1:<free port> (MQTT 3.1.1 devices, QoS 1)"
                            .into(),
                    );
                } else {
                    // Measured over WebSocket; no MQTT listener to collide with Mosquitto's
                    // or the MQTT instance's port.
                    command.arg("off");
                    settings.push(
                        "defaults: --durability strict, one shard per core; --mqtt-listen off"
                            .into(),
                    );
                }
            } else {
                command.arg("--listen").arg(format!("127.0.0.1:{port}"));
            }
            (command, String::new())
        }
        ServerKind::RedisAlways | ServerKind::RedisEverysec => {
            let program = system_program("redis-server", &[], "redis-server")?;
            let fsync = if kind == ServerKind::RedisAlways {
                "always"
            } else {
                "everysec"
            };
            let mut command = Command::new(&program);
            let redis_settings = [
                ("appendonly", "yes".to_owned()),
                ("appendfsync", fsync.to_owned()),
                // No RDB snapshots and no AOF rewrites: their forks would run during other
                // systems' runs on a 2-core machine. This flatters Redis a little.
                ("save", String::new()),
                ("auto-aof-rewrite-percentage", "0".to_owned()),
                ("protected-mode", "no".to_owned()),
                ("daemonize", "no".to_owned()),
            ];
            command
                .arg("--port")
                .arg(port.to_string())
                .arg("--bind")
                .arg("127.0.0.1")
                .arg("--dir")
                .arg(&data_dir)
                .arg("--logfile")
                .arg(&log);
            for (name, value) in &redis_settings {
                command.arg(format!("--{name}")).arg(value);
                settings.push(format!("{name} {value:?}"));
            }
            let version = capture(&program, &["--version"]);
            (command, version)
        }
        ServerKind::Postgres => {
            let bin = postgres_bin_dir()?;
            let postgres = bin.join("postgres");
            let ids = prepare_postgres_dir(&bin, &data_dir)?;
            let mut command = Command::new(&postgres);
            command
                .arg("-D")
                .arg(data_dir.join("data"))
                .arg("-p")
                .arg(port.to_string())
                .arg("-k")
                .arg(&data_dir)
                .arg("-c")
                .arg("listen_addresses=127.0.0.1");
            for setting in POSTGRES_SETTINGS {
                command.arg("-c").arg(setting);
                settings.push((*setting).to_owned());
            }
            if let Some((uid, gid)) = ids {
                command.uid(uid).gid(gid);
            }
            let version = capture(&postgres, &["--version"]);
            (command, version)
        }
        ServerKind::Mosquitto => {
            let program = system_program("mosquitto", &["/usr/sbin"], "mosquitto")?;
            let conf = data_dir.join("mosquitto.conf");
            let lines = [
                format!("listener {port} 127.0.0.1"),
                // No password file: any user name and password are accepted, so the devices can
                // send the same CONNECT (device id, geobeat token) as to geobeat.
                "allow_anonymous true".to_owned(),
                // Its default: a PUBACK means "in memory"; nothing is written to disk.
                "persistence false".to_owned(),
                // Defaults, written out: they bound QoS 1/2 deliveries *to subscribers* (in flight
                // per client, then queued); there are none here. An incoming QoS 1 PUBLISH from a
                // 3.1.1 client is PUBACKed as soon as it is read, with no inflight cap.
                "max_inflight_messages 20".to_owned(),
                "max_queued_messages 1000".to_owned(),
                // No cap on connections (the default -1); the open-file limit is the bound.
                "max_connections -1".to_owned(),
                // Stay root so the data directory needs no chown; the broker runs on loopback only.
                "user root".to_owned(),
                // Mosquitto's default leaves Nagle on, which would delay PUBACKs.
                "set_tcp_nodelay true".to_owned(),
                "log_dest stderr".to_owned(),
                "log_type error".to_owned(),
                "log_type warning".to_owned(),
            ];
            fs::write(&conf, lines.join("\n") + "\n")
                .map_err(io_err(format!("write {}", conf.display())))?;
            settings.extend(lines.iter().skip(1).cloned());
            let mut command = Command::new(&program);
            command.arg("-c").arg(&conf);
            let version = capture(&program, &["-h"])
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned();
            (command, version)
        }
    };
    let command_text = format!("{command:?}");
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl, which
    // is async-signal-safe. If the runner dies (killed, crashed) the server gets SIGTERM
    // instead of running on unattended; std runs this after the uid/gid change, so it survives it.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
        .stdin(Stdio::null())
        .stdout(log_file()?)
        .stderr(log_file()?);
    let child = command
        .spawn()
        .map_err(io_err(format!("start {}", kind.name())))?;
    let pid = child.id();
    let mut server = Server {
        kind,
        child,
        pid,
        port,
        mqtt_port,
        data_dir,
        log,
        secret_file,
        version,
        command: command_text,
        settings,
    };
    wait_ready(&mut server)?;
    Ok(server)
}

/// Output of `program args` (stdout, else stderr), trimmed; empty if it cannot run.
pub fn capture(program: &Path, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(out) => {
            let text = if out.stdout.is_empty() {
                out.stderr
            } else {
                out.stdout
            };
            String::from_utf8_lossy(&text).trim().to_owned()
        }
        Err(_) => String::new(),
    }
}

/// Makes a PostgreSQL cluster in `dir/data`. As root, the directory goes to the `postgres` user
/// (PostgreSQL refuses to run as root) and its ids are returned for starting the server.
fn prepare_postgres_dir(bin: &Path, dir: &Path) -> Result<Option<(u32, u32)>, ServerError> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ids = if root {
        let ids = user_ids("postgres").ok_or(ServerError::Missing {
            program: "user postgres".into(),
            hint: "apt-get install -y --no-install-recommends postgresql (creates the user)".into(),
        })?;
        // The work dir is world-traversable (0755), so owning its own directory is enough.
        std::os::unix::fs::chown(dir, Some(ids.0), Some(ids.1))
            .map_err(io_err(format!("chown {}", dir.display())))?;
        Some(ids)
    } else {
        None
    };
    let mut initdb = Command::new(bin.join("initdb"));
    initdb
        .arg("-D")
        .arg(dir.join("data"))
        .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"])
        .stdin(Stdio::null());
    if let Some((uid, gid)) = ids {
        initdb.uid(uid).gid(gid);
    }
    let out = initdb.output().map_err(io_err("run initdb"))?;
    if !out.status.success() {
        return Err(ServerError::Step {
            what: "initdb".into(),
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(ids)
}

fn wait_ready(server: &mut Server) -> Result<(), ServerError> {
    let deadline = Instant::now() + START_TIMEOUT;
    let addr = SocketAddr::from(([127, 0, 0, 1], server.port));
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        if let Ok(Some(status)) = server.child.try_wait() {
            return Err(ServerError::Start {
                server: server.kind.name(),
                detail: format!("exited with {status}"),
                log: server.log.clone(),
            });
        }
        match probe(server, addr) {
            Ok(()) => return Ok(()),
            Err(detail) => last = detail,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(ServerError::Start {
        server: server.kind.name(),
        detail: format!("not ready after {START_TIMEOUT:?}: {last}"),
        log: server.log.clone(),
    })
}

/// One readiness check: the server answers its protocol's simplest request.
fn probe(server: &Server, addr: SocketAddr) -> Result<(), String> {
    let timeout = Duration::from_secs(2);
    if let Some(mqtt) = server.mqtt_port {
        // geobeat's MQTT listener: accepting is enough (the HTTP probe below checks the rest).
        TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], mqtt)), timeout)
            .map_err(|e| format!("connect to the MQTT listener: {e}"))?;
    }
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let (request, expect): (&[u8], &[u8]) = match server.kind {
        ServerKind::Geobeat | ServerKind::GeobeatMqtt => (
            b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
            b"HTTP/1.1 200",
        ),
        ServerKind::RedisAlways | ServerKind::RedisEverysec => (b"PING\r\n", b"+PONG"),
        // PostgreSQL: an SSLRequest is answered with one byte ('N' here) by a running server.
        ServerKind::Postgres => (&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f], b"N"),
        // Accepting the connection is all the null server and Mosquitto need to show.
        ServerKind::Null | ServerKind::Floor | ServerKind::Mosquitto => return Ok(()),
    };
    stream.write_all(request).map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    let n = stream.read(&mut buf).map_err(|e| e.to_string())?;
    if buf[..n].starts_with(expect) {
        if server.kind == ServerKind::Postgres {
            return postgres_accepts(server);
        }
        Ok(())
    } else {
        Err(format!("answered {:?}", String::from_utf8_lossy(&buf[..n])))
    }
}

/// PostgreSQL answers SSLRequest while still starting up; `pg_isready` tells when it accepts
/// sessions.
fn postgres_accepts(server: &Server) -> Result<(), String> {
    let bin = postgres_bin_dir().map_err(|e| e.to_string())?;
    let status = Command::new(bin.join("pg_isready"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &server.port.to_string(),
            "-U",
            "postgres",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("pg_isready: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("pg_isready: {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_names_round_trip_and_servers_are_shared_only_by_postgres() {
        // Checks `--systems` parsing against every name, and that the two PostgreSQL systems
        // are the only ones sharing a server.
        for system in ALL_SYSTEMS {
            assert_eq!(System::from_name(system.name()), Some(system));
        }
        assert_eq!(System::from_name("mysql"), None);
        let mut servers: Vec<ServerKind> = ALL_SYSTEMS.iter().map(|s| s.server()).collect();
        servers.dedup();
        assert_eq!(servers.len(), ALL_SYSTEMS.len() - 1);
    }

    #[test]
    fn passwd_lookup_finds_root() {
        // Checks the /etc/passwd parser on the one user every Linux machine has.
        assert_eq!(user_ids("root"), Some((0, 0)));
        assert_eq!(user_ids("no-such-user-here"), None);
    }
}
