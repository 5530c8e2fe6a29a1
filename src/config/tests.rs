//! The unit tests of configuration as a whole: clap parsing, resolution from every source, the
//! file's flat keys and `[[sinks]]` tables, and `--help` (the table's own checks are in
//! `settings`).

use std::collections::HashMap;

use clap::{CommandFactory as _, Parser as _};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;
use crate::limits::{FRAME_BYTES_MAX, FRAME_HEARTBEATS_MAX, SINKS_MAX};

fn serve_args(argv: &[&str]) -> ServeArgs {
    let mut full = vec!["geobeat", "serve"];
    full.extend_from_slice(argv);
    match Cli::try_parse_from(full).expect("arguments parse").command {
        Command::Serve(a) => a,
        other => panic!("expected serve, got {other:?}"),
    }
}

fn resolve(
    args: &ServeArgs,
    env: &[(&str, &str)],
    file: Option<&str>,
) -> Result<ServeConfig, ConfigError> {
    let map: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let lookup = move |k: &str| map.get(k).cloned();
    let sources = Sources {
        env: &lookup,
        file: file.map(|t| (Path::new("geobeat.toml"), t)),
        open_files_limit: 20_000,
        cores: 2,
    };
    args.resolve(&sources)
}

#[test]
fn defaults_apply_without_sources() {
    // Nothing given: every documented default.
    let c = resolve(&ServeArgs::default(), &[], None).unwrap();
    assert_eq!(c.listen, "127.0.0.1:8080".parse::<SocketAddr>().unwrap());
    assert_eq!(c.data_dir, PathBuf::from("./shards"));
    assert_eq!(c.shards, 2);
    assert_eq!(c.segment_bytes, 64 << 20);
    assert_eq!(c.commit_interval, Duration::from_millis(2));
    assert_eq!(c.commit_entries_max, 1000);
    assert_eq!(c.durability, Durability::Strict);
    assert_eq!(c.retention, Some(Duration::from_secs(7 * 86_400)));
    assert_eq!(c.connections_max, 16_000);
    assert_eq!(c.handshake_timeout, Duration::from_millis(5000));
    assert_eq!(c.idle_timeout, Duration::from_secs(60));
    assert_eq!(c.ping_interval(), Duration::from_secs(30));
    assert_eq!(c.frame_bytes_max, FRAME_BYTES_MAX);
    assert_eq!(c.frame_heartbeats_max, FRAME_HEARTBEATS_MAX);
    assert_eq!(c.mesh_capacity, 1024);
    assert_eq!(c.metrics_listen, None);
    assert_eq!(c.log_level, "info");
    assert_eq!(c.secret_file, None);
}

#[test]
fn flag_beats_env_beats_file() {
    // The same setting from three sources: the flag wins, then env, then file.
    let file = "shards = 3\nmesh_capacity = 10\nretention = \"12h\"\n";
    let env = [("GEOBEAT_SHARDS", "5"), ("GEOBEAT_MESH_CAPACITY", "20")];
    let c = resolve(&serve_args(&["--shards", "7"]), &env, Some(file)).unwrap();
    assert_eq!(c.shards, 7);
    assert_eq!(c.mesh_capacity, 20);
    assert_eq!(c.retention, Some(Duration::from_secs(12 * 3600)));
    let c = resolve(&serve_args(&[]), &env, Some(file)).unwrap();
    assert_eq!(c.shards, 5);
    let c = resolve(&serve_args(&[]), &[("GEOBEAT_SHARDS", "")], Some(file)).unwrap();
    assert_eq!(c.shards, 3, "an empty variable counts as unset");
}

