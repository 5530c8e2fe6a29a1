//! `geobeat-load` entry point: parse flags, raise the open-file limit, run (in this process or
//! over child processes), print the report and optionally write the JSON summary. Exit codes:
//! 0 run completed, 1 run failed, 2 bad flags, 3 run completed but unclean (`--fail-on-errors`).

use std::process::ExitCode;

use clap::Parser as _;
use geobeat_perf::load::{self, report, LoadArgs, Plan};
use geobeat_perf::sys;

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    let args = LoadArgs::parse_from(&argv);
    if let Err(e) = sys::raise_nofile_limit() {
        eprintln!("geobeat-load: cannot raise the open-file limit: {e}");
    }
    let plan = match Plan::new(args) {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("geobeat-load: {e}");
            return ExitCode::from(2);
        }
    };
    let child = plan.args.child;
    let json_out = plan.args.json_out.clone();
    let json_histograms = plan.args.json_histograms;
    let fail_on_errors = plan.args.fail_on_errors;
    if !child {
        eprintln!("{}", report::describe(&plan));
    }
    let summary = match load::run_processes(plan, &argv) {
        Ok(summary) => summary,
        Err(e) => {
            eprintln!("geobeat-load: {e}");
            return ExitCode::from(1);
        }
    };
    if child {
        println!("{}", summary.to_line());
        return ExitCode::SUCCESS;
    }
    println!("{}", report::render(&summary));
    if let Some(path) = json_out {
        let mut public = summary.clone();
        if !json_histograms {
            public.histogram_v2_base64 = None;
            public.send_lag_v2_base64 = None;
            public.service_v2_base64 = None;
        }
        let json = serde_json::to_string_pretty(&public).expect("summaries always serialize");
        if let Err(e) = std::fs::write(&path, json + "\n") {
            eprintln!("geobeat-load: cannot write {}: {e}", path.display());
            return ExitCode::from(1);
        }
    }
    let problems = summary.problems();
    if fail_on_errors && !problems.is_empty() {
        eprintln!("geobeat-load: unclean run: {}", problems.join(", "));
        return ExitCode::from(3);
    }
    ExitCode::SUCCESS
}
