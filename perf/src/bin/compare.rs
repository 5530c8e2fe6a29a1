//! `geobeat-compare` entry point: parse flags, run the comparison, map the outcome to an exit
//! code (0 done and clean, 1 could not run, 2 bad flags, 3 ran but some run failed or was
//! unclean and `--fail-on-errors` or `--quick` was given).

use std::process::ExitCode;

use clap::Parser as _;
use geobeat_perf::compare::{self, CompareArgs, CompareError};

fn main() -> ExitCode {
    let args = CompareArgs::parse();
    let strict = args.fail_on_errors || args.quick;
    match compare::run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) if strict => {
            eprintln!("geobeat-compare: some runs failed or were unclean (see the table above)");
            ExitCode::from(3)
        }
        Ok(false) => ExitCode::SUCCESS,
        Err(CompareError::Invalid(message)) => {
            eprintln!("geobeat-compare: {message}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("geobeat-compare: {e}");
            ExitCode::from(1)
        }
    }
}