#[test]
fn every_source_parses_the_same_forms() {
    // Sizes with units, `forever`, `off`, durability words, from env and file.
    let c = resolve(
        &serve_args(&[
            "--segment-bytes",
            "2MiB",
            "--metrics-listen",
            "127.0.0.1:9100",
        ]),
        &[
            ("GEOBEAT_RETENTION", "forever"),
            ("GEOBEAT_DURABILITY", "relaxed"),
        ],
        Some("frame_bytes_max = \"16KiB\"\nsecret_file = \"/etc/geobeat/secret\"\n"),
    )
    .unwrap();
    assert_eq!(c.segment_bytes, 2 << 20);
    assert_eq!(
        c.metrics_listen,
        Some("127.0.0.1:9100".parse::<SocketAddr>().unwrap())
    );
    assert_eq!(c.retention, None);
    assert_eq!(c.durability, Durability::Relaxed);
    assert_eq!(c.frame_bytes_max, 16 << 10);
    assert_eq!(c.secret_file, Some(PathBuf::from("/etc/geobeat/secret")));
}

#[test]
fn bad_values_name_setting_value_and_origin() {
    // Errors carry the flag name, the bad text and where it came from.
    let err = resolve(
        &serve_args(&[]),
        &[("GEOBEAT_COMMIT_INTERVAL_MS", "9")],
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("--commit-interval-ms"), "{err}");
    assert!(err.contains("\"9\""), "{err}");
    assert!(err.contains("GEOBEAT_COMMIT_INTERVAL_MS"), "{err}");
    let err = resolve(&serve_args(&[]), &[], Some("segment_bytes = 12345\n"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--segment-bytes") && err.contains("geobeat.toml"),
        "{err}"
    );
    let err = resolve(&serve_args(&[]), &[], Some("listen = [1]\n")).unwrap_err();
    assert!(
        matches!(
            err,
            ConfigError::Invalid {
                setting: "--listen",
                ..
            }
        ),
        "{err}"
    );
    for (var, bad) in [
        ("GEOBEAT_LISTEN", "localhost"),
        ("GEOBEAT_SHARDS", "0"),
        ("GEOBEAT_SHARDS", "257"),
        ("GEOBEAT_FRAME_BYTES_MAX", "1MiB"),
        ("GEOBEAT_FRAME_HEARTBEATS_MAX", "1001"),
        ("GEOBEAT_DURABILITY", "maybe"),
        ("GEOBEAT_RETENTION", "7"),
        ("GEOBEAT_LOG_LEVEL", "info,[["),
        ("GEOBEAT_IDLE_TIMEOUT_S", "1"),
    ] {
        assert!(
            resolve(&serve_args(&[]), &[(var, bad)], None).is_err(),
            "{var}={bad}"
        );
    }
    // Flags are checked by clap with the same parsers.
    let mut argv = vec!["geobeat", "serve", "--shards", "0"];
    assert!(Cli::try_parse_from(&argv).is_err());
    argv[3] = "4";
    assert!(Cli::try_parse_from(&argv).is_ok());
}

#[test]
fn log_format_from_flag_env_and_file() {
    // `text` by default; `json` from the file, the environment or the flag (which wins);
    // anything else is an error naming the setting.
    assert_eq!(
        resolve(&serve_args(&[]), &[], None).unwrap().log_format,
        LogFormat::Text
    );
    let file = Some("log_format = \"json\"\n");
    assert_eq!(
        resolve(&serve_args(&[]), &[], file).unwrap().log_format,
        LogFormat::Json
    );
    let env = [("GEOBEAT_LOG_FORMAT", "json")];
    assert_eq!(
        resolve(&serve_args(&[]), &env, None).unwrap().log_format,
        LogFormat::Json
    );
    let flag = serve_args(&["--log-format", "text"]);
    assert_eq!(
        resolve(&flag, &env, file).unwrap().log_format,
        LogFormat::Text
    );
    let err = resolve(&serve_args(&[]), &[("GEOBEAT_LOG_FORMAT", "xml")], None).unwrap_err();
    assert!(err.to_string().contains("GEOBEAT_LOG_FORMAT"), "{err}");
}

#[test]
fn unknown_toml_key_is_named() {
    // A typo in the file is an error naming the key, not silently ignored.
    let err = resolve(&serve_args(&[]), &[], Some("shard = 4\n")).unwrap_err();
    assert!(matches!(&err, ConfigError::UnknownKey { key, .. } if key == "shard"));
    assert!(err.to_string().contains("`shard`"));
    let err = resolve(&serve_args(&[]), &[], Some("shards = \n")).unwrap_err();
    assert!(matches!(err, ConfigError::FileSyntax { .. }));
}

#[test]
fn connections_must_fit_under_open_file_limit() {
    // 19,600 + 512 reserved > 20,000: refused with the largest allowed value in the message.
    let err = resolve(&serve_args(&["--connections-max", "19600"]), &[], None).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(
        err,
        ConfigError::TooManyConnections { limit: 20_000, .. }
    ));
    assert!(msg.contains("19488"), "{msg}");
    assert!(resolve(&serve_args(&["--connections-max", "19488"]), &[], None).is_ok());
}

