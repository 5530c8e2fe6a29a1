//! Command-line configuration of the load generator and the per-process plan derived from it.
//! It owns flag definitions, validation and the split of a run over child processes; it does not
//! open connections. Invariant: a validated [`Plan`] describes a run that respects the protocol's
//! bounds (batch size, frame bytes) before any connection is made.

use std::net::{SocketAddr, ToSocketAddrs as _};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{ArgGroup, Parser, ValueEnum};
use thiserror::Error;

use crate::frame::{self, Common, Format, Sample, FRAME_BYTES_MAX, FRAME_HEARTBEATS_MAX};
use crate::tokens::{Credentials, TokenError};

use super::tls::TlsClient;

/// Most devices one run may simulate (far beyond what one machine's port range allows).
pub const DEVICES_MAX: usize = 1_000_000;
/// Most child processes one run may spawn.
pub const PROCESSES_MAX: usize = 64;
/// Most runtime threads per process.
pub const THREADS_MAX: usize = 256;
/// Default cap on unacknowledged heartbeats per device in open loop (beyond it, sending pauses
/// and the pause shows up as latency).
pub const OPEN_INFLIGHT_DEFAULT: usize = 1000;
/// Most heartbeats one device may keep in flight, in either mode.
pub const INFLIGHT_MAX: usize = 100_000;

/// How sending is paced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Each device keeps at most `--window` heartbeats unacknowledged and sends as soon as the
    /// window allows: measures saturation throughput.
    Closed,
    /// A fixed total rate spread evenly over devices; latency from the intended send time.
    Open,
}

/// What the devices send to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// geobeat or the null server: one WebSocket per device (`ws://host:port/v1/ingest`).
    Ws,
    /// geobeat's MQTT listener or a broker (MQTT 3.1.1): one connection per device, QoS 1
    /// PUBLISH per frame on `geobeat/<id>` (JSON without `seq`), PUBACK as the ack
    /// (`mqtt://host:port`); a token, if given, is the password with the device id as user name.
    Mqtt,
    /// Redis: GEOADD (last location) + XADD (history) per heartbeat, pipelined over a pool of
    /// `--backend-connections` connections (`redis://host:port`).
    Redis,
    /// PostgreSQL: history insert + last-location upsert, over a pool of
    /// `--backend-connections` connections (`postgres://user@host:port/db`).
    Postgres,
}

impl Target {
    /// URL schemes this target accepts, and its default port.
    fn schemes(self) -> (&'static [&'static str], u16) {
        match self {
            Target::Ws => (&["ws", "wss"], 80),
            Target::Mqtt => (&["mqtt", "tcp", "mqtts", "ssl"], 1883),
            Target::Redis => (&["redis"], 6379),
            Target::Postgres => (&["postgres", "postgresql"], 5432),
        }
    }

    /// Whether devices share a pool of database connections instead of one connection each.
    pub fn is_pooled(self) -> bool {
        matches!(self, Target::Redis | Target::Postgres)
    }
}

/// How PostgreSQL transactions are cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PgCommit {
    /// One transaction per heartbeat (statements pipelined on each connection).
    Heartbeat,
    /// One transaction per batch of everything queued on a connection (up to --pipeline-max).
    Batch,
}

/// Default pool size for Redis and PostgreSQL targets.
pub const BACKEND_CONNECTIONS_DEFAULT: usize = 16;
/// Most pool connections per process.
pub const BACKEND_CONNECTIONS_MAX: usize = 1024;
/// Default for `--pipeline-max`.
pub const PIPELINE_MAX_DEFAULT: usize = 1000;
/// Largest allowed `--pipeline-max`.
pub const PIPELINE_MAX_MAX: usize = 100_000;

/// How device tasks are scheduled onto threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RuntimeKind {
    /// One single-threaded tokio runtime per thread; devices dealt round-robin to threads.
    PerThread,
    /// One multi-threaded (work-stealing) tokio runtime with `--threads` workers.
    Multi,
}

