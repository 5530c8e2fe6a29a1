//! `geobeat-plot <results dir>`: redraws the SVG plots of a comparison run from its
//! `raw.jsonl` and `info.json` (exit 0 done, 1 unreadable input or drawing failed, 2 bad usage).

use std::path::PathBuf;
use std::process::ExitCode;

use geobeat_perf::compare::systems::System;
use geobeat_perf::compare::{Row, RunInfo};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir] = args.as_slice() else {
        eprintln!("usage: geobeat-plot <results dir holding raw.jsonl and info.json>");
        return ExitCode::from(2);
    };
    let dir = PathBuf::from(dir);
    let read = |name: &str| std::fs::read_to_string(dir.join(name));
    let (Ok(raw), Ok(info)) = (read("raw.jsonl"), read("info.json")) else {
        eprintln!(
            "geobeat-plot: cannot read raw.jsonl and info.json in {}",
            dir.display()
        );
        return ExitCode::from(1);
    };
    let info: RunInfo = match serde_json::from_str(&info) {
        Ok(info) => info,
        Err(e) => {
            eprintln!("geobeat-plot: info.json: {e}");
            return ExitCode::from(1);
        }
    };
    let mut rows = Vec::new();
    for (n, line) in raw
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        match serde_json::from_str::<Row>(line) {
            Ok(row) => rows.push(row),
            Err(e) => {
                eprintln!("geobeat-plot: raw.jsonl line {}: {e}", n + 1);
                return ExitCode::from(1);
            }
        }
    }
    let systems: Vec<System> = info
        .systems
        .iter()
        .filter_map(|s| System::from_name(s))
        .collect();
    match geobeat_perf::plot::draw_all(&dir, &rows, &info.workloads, &systems) {
        Ok(written) => {
            for path in written {
                println!("{}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("geobeat-plot: {e}");
            ExitCode::from(1)
        }
    }
}