#[test]
fn help_documents_every_setting_and_its_env_var() {
    // `serve --help` mentions each flag and its GEOBEAT_* variable.
    let mut cmd = Cli::command();
    let serve = cmd.find_subcommand_mut("serve").unwrap();
    let help = serve.render_long_help().to_string();
    for s in SETTINGS {
        assert!(help.contains(s.flag), "{} missing from help", s.flag);
        assert!(help.contains(s.env), "{} missing from help", s.env);
    }
}

#[test]
fn sink_tables_parse_with_defaults() {
    // Two `[[sinks]]` tables: every key read, defaults filled in, file order kept, and the
    // database password never shown by Debug.
    let file = r#"
shards = 2
[[sinks]]
name = "archive"
kind = "audit"
dir = "/var/lib/geobeat/audit"
compress = "zstd"
zstd_level = 9

[[sinks]]
name = "pg-main"
kind = "postgres"
url = "postgres://geo:s3cret@db.example:5432/geo"
schema = "geobeat"
batch_rows = 5000
poll_interval_ms = 250
"#;
    let c = resolve(&serve_args(&[]), &[], Some(file)).unwrap();
    assert_eq!(c.shards, 2);
    assert_eq!(
        c.sinks[0],
        SinkConfig {
            name: "archive".into(),
            kind: SinkKind::Audit {
                dir: PathBuf::from("/var/lib/geobeat/audit"),
                compress: Compression::Zstd { level: 9 },
                rotate: Rotation {
                    window_secs: 60,
                    bytes: 128 << 20,
                },
            },
            batch_rows: SINK_BATCH_ROWS_DEFAULT,
            poll_interval: Duration::from_millis(SINK_POLL_INTERVAL_MS_DEFAULT),
        }
    );
    assert_eq!(c.sinks[1].name, "pg-main");
    assert_eq!(
        (c.sinks[1].batch_rows, c.sinks[1].poll_interval),
        (5000, Duration::from_millis(250))
    );
    assert!(matches!(&c.sinks[1].kind, SinkKind::Postgres { schema, .. } if schema == "geobeat"));
    let shown = format!("{:?}", c.sinks);
    assert!(
        !shown.contains("s3cret") && shown.contains("geo:***@db.example"),
        "{shown}"
    );
    assert_eq!(
        redact_url("host=db user=geo password=x"),
        "host=db user=geo password=***"
    );
    assert!(resolve(&serve_args(&[]), &[], None)
        .unwrap()
        .sinks
        .is_empty());
    // The rotation window and size, in each accepted spelling.
    for (rotate, rotate_bytes, want) in [
        ("\"90s\"", "\"64MiB\"", (90, 64 << 20)),
        ("\"5m\"", "2097152", (300, 2 << 20)),
        ("\"1h\"", "\"1GiB\"", (3600, 1 << 30)),
        ("30", "\"1M\"", (30, 1 << 20)),
    ] {
        let file = format!(
            "[[sinks]]\nname = \"a\"\nkind = \"audit\"\ndir = \"/a\"\nrotate = {rotate}\n\
             rotate_bytes = {rotate_bytes}\n"
        );
        let c = resolve(&serve_args(&[]), &[], Some(&file)).unwrap();
        let SinkKind::Audit { rotate, .. } = c.sinks[0].kind else {
            panic!("an audit sink")
        };
        assert_eq!((rotate.window_secs, rotate.bytes), want, "{file}");
    }
}