/// `geobeat-load`: simulate a fleet of devices sending heartbeats over WebSockets.
#[derive(Debug, Clone, Parser)]
#[command(name = "geobeat-load", version, args_override_self = true)]
#[command(group(ArgGroup::new("credentials").args(["gateway_token", "tokens_file", "secret_file"])))]
pub struct LoadArgs {
    /// What to send to: geobeat/null (ws), an MQTT broker, Redis or PostgreSQL.
    #[arg(long, value_enum, default_value_t = Target::Ws)]
    pub target: Target,
    /// Endpoint: ws://host:port/v1/ingest, mqtt://host:port, redis://host:port or
    /// postgres://user@host:port/db, matching --target; wss:// and mqtts:// (or ssl://) connect
    /// over TLS and need --tls-ca.
    #[arg(long, default_value = "ws://127.0.0.1:8080/v1/ingest")]
    pub url: String,
    /// PEM CA certificate(s) to verify the server's TLS certificate against (wss://, mqtts://).
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Redis/PostgreSQL: pool connections per process (devices are pinned to one each).
    #[arg(long, default_value_t = BACKEND_CONNECTIONS_DEFAULT)]
    pub backend_connections: usize,
    /// Redis/PostgreSQL: most heartbeats per pipeline or batch transaction (and most
    /// one-heartbeat transactions in flight per connection with --pg-commit heartbeat).
    #[arg(long, default_value_t = PIPELINE_MAX_DEFAULT)]
    pub pipeline_max: usize,
    /// PostgreSQL: one transaction per heartbeat, or per batch of queued heartbeats.
    #[arg(long, value_enum, default_value_t = PgCommit::Batch)]
    pub pg_commit: PgCommit,
    /// Number of simulated devices, each on its own connection.
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    /// Frame format.
    #[arg(long, value_enum, default_value_t = Format::Json)]
    pub format: Format,
    /// Heartbeats per frame (1..=1000; JSON frames must also fit 64 KiB).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Pacing: closed (saturation) or open (fixed rate).
    #[arg(long, value_enum, default_value_t = Mode::Closed)]
    pub mode: Mode,
    /// Closed loop: most unacknowledged heartbeats per device (default: one frame's worth).
    #[arg(long)]
    pub window: Option<usize>,
    /// Open loop: total heartbeats per second over all devices.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Open loop: most unacknowledged heartbeats per device before sending pauses.
    #[arg(long, default_value_t = OPEN_INFLIGHT_DEFAULT)]
    pub inflight_max: usize,
    /// Measured interval, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Unmeasured interval after all connections are opened, seconds.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// After the measured interval: seconds to wait for outstanding acks before closing.
    #[arg(long, default_value_t = 2.0)]
    pub drain: f64,
    /// New connections per second (spreads 10,000 connects instead of a SYN flood).
    #[arg(long, default_value_t = 2000.0)]
    pub connect_rate: f64,
    /// Seconds one connection attempt (TCP + upgrade) may take.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// Connection attempts per device before it gives up.
    #[arg(long, default_value_t = 3)]
    pub connect_attempts: u32,
    /// Runtime threads per process (default: available cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Runtime flavour.
    #[arg(long, value_enum, default_value_t = RuntimeKind::PerThread)]
    pub runtime: RuntimeKind,
    /// Child processes to spread devices over (to pass the per-process open-file cap).
    #[arg(long, default_value_t = 1)]
    pub processes: usize,
    /// One gateway token for every connection; heartbeats carry `"id":"<id-prefix><n>"`.
    #[arg(long, env = "GEOBEAT_GATEWAY_TOKEN", hide_env_values = true)]
    pub gateway_token: Option<String>,
    /// Prefix of generated device ids (gateway and secret modes).
    #[arg(long, default_value = "sim-")]
    pub id_prefix: String,
    /// File of `id<TAB>token` lines; device n uses line n.
    #[arg(long)]
    pub tokens_file: Option<PathBuf>,
    /// Server secret file to mint device tokens from (needs the `mint` feature).
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// Lifetime of minted tokens, seconds.
    #[arg(long, default_value_t = 86_400)]
    pub token_valid_s: u64,
    /// Send the token as `?token=` instead of an `Authorization: Bearer` header.
    #[arg(long)]
    pub token_in_query: bool,
    /// Include alt, speed, heading and acc in every heartbeat.
    #[arg(long)]
    pub extras: bool,
    /// Compact JSON object sent as `attrs` with every heartbeat.
    #[arg(long)]
    pub attrs: Option<String>,
    /// Seed for tracks and phases (runs with one seed send the same positions).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Also write the summary as JSON to this file.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// Keep the HDR histograms (V2, base64) in the --json-out file, for plots and merging.
    #[arg(long)]
    pub json_histograms: bool,
    /// Exit with status 3 unless the run acked heartbeats and saw no rejection, protocol error,
    /// connection failure, disconnect or unacked heartbeat (for scripts and CI).
    #[arg(long)]
    pub fail_on_errors: bool,
    /// Internal: run as a child and print one summary line.
    #[arg(long, hide = true)]
    pub child: bool,
    /// Internal: global index of this process's first device.
    #[arg(long, hide = true, default_value_t = 0)]
    pub device_offset: usize,
    /// Internal: common start time of all processes, Unix milliseconds.
    #[arg(long, hide = true)]
    pub t0_unix_ms: Option<u64>,
    /// Internal: common connection ramp length of all processes, milliseconds.
    #[arg(long, hide = true)]
    pub ramp_ms: Option<u64>,
}

