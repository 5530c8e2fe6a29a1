//! `geobeat-subload` entry point: parse flags, raise the open-file limit, run the subscribers,
//! print the report and optionally write the JSON summary. Exit codes: 0 run completed, 1 run
//! failed, 2 bad flags, 3 run completed but unclean (`--fail-on-errors`).

use std::process::ExitCode;

use clap::Parser as _;
use geobeat_perf::subload::{self, SubPlan, SubloadArgs};
use geobeat_perf::sys;

fn main() -> ExitCode {
    let args = SubloadArgs::parse();
    if let Err(e) = sys::raise_nofile_limit() {
        eprintln!("geobeat-subload: cannot raise the open-file limit: {e}");
    }
    let plan = match SubPlan::new(args) {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("geobeat-subload: {e}");
            return ExitCode::from(2);
        }
    };
    eprintln!("{}", plan.describe());
    let summary = match subload::run(&plan) {
        Ok(summary) => summary,
        Err(e) => {
            eprintln!("geobeat-subload: {e}");
            return ExitCode::from(1);
        }
    };
    println!("{}", summary.render());
    if let Some(path) = &plan.args.json_out {
        let json = serde_json::to_string_pretty(&summary).expect("summaries always serialize");
        if let Err(e) = std::fs::write(path, json + "\n") {
            eprintln!("geobeat-subload: cannot write {}: {e}", path.display());
            return ExitCode::from(1);
        }
    }
    let problems = summary.problems();
    if plan.args.fail_on_errors && !problems.is_empty() {
        eprintln!("geobeat-subload: unclean run: {}", problems.join(", "));
        return ExitCode::from(3);
    }
    ExitCode::SUCCESS
}