#[test]
fn bad_sink_tables_name_the_sink_and_the_problem() {
    // Each malformed table is refused with its position, its name when known, and the fault.
    let audit = "kind = \"audit\"\ndir = \"/a\"\n";
    for (table, expect) in [
        ("kind = \"audit\"\ndir = \"/a\"", "`name` is required"),
        ("name = \"x\"\ndir = \"/a\"", "`kind` is required"),
        ("name = \"X Y\"\nkind = \"audit\"\ndir = \"/a\"", "a-z"),
        ("name = \"x\"\nkind = \"kafka\"", "\"kafka\""),
        ("name = \"x\"\nkind = \"audit\"", "needs `dir`"),
        ("name = \"x\"\nkind = \"postgres\"", "needs `url`"),
        (
            "name = \"x\"\nkind = \"postgres\"\nurl = \"postgres://h/db\"\nschema = \"A;drop\"",
            "identifier",
        ),
        (
            "name = \"x\"\nkind = \"audit\"\ndir = \"/a\"\ncompress = \"lz4\"",
            "`compress`",
        ),
        (
            "name = \"x\"\nkind = \"audit\"\ndir = \"/a\"\nbatch_rows = 0",
            "`batch_rows`",
        ),
        (
            "name = \"x\"\nkind = \"audit\"\ndir = \"/a\"\nurl = \"u\"",
            "unknown key `url`",
        ),
        (
            "name = \"x\"\nkind = \"audit\"\ndir = \"/a\"\nrotate = \"2h\"",
            "`rotate` \"2h\": must be 1s..=3600s",
        ),
        (
            "name = \"x\"\nkind = \"audit\"\ndir = \"/a\"\nrotate = \"1.5m\"",
            "expected a duration",
        ),
        (
            "name = \"x\"\nkind = \"audit\"\ndir = \"/a\"\nrotate = 0",
            "`rotate` 0",
        ),
        (
            "name = \"x\"\nkind = \"audit\"\ndir = \"/a\"\nrotate_bytes = \"10KiB\"",
            "`rotate_bytes` must be a size in 1MiB..=16GiB",
        ),
    ] {
        let file = format!("[[sinks]]\n{table}\n");
        let err = resolve(&serve_args(&[]), &[], Some(&file)).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ConfigError::Sink { index: 1, .. }), "{msg}");
        assert!(msg.contains(expect), "{table:?}: {msg}");
    }
    let twice = format!(
        "[[sinks]]\nname = \"a\"\n{audit}[[sinks]]\nname = \"a\"\nkind = \"audit\"\ndir = \"/b\"\n"
    );
    let msg = resolve(&serve_args(&[]), &[], Some(&twice))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("#2") && msg.contains("two sinks have this name"),
        "{msg}"
    );
    let same_dir = format!("[[sinks]]\nname = \"a\"\n{audit}[[sinks]]\nname = \"b\"\n{audit}");
    let msg = resolve(&serve_args(&[]), &[], Some(&same_dir))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("share this `dir`"), "{msg}");
    let msg = resolve(&serve_args(&[]), &[], Some("sinks = 3\n"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("array of tables"), "{msg}");
    let many: String = (0..=SINKS_MAX)
        .map(|i| format!("[[sinks]]\nname = \"s{i}\"\nkind = \"audit\"\ndir = \"/d{i}\"\n"))
        .collect();
    assert!(resolve(&serve_args(&[]), &[], Some(&many)).is_err());
}

#[test]
fn sink_backlog_limits_resolve() {
    // Defaults: warn at 1 GiB, no hard limit; sizes and `off` from every source; a hard limit
    // below the warning is refused naming the flag.
    let c = resolve(&serve_args(&[]), &[], None).unwrap();
    assert_eq!(
        (c.sink_backlog_warn_bytes, c.sink_backlog_max_bytes),
        (Some(1 << 30), None)
    );
    let c = resolve(
        &serve_args(&["--sink-backlog-max-bytes", "8GiB"]),
        &[("GEOBEAT_SINK_BACKLOG_WARN_BYTES", "2GiB")],
        None,
    )
    .unwrap();
    assert_eq!(
        (c.sink_backlog_warn_bytes, c.sink_backlog_max_bytes),
        (Some(2 << 30), Some(8 << 30))
    );
    let c = resolve(
        &serve_args(&[]),
        &[],
        Some("sink_backlog_warn_bytes = \"off\"\nsink_backlog_max_bytes = 4096\n"),
    )
    .unwrap();
    assert_eq!(
        (c.sink_backlog_warn_bytes, c.sink_backlog_max_bytes),
        (None, Some(4096))
    );
    let err = resolve(
        &serve_args(&["--sink-backlog-max-bytes", "1MiB"]),
        &[],
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("--sink-backlog-max-bytes") && err.contains("at least"),
        "{err}"
    );
    assert!(resolve(
        &serve_args(&[]),
        &[("GEOBEAT_SINK_BACKLOG_MAX_BYTES", "0")],
        None
    )
    .is_err());
}