/// Why a configuration cannot run.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// A flag value is out of range or flags contradict each other.
    #[error("{0}")]
    Invalid(String),
    /// The URL cannot be parsed or resolved.
    #[error("bad --url {url}: {reason}")]
    Url {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Credentials could not be prepared.
    #[error(transparent)]
    Tokens(#[from] TokenError),
}

fn invalid(message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(message.into())
}

/// Everything one process needs to run its share of the devices.
#[derive(Debug)]
pub struct Plan {
    /// The parsed flags.
    pub args: LoadArgs,
    /// What the devices send to.
    pub target: Target,
    /// Server address the URL resolves to.
    pub addr: SocketAddr,
    /// TLS client for wss:// and mqtts:// URLs (`None`: plain TCP).
    pub tls: Option<TlsClient>,
    /// Devices this process runs.
    pub devices: usize,
    /// Global index of this process's first device.
    pub device_offset: usize,
    /// Heartbeats in flight per device at most.
    pub inflight_max: usize,
    /// Open loop: this process's total rate, heartbeats per second.
    pub rate_per_s: Option<f64>,
    /// This process's connect rate, per second.
    pub connect_rate_per_s: f64,
    /// Runtime threads.
    pub threads: usize,
    /// Run start as Unix milliseconds (shared by all processes of a run).
    pub t0_unix_ms: u64,
    /// Time from start until every connection attempt has begun.
    pub ramp: Duration,
    /// Unmeasured interval after the ramp.
    pub warmup: Duration,
    /// Measured interval.
    pub duration: Duration,
    /// Wait for outstanding acks after the measured interval.
    pub drain: Duration,
    /// One connection attempt's limit.
    pub connect_timeout: Duration,
    /// Where tokens come from.
    pub credentials: Credentials,
}

/// Milliseconds since the Unix epoch now.
pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn seconds(name: &str, value: f64, zero_ok: bool) -> Result<Duration, ConfigError> {
    if !value.is_finite() || value < 0.0 || (!zero_ok && value == 0.0) || value > 86_400.0 {
        return Err(invalid(format!(
            "--{name} must be within (0, 86400] seconds, got {value}"
        )));
    }
    Ok(Duration::from_secs_f64(value))
}

impl Plan {
    /// Validates `args` and derives this process's plan.
    pub fn new(args: LoadArgs) -> Result<Plan, ConfigError> {
        if args.devices == 0 || args.devices > DEVICES_MAX {
            return Err(invalid(format!("--devices must be 1..={DEVICES_MAX}")));
        }
        if args.batch == 0 || args.batch > FRAME_HEARTBEATS_MAX {
            return Err(invalid(format!(
                "--batch must be 1..={FRAME_HEARTBEATS_MAX}"
            )));
        }
        if args.processes == 0 || args.processes > PROCESSES_MAX {
            return Err(invalid(format!("--processes must be 1..={PROCESSES_MAX}")));
        }
        if args.processes > args.devices {
            return Err(invalid("--processes must not exceed --devices"));
        }
        let threads = args
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        if threads == 0 || threads > THREADS_MAX {
            return Err(invalid(format!("--threads must be 1..={THREADS_MAX}")));
        }
        if args.connect_attempts == 0 {
            return Err(invalid("--connect-attempts must be at least 1"));
        }
        if !(args.connect_rate.is_finite() && args.connect_rate > 0.0) {
            return Err(invalid("--connect-rate must be positive"));
        }
        let inflight_max = match args.mode {
            Mode::Closed => {
                if args.rate.is_some() {
                    return Err(invalid("--rate applies to --mode open"));
                }
                args.window.unwrap_or(args.batch)
            }
            Mode::Open => {
                if args.window.is_some() {
                    return Err(invalid("--window applies to --mode closed"));
                }
                match args.rate {
                    Some(rate) if rate.is_finite() && rate > 0.0 => {}
                    _ => return Err(invalid("--mode open needs a positive --rate")),
                }
                args.inflight_max
            }
        };
        if inflight_max < args.batch || inflight_max > INFLIGHT_MAX {
            return Err(invalid(format!(
                "the in-flight window must be within --batch ({})..={INFLIGHT_MAX}",
                args.batch
            )));
        }
        if let Some(attrs) = &args.attrs {
            match serde_json::from_str::<serde_json::Value>(attrs) {
                Ok(serde_json::Value::Object(_)) => {}
                _ => return Err(invalid("--attrs must be a JSON object")),
            }
        }
        let warmup = seconds("warmup", args.warmup, true)?;
        let duration = seconds("duration", args.duration, false)?;
        let drain = seconds("drain", args.drain, true)?;
        let connect_timeout = seconds("connect-timeout", args.connect_timeout, false)?;
        let target = args.target;
        let (addr, host, tls_scheme) = resolve(&args.url, target)?;
        let tls = match (tls_scheme, &args.tls_ca) {
            (true, Some(ca)) => Some(TlsClient::new(ca, &host).map_err(ConfigError::Invalid)?),
            (true, None) => {
                return Err(invalid(format!(
                    "{} needs --tls-ca FILE (the CA that signed the server's certificate)",
                    args.url
                )))
            }
            (false, Some(_)) => {
                return Err(invalid("--tls-ca applies to wss:// and mqtts:// URLs only"))
            }
            (false, None) => None,
        };
        if target.is_pooled() {
            if args.backend_connections == 0 || args.backend_connections > BACKEND_CONNECTIONS_MAX {
                return Err(invalid(format!(
                    "--backend-connections must be 1..={BACKEND_CONNECTIONS_MAX}"
                )));
            }
            if args.pipeline_max == 0 || args.pipeline_max > PIPELINE_MAX_MAX {
                return Err(invalid(format!(
                    "--pipeline-max must be 1..={PIPELINE_MAX_MAX}"
                )));
            }
        }
        if target != Target::Ws && args.format == Format::Binary {
            return Err(invalid(
                "--format binary is geobeat's own layout; other targets get JSON",
            ));
        }

        let credentials = credentials(&args)?;
        let last_device = args.device_offset + args.devices;
        credentials.check(last_device)?;
        check_frame_size(&args, &credentials)?;

        let ramp = match args.ramp_ms {
            Some(ms) => Duration::from_millis(ms),
            None => Duration::from_secs_f64(args.devices as f64 / args.connect_rate),
        };
        Ok(Plan {
            target,
            devices: args.devices,
            device_offset: args.device_offset,
            inflight_max,
            rate_per_s: args.rate.filter(|_| args.mode == Mode::Open),
            connect_rate_per_s: args.connect_rate,
            threads,
            t0_unix_ms: args.t0_unix_ms.unwrap_or_else(unix_ms_now),
            ramp,
            warmup,
            duration,
            drain,
            connect_timeout,
            addr,
            tls,
            credentials,
            args,
        })
    }

    /// Time from run start to the start of the measured window.
    pub fn measure_offset(&self) -> Duration {
        self.ramp + self.warmup
    }

    /// Arguments for child `index` of `count`: the same flags plus this child's share.
    pub fn child_args(&self, original: &[String], index: usize, count: usize) -> Vec<String> {
        let (offset, devices) = split(self.devices, count, index);
        let share = devices as f64 / self.devices as f64;
        let mut args: Vec<String> = original.to_vec();
        let mut push = |name: &str, value: String| {
            args.push(name.to_owned());
            args.push(value);
        };
        push("--processes", "1".into());
        push("--devices", devices.to_string());
        push("--device-offset", (self.device_offset + offset).to_string());
        push(
            "--connect-rate",
            (self.connect_rate_per_s * share).to_string(),
        );
        if let Some(rate) = self.rate_per_s {
            push("--rate", (rate * share).to_string());
        }
        push("--t0-unix-ms", self.t0_unix_ms.to_string());
        push("--ramp-ms", self.ramp.as_millis().to_string());
        push("--threads", self.threads.to_string());
        args.push("--child".into());
        args
    }
}

/// Share `index` of `total` items split into `parts` contiguous, near-equal ranges: (start, len).
pub fn split(total: usize, parts: usize, index: usize) -> (usize, usize) {
    assert!(parts > 0 && index < parts);
    let base = total / parts;
    let extra = total % parts;
    let start = index * base + index.min(extra);
    let len = base + usize::from(index < extra);
    (start, len)
}

/// The URL's address, its host (for the TLS server name) and whether its scheme means TLS.
fn resolve(url: &str, target: Target) -> Result<(SocketAddr, String, bool), ConfigError> {
    let err = |reason: &str| ConfigError::Url {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let uri: tungstenite::http::Uri = url.parse().map_err(|_| err("not a URI"))?;
    let (schemes, default_port) = target.schemes();
    if !uri
        .scheme_str()
        .is_some_and(|scheme| schemes.contains(&scheme))
    {
        return Err(err(&format!(
            "--target {} needs a {}:// URL",
            target
                .to_possible_value()
                .map_or_else(String::new, |v| v.get_name().to_owned()),
            schemes[0]
        )));
    }
    let host = uri.host().ok_or_else(|| err("no host"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let tls = matches!(uri.scheme_str(), Some("wss" | "mqtts" | "ssl"));
    let default_port = match uri.scheme_str() {
        Some("wss") => 443,
        Some("mqtts" | "ssl") => 8883,
        _ => default_port,
    };
    let port = uri.port_u16().unwrap_or(default_port);
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(|e| err(&e.to_string()))?
        .next()
        .ok_or_else(|| err("host resolves to no address"))?;
    Ok((addr, host.to_owned(), tls))
}

fn credentials(args: &LoadArgs) -> Result<Credentials, ConfigError> {
    if let Some(token) = &args.gateway_token {
        return Ok(Credentials::Gateway {
            token: token.clone(),
            id_prefix: args.id_prefix.clone(),
        });
    }
    if let Some(path) = &args.tokens_file {
        return Ok(Credentials::from_tokens_file(path)?);
    }
    if let Some(path) = &args.secret_file {
        #[cfg(feature = "mint")]
        {
            return Ok(Credentials::mint_from_secret(
                path,
                args.id_prefix.clone(),
                args.token_valid_s,
            )?);
        }
        #[cfg(not(feature = "mint"))]
        {
            return Err(invalid(format!(
                "--secret-file {} needs geobeat-perf built with `--features mint`",
                path.display()
            )));
        }
    }
    if args.target != Target::Ws {
        // Brokers and databases take no geobeat token; devices are named `<id-prefix><n>`.
        return Ok(Credentials::Gateway {
            token: String::new(),
            id_prefix: args.id_prefix.clone(),
        });
    }
    Err(invalid(
        "one of --gateway-token, --tokens-file, --secret-file is required",
    ))
}

/// Encodes the largest frame this run will send and refuses runs whose frames exceed the
/// server's frame byte limit (JSON batches of several hundred heartbeats do).
fn check_frame_size(args: &LoadArgs, credentials: &Credentials) -> Result<(), ConfigError> {
    let credential = credentials.for_device(args.device_offset + args.devices - 1)?;
    let extra = args.extras.then_some(-12_345.678_f32);
    let samples = vec![
        Sample {
            seq: u64::MAX / 2,
            lat: -89.123_456_789_012_34,
            lon: -179.123_456_789_012_34,
            ts_ms: i64::MAX / 2,
            alt_m: extra,
            speed_mps: extra,
            heading_deg: extra,
            acc_m: extra,
        };
        args.batch
    ];
    let common = Common {
        id: credential.frame_id.as_deref(),
        attrs_json: args.attrs.as_deref(),
    };
    let mut out = Vec::new();
    frame::encode(args.format, &samples, &common, &mut out)
        .map_err(|e| invalid(format!("frames cannot be encoded: {e}")))?;
    if out.len() > FRAME_BYTES_MAX {
        return Err(invalid(format!(
            "a {:?} frame of {} heartbeats can reach {} bytes, over the server's {} byte limit; \
             use a smaller --batch or --format binary",
            args.format,
            args.batch,
            out.len(),
            FRAME_BYTES_MAX
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Plan, ConfigError> {
        let mut argv = vec!["geobeat-load", "--url", "ws://127.0.0.1:9/v1/ingest"];
        argv.extend_from_slice(extra);
        Plan::new(LoadArgs::try_parse_from(argv).map_err(|e| invalid(e.to_string()))?)
    }

    #[test]
    fn split_covers_every_device_once() {
        // Checks that contiguous shares cover 0..total exactly with sizes differing by <= 1.
        for (total, parts) in [(10, 3), (10_000, 7), (5, 5), (1, 1)] {
            let mut next = 0;
            for index in 0..parts {
                let (start, len) = split(total, parts, index);
                assert_eq!(start, next);
                assert!(len == total / parts || len == total / parts + 1);
                next += len;
            }
            assert_eq!(next, total);
        }
    }

    #[test]
    fn flag_combinations_are_validated() {
        // Checks that contradictory or out-of-range flags are refused and a sane set accepted.
        assert!(
            parse(&["--devices", "10"]).is_err(),
            "credentials are required"
        );
        let ok = parse(&["--gateway-token", "x", "--devices", "10", "--window", "8"]).unwrap();
        assert_eq!(ok.inflight_max, 8);
        assert!(parse(&["--gateway-token", "x", "--mode", "open"]).is_err());
        assert!(parse(&["--gateway-token", "x", "--rate", "10"]).is_err());
        assert!(parse(&["--gateway-token", "x", "--batch", "0"]).is_err());
        assert!(parse(&["--gateway-token", "x", "--batch", "4", "--window", "2"]).is_err());
        assert!(parse(&["--gateway-token", "x", "--attrs", "[1]"]).is_err());
        assert!(parse(&["--gateway-token", "x", "--duration", "0"]).is_err());
        assert!(parse(&["--gateway-token", "x", "--url", "http://h/v1/ingest"]).is_err());
        // TLS URLs need the CA to trust, and the CA applies to TLS URLs only.
        let wss = [
            "--gateway-token",
            "x",
            "--url",
            "wss://127.0.0.1:9/v1/ingest",
        ];
        let e = parse(&wss).unwrap_err().to_string();
        assert!(e.contains("--tls-ca"), "{e}");
        let e = parse(&["--gateway-token", "x", "--tls-ca", "/nonexistent.pem"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("wss://"), "{e}");
        let e = parse(&[&wss[..], &["--tls-ca", "/nonexistent.pem"]].concat())
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent.pem"), "{e}");
        let open = parse(&["--gateway-token", "x", "--mode", "open", "--rate", "50"]).unwrap();
        assert_eq!(open.rate_per_s, Some(50.0));
        assert_eq!(open.inflight_max, OPEN_INFLIGHT_DEFAULT);
    }

    #[test]
    fn oversized_json_batches_are_refused_but_binary_fits() {
        // Checks the frame byte check: 1000 JSON heartbeats exceed 64 KiB, binary ones do not.
        let json = parse(&["--gateway-token", "x", "--batch", "1000"]);
        assert!(matches!(json, Err(ConfigError::Invalid(m)) if m.contains("byte limit")));
        parse(&[
            "--gateway-token",
            "x",
            "--batch",
            "1000",
            "--format",
            "binary",
        ])
        .unwrap();
    }

    #[test]
    fn child_args_split_devices_rates_and_offsets() {
        // Checks that child arguments re-parse into plans whose devices, rates and offsets add
        // up to the parent's, with a shared start time and ramp.
        let argv: Vec<String> = [
            "geobeat-load",
            "--url",
            "ws://127.0.0.1:9/v1/ingest",
            "--gateway-token",
            "x",
            "--devices",
            "10",
            "--mode",
            "open",
            "--rate",
            "100",
            "--processes",
            "3",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let parent = Plan::new(LoadArgs::try_parse_from(&argv).unwrap()).unwrap();
        let mut devices = 0;
        let mut rate = 0.0;
        for index in 0..3 {
            let child_argv = parent.child_args(&argv, index, 3);
            let child = Plan::new(LoadArgs::try_parse_from(&child_argv).unwrap()).unwrap();
            assert!(child.args.child);
            assert_eq!(child.args.processes, 1);
            assert_eq!(child.device_offset, devices);
            assert_eq!(child.t0_unix_ms, parent.t0_unix_ms);
            assert_eq!(child.ramp.as_millis(), parent.ramp.as_millis());
            devices += child.devices;
            rate += child.rate_per_s.unwrap();
        }
        assert_eq!(devices, 10);
        assert!((rate - 100.0).abs() < 1e-9);
    }
}
