//! The `dynkv` binary: server, local dev cluster, CLI client and certificates.

mod cli;

use anyhow::Result;
use clap::Parser;

fn main() -> Result<()> {
    cli::run(cli::Cli::parse())
}
