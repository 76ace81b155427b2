//! The `dynkv` binary: server, local dev cluster, CLI client and certificates.

mod cli;

use clap::Parser;
use std::process::ExitCode;

/// mimalloc instead of glibc's malloc: allocation and free were about a tenth of a node's
/// CPU under load with glibc (see ARCHITECTURE.md, "Profile").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
