//! `geobeat-floor` entry point: parse flags, raise the open-file limit, start the shards and
//! serve until killed. Exit codes: 1 if the server cannot start, 2 for bad flags.

use std::process::ExitCode;

use clap::Parser as _;
use geobeat_perf::floor::{FloorArgs, FloorConfig, FloorServer};
use geobeat_perf::sys;

fn main() -> ExitCode {
    let args = FloorArgs::parse();
    if let Err(e) = sys::raise_nofile_limit() {
        eprintln!("geobeat-floor: cannot raise the open-file limit: {e}");
    }
    let config = match FloorConfig::from_args(&args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("geobeat-floor: {e}");
            return ExitCode::from(2);
        }
    };
    let shards = config.shards;
    let server = match FloorServer::start(config) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("geobeat-floor: {e}");
            return ExitCode::from(1);
        }
    };
    // Scripts parse this line to learn the port when listening on port 0.
    println!(
        "geobeat-floor listening on {} with {shards} shard(s)",
        server.local_addr()
    );
    match server.join() {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("geobeat-floor: {e}");
            ExitCode::from(1)
        }
    }
}