#[test]
fn sinks_command_parses() {
    // `geobeat sinks` takes --data-dir, --config and --json.
    let cli = Cli::try_parse_from(["geobeat", "sinks", "--data-dir", "/d", "--json"]).unwrap();
    let Command::Sinks(a) = cli.command else {
        panic!("sinks expected")
    };
    assert_eq!(
        (a.data_dir, a.config, a.json),
        (Some(PathBuf::from("/d")), None, true)
    );
}

#[test]
fn token_and_demo_arguments_parse() {
    // Global token options work after the kind; demo takes serve flags plus its own.
    let cli =
        Cli::try_parse_from(["geobeat", "token", "device", "truck-1", "--ttl", "30d"]).unwrap();
    let Command::Token(t) = cli.command else {
        panic!("token expected")
    };
    assert_eq!(
        t.kind,
        TokenKind::Device {
            id: "truck-1".into()
        }
    );
    assert_eq!(t.ttl.as_deref(), Some("30d"));
    let cli = Cli::try_parse_from(["geobeat", "token", "--data-dir", "/tmp/x", "ops"]).unwrap();
    let Command::Token(t) = cli.command else {
        panic!("token expected")
    };
    assert_eq!(t.kind, TokenKind::Ops);
    assert_eq!(t.data_dir, Some(PathBuf::from("/tmp/x")));
    let cli = Cli::try_parse_from(["geobeat", "demo", "--devices", "50", "--shards", "2"]).unwrap();
    let Command::Demo(d) = cli.command else {
        panic!("demo expected")
    };
    assert_eq!((d.devices, d.rate_hz, d.serve.shards), (50, 1.0, Some(2)));
    assert!(Cli::try_parse_from(["geobeat", "demo", "--rate-hz", "0"]).is_err());
    Cli::command().debug_assert();
}

#[test]
fn mqtt_listen_defaults_to_loopback_1883_and_can_be_switched_off() {
    // `--mqtt-listen`: the default, `off` from the environment, an address from the file, and a
    // flag over all of them; a bad value names the setting.
    let mqtt = |args: &ServeArgs, env: &[(&str, &str)], file: Option<&str>| {
        resolve(args, env, file).unwrap().mqtt_listen
    };
    let none = ServeArgs::default();
    assert_eq!(mqtt(&none, &[], None), "127.0.0.1:1883".parse().ok());
    assert_eq!(mqtt(&none, &[("GEOBEAT_MQTT_LISTEN", "off")], None), None);
    assert_eq!(
        mqtt(&none, &[], Some("mqtt_listen = \"0.0.0.0:8883\"")),
        "0.0.0.0:8883".parse().ok()
    );
    let flag = serve_args(&["--mqtt-listen", "127.0.0.1:1999"]);
    assert_eq!(
        mqtt(&flag, &[("GEOBEAT_MQTT_LISTEN", "off")], None),
        "127.0.0.1:1999".parse().ok()
    );
    let err = resolve(&none, &[("GEOBEAT_MQTT_LISTEN", "1883")], None).unwrap_err();
    assert!(err.to_string().contains("--mqtt-listen"), "{err}");
}

