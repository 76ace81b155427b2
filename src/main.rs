//! The `dynkv` binary: server, local dev cluster, CLI client and certificates.

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    match cli::run(cli::Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // The error chain, one line, without a backtrace: these are user-facing messages.
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
