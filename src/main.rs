//! The `geobeat` binary: parses the command line, sets up logging, runs `serve`, `token`,
//! `demo`, `sinks`, `reshard`, `migrate`, `query`, `backup`, `restore` or `cluster`, and maps failures to
//! exit codes (1: runtime failure, 2: bad configuration or usage, or a data directory that must
//! be migrated or is refused as is).
//! Everything else lives in the library.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use geobeat::config::{Cli, Command, ServeConfig};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let cfg = match args.load() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("geobeat serve: {e}");
                    return ExitCode::from(2);
                }
            };
            geobeat::logging::init(&cfg.log_level, cfg.log_format);
            match geobeat::server::run(cfg, None) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("geobeat serve: {e}");
                    // A format-1 directory is a configuration problem with a named fix.
                    let usage = matches!(
                        e,
                        geobeat::server::ServeError::DataDir {
                            source: geobeat::datadir::DataDirError::NeedsMigration { .. },
                            ..
                        }
                    );
                    ExitCode::from(if usage { 2 } else { 1 })
                }
            }
        }
        Command::Reshard(args) => {
            geobeat::logging::init("geobeat=warn", geobeat::config::LogFormat::Text);
            private_files();
            let req = geobeat::reshard::Request {
                root: geobeat::config::offline_data_dir(args.data_dir.as_ref()),
                shards: Some(args.shards as u32),
                segment_bytes: args.segment_bytes,
            };
            rewrite("reshard", &req)
        }
        Command::Migrate(args) => {
            geobeat::logging::init("geobeat=warn", geobeat::config::LogFormat::Text);
            private_files();
            let req = geobeat::reshard::Request {
                root: geobeat::config::offline_data_dir(args.data_dir.as_ref()),
                shards: None,
                segment_bytes: args.segment_bytes,
            };
            rewrite("migrate", &req)
        }
        Command::Backup(args) => {
            private_files();
            let root = geobeat::config::offline_data_dir(args.data_dir.as_ref());
            match geobeat::backup::backup(&root, &args.to) {
                Ok(r) => {
                    println!("geobeat backup: {}", r.summary(&root, &args.to));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("geobeat backup: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Command::Restore(args) => {
            private_files();
            let to = geobeat::config::offline_data_dir(args.data_dir.as_ref());
            match geobeat::backup::restore(&args.from, &to) {
                Ok(r) => {
                    println!("geobeat restore: {}", r.summary(&args.from, &to));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("geobeat restore: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Command::Audit(args) => match &args.command {
            geobeat::audit::AuditCommand::Reconcile(r) => match geobeat::audit::reconcile(r) {
                Ok(report) => {
                    print!("{}", report.render());
                    if report.differences.is_empty() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                }
                Err(e) => {
                    eprintln!("geobeat audit reconcile: {e}");
                    ExitCode::from(e.exit_code())
                }
            },
            geobeat::audit::AuditCommand::Verify(v) => match geobeat::audit::verify_args(v) {
                Ok(report) => {
                    print!("{}", report.render());
                    if report.failed() {
                        ExitCode::from(1)
                    } else {
                        ExitCode::SUCCESS
                    }
                }
                Err(e) => {
                    eprintln!("geobeat audit verify: {e}");
                    ExitCode::from(e.exit_code())
                }
            },
        },
        Command::Cluster(args) => match &args.command {
            geobeat::config::ClusterCommand::Status(s) => {
                let mut out = std::io::stdout().lock();
                ExitCode::from(geobeat::cluster::run_status(s, &mut out))
            }
        },
        Command::Query(args) => {
            let mut out = std::io::stdout().lock();
            match geobeat::client::run(&args, &mut out) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("geobeat query: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Command::History(args) => {
            let mut out = std::io::stdout().lock();
            match geobeat::client::run(&args.as_query(), &mut out) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("geobeat history: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Command::Token(args) => match geobeat::tokens::run_token_command(&args) {
            Ok(token) => {
                println!("{token}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("geobeat token: {e}");
                ExitCode::from(2)
            }
        },
        Command::Sinks(args) => match geobeat::flusher::report::run_sinks_command(&args) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("geobeat sinks: {e}");
                ExitCode::from(1)
            }
        },
        Command::Demo(args) => {
            let cfg = match args.serve.load() {
                // A demo makes its data directory as needed (`--init` implied).
                Ok(c) => ServeConfig { init: true, ..c },
                Err(e) => {
                    eprintln!("geobeat demo: {e}");
                    return ExitCode::from(2);
                }
            };
            geobeat::logging::init(&cfg.log_level, cfg.log_format);
            match demo(cfg, args.devices as usize, args.rate_hz) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("geobeat demo: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// Runs `geobeat reshard` / `geobeat migrate` and prints one line saying what happened.
fn rewrite(cmd: &str, req: &geobeat::reshard::Request) -> ExitCode {
    use geobeat::reshard::{Error, Outcome};
    match geobeat::reshard::run(req) {
        Ok(Outcome::Unchanged(msg)) => {
            println!("geobeat {cmd}: {msg}");
            ExitCode::SUCCESS
        }
        Ok(Outcome::Rewritten(r)) => {
            let secs = r.rewrite.as_secs_f64().max(1e-9);
            println!(
                "geobeat {cmd}: {} is now format 2 with {} shards (was format {} with {}): \
                 {} entries ({} bytes) rewritten in {:.3} s ({:.0} entries/s), {} sink cursor(s) \
                 moved to the new ends{}; total {:.3} s",
                req.root.display(),
                r.to_shards,
                r.from_format,
                r.from_shards,
                r.entries,
                r.bytes,
                r.rewrite.as_secs_f64(),
                r.entries as f64 / secs,
                r.sinks.len(),
                if r.sinks.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", r.sinks.join(", "))
                },
                r.elapsed.as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("geobeat {cmd}: {e}");
            ExitCode::from(if matches!(e, Error::Refused(_)) { 2 } else { 1 })
        }
    }
}

/// Runs the server in the background, waits until it is healthy, prints what to try, then runs
/// the simulated fleet until SIGINT/SIGTERM, and prints what the server answered it (the server's
/// shutdown sends each connection its final ack). Fails (exit 1) if the server refused any demo
/// heartbeat.
fn demo(cfg: ServeConfig, devices: usize, rate_hz: f64) -> Result<(), Box<dyn std::error::Error>> {
    let addr = cfg.listen;
    let data_dir = cfg.data_dir.clone();
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    // The server creates the secret (after binding its listener); the fleet reads it then.
    let secret_cfg = cfg.clone();
    let server = std::thread::spawn({
        let stop = stop.clone();
        move || geobeat::server::run(cfg, Some(stop))
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(addr).is_err() {
        if server.is_finished() || Instant::now() > deadline {
            return match server.join() {
                Ok(Err(e)) => Err(e.into()),
                _ => Err("the server did not start".into()),
            };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let secret = secret_cfg.load_secret()?;
    let ops = geobeat::auth::mint(
        &secret,
        &geobeat::auth::Scope::Ops,
        geobeat::rt::now_s() + 86_400,
    );
    println!(
        "geobeat demo: {devices} simulated devices ({rate_hz} heartbeat/s each) sending to ws://{addr}/v1/ingest\n\
         data directory: {}\n\n\
         Try:\n  \
         http://{addr}/live?token={ops}   # the live map: open it in a browser\n  \
         curl -H 'Authorization: Bearer {ops}' http://{addr}/v1/devices/{}\n  \
         cargo run --release -- token device my-device --data-dir {}   # a device token of your own\n  \
         curl http://{addr}/healthz\n\n\
         Stop with Ctrl-C.",
        data_dir.display(),
        geobeat::demo::hint_device(devices),
        data_dir.display()
    );
    let fleet = geobeat::demo::run_fleet(addr, &secret, devices, rate_hz, &stop);
    stop.store(true, Ordering::Release);
    let served = server.join().map_err(|_| "server thread panicked")?;
    let tally = fleet?;
    println!("geobeat demo: {tally}");
    served?;
    if tally.refused_total() > 0 {
        return Err(format!(
            "the server refused {} demo heartbeats",
            tally.refused_total()
        )
        .into());
    }
    Ok(())
}

/// Makes every file and directory this process creates private (0600 / 0700), as `serve` does:
/// the data directory's start check refuses anything looser (issue 20 §3).
fn private_files() {
    // SAFETY: umask only sets the process's file-creation mask.
    unsafe { libc::umask(0o077) };
}