#[test]
fn replicated_durability_pairs_with_nats_urls_from_any_source() {
    // `replicated` needs `--nats-url`; `--nats-url` is refused without it; URLs are checked
    // (scheme, host:port) and may come from the environment or the file like any setting.
    let c = resolve(
        &serve_args(&[
            "--durability",
            "replicated",
            "--nats-url",
            "nats://127.0.0.1:4222, 127.0.0.2:4222",
        ]),
        &[],
        None,
    )
    .unwrap();
    assert_eq!(c.durability, Durability::Replicated);
    assert_eq!(c.nats_urls, vec!["nats://127.0.0.1:4222", "127.0.0.2:4222"]);
    assert_eq!((c.nats_streams, c.nats_replicas), (3, 3));
    let c = resolve(
        &ServeArgs::default(),
        &[
            ("GEOBEAT_DURABILITY", "replicated"),
            ("GEOBEAT_NATS_STREAMS", "8"),
        ],
        Some("nats_url = \"nats://n1:4222\"\nnats_replicas = 1\n"),
    )
    .unwrap();
    assert_eq!(
        (c.nats_urls.len(), c.nats_streams, c.nats_replicas),
        (1, 8, 1)
    );
    let e = resolve(&serve_args(&["--durability", "replicated"]), &[], None).unwrap_err();
    assert!(e.to_string().contains("needs --nats-url"), "{e}");
    let e = resolve(
        &serve_args(&[]),
        &[("GEOBEAT_NATS_URL", "nats://h:1")],
        None,
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("only with --durability replicated"),
        "{e}"
    );
    for bad in ["tls://h:4222", "nats://h", "nats://:4222", "h:port", ""] {
        assert!(
            Cli::try_parse_from(["geobeat", "serve", "--nats-url", bad]).is_err(),
            "{bad:?} accepted"
        );
    }
    assert!(Cli::try_parse_from(["geobeat", "serve", "--nats-streams", "65"]).is_err());
    assert!(Cli::try_parse_from(["geobeat", "serve", "--nats-replicas", "0"]).is_err());
}

#[test]
fn dsync_write_mode_and_adaptive_linger_resolve_and_refuse_clearly() {
    // `--write-mode dsync` and `--commit-linger-adaptive-us` come from any source; the defaults
    // stay mmap and off; out-of-range lingers, dsync with relaxed durability and the two lingers
    // together are refused with a message naming the setting, the value and the fix.
    let c = resolve(&ServeArgs::default(), &[], None).unwrap();
    assert_eq!(c.write_mode, WriteMode::Mmap);
    assert_eq!(c.commit_linger_adaptive, Duration::ZERO);
    let c = resolve(
        &serve_args(&[
            "--write-mode",
            "dsync",
            "--commit-linger-adaptive-us",
            "300",
        ]),
        &[],
        None,
    )
    .unwrap();
    assert_eq!(c.write_mode, WriteMode::Dsync);
    assert_eq!(c.commit_linger_adaptive, Duration::from_micros(300));
    let c = resolve(
        &ServeArgs::default(),
        &[("GEOBEAT_COMMIT_LINGER_ADAPTIVE_US", "1000")],
        Some("write_mode = \"dsync\"\n"),
    )
    .unwrap();
    assert_eq!(c.write_mode, WriteMode::Dsync);
    assert_eq!(c.commit_linger_adaptive, Duration::from_micros(1000));
    // Replicated durability is strict locally: dsync is allowed.
    let c = resolve(
        &serve_args(&[
            "--write-mode",
            "dsync",
            "--durability",
            "replicated",
            "--nats-url",
            "nats://h:4222",
        ]),
        &[],
        None,
    )
    .unwrap();
    assert_eq!(c.write_mode, WriteMode::Dsync);
    // Out of range: the bound is in the message, from every source.
    let e = resolve(
        &ServeArgs::default(),
        &[("GEOBEAT_COMMIT_LINGER_ADAPTIVE_US", "1001")],
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("--commit-linger-adaptive-us") && e.contains("0..=1000") && e.contains("1001"),
        "{e}"
    );
    let e = Cli::try_parse_from(["geobeat", "serve", "--commit-linger-adaptive-us", "5000"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("0..=1000"), "{e}");
    let e = Cli::try_parse_from(["geobeat", "serve", "--write-mode", "osync"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("`dsync`"), "{e}");
    // dsync with relaxed durability: refused, naming both settings and the way out.
    let e = resolve(
        &serve_args(&["--durability", "relaxed"]),
        &[("GEOBEAT_WRITE_MODE", "dsync")],
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("--write-mode")
            && e.contains("GEOBEAT_WRITE_MODE")
            && e.contains("--durability strict")
            && e.contains("pwrite or mmap"),
        "{e}"
    );
    // A fixed linger and the adaptive one together: refused.
    let e = resolve(
        &serve_args(&[
            "--commit-linger-us",
            "200",
            "--commit-linger-adaptive-us",
            "300",
        ]),
        &[],
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("--commit-linger-adaptive-us") && e.contains("--commit-linger-us 200"),
        "{e}"
    );
    // `serve --help` documents both.
    let help = Cli::command()
        .find_subcommand_mut("serve")
        .unwrap()
        .render_long_help()
        .to_string();
    assert!(help.contains("--commit-linger-adaptive-us"), "{help}");
    assert!(help.contains("O_DSYNC"), "{help}");
}

#[test]
fn ownership_needs_node_id_and_advertise_together_with_replicated_durability() {
    // `--node-id` and `--advertise` turn ownership on only together, only with replicated
    // durability, and not with the ring engine; each refusal names the fix.
    let repl = [
        "--durability",
        "replicated",
        "--nats-url",
        "nats://127.0.0.1:4222",
    ];
    let with = |extra: &[&str]| {
        let mut a: Vec<&str> = repl.to_vec();
        a.extend_from_slice(extra);
        resolve(&serve_args(&a), &[], None)
    };
    let c = with(&["--node-id", "a-1", "--advertise", "10.0.0.1:8080"]).unwrap();
    let o = c.ownership.expect("ownership on");
    assert_eq!(
        (o.node_id.as_str(), o.advertise.as_str()),
        ("a-1", "10.0.0.1:8080")
    );
    assert!(with(&[]).unwrap().ownership.is_none());
    let e = with(&["--node-id", "a"]).unwrap_err();
    assert!(e.to_string().contains("needs --advertise"), "{e}");
    let e = with(&["--advertise", "h:1"]).unwrap_err();
    assert!(e.to_string().contains("needs --node-id"), "{e}");
    let e = with(&["--node-id", "a", "--advertise", "h:1", "--engine", "ring"]).unwrap_err();
    assert!(e.to_string().contains("--engine glommio"), "{e}");
    let e = resolve(
        &serve_args(&["--node-id", "a", "--advertise", "h:1"]),
        &[],
        None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("--durability replicated"), "{e}");
    for bad in ["", "a.b", "a b", &"x".repeat(65)] {
        assert!(
            Cli::try_parse_from(["geobeat", "serve", "--node-id", bad]).is_err(),
            "{bad:?} accepted"
        );
    }
    for bad in ["h", "h:0", ":80", "h:port"] {
        assert!(
            Cli::try_parse_from(["geobeat", "serve", "--advertise", bad]).is_err(),
            "{bad:?} accepted"
        );
    }
}

#[test]
fn audit_chain_is_on_by_default_and_switches_from_every_source() {
    // `--audit-chain` defaults to on; off comes from the flag, the environment or the file;
    // anything but on/off is refused naming the setting.
    assert!(
        resolve(&ServeArgs::default(), &[], None)
            .unwrap()
            .audit_chain
    );
    assert!(
        !resolve(&serve_args(&["--audit-chain", "off"]), &[], None)
            .unwrap()
            .audit_chain
    );
    assert!(
        !resolve(
            &ServeArgs::default(),
            &[("GEOBEAT_AUDIT_CHAIN", "off")],
            None
        )
        .unwrap()
        .audit_chain
    );
    assert!(
        !resolve(&ServeArgs::default(), &[], Some("audit_chain = \"off\"\n"))
            .unwrap()
            .audit_chain
    );
    let e = Cli::try_parse_from(["geobeat", "serve", "--audit-chain", "maybe"])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--audit-chain") && e.contains("on or off"),
        "{e}"
    );
}
