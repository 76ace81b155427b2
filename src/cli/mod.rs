//! Command-line interface. Each subcommand lives in its own module.

mod admin;
mod bench;
mod cert;
mod client;
mod demo;
mod dev;
mod server;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "dynkv",
    version,
    about = "dynkv: a leaderless, eventually consistent, Dynamo-style key-value store",
    long_about = "dynkv: a leaderless, eventually consistent, Dynamo-style key-value store.\n\nStart a local cluster with `dynkv dev`, then use `dynkv put`, `dynkv get` and `dynkv delete` from another shell."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one node.
    Server(server::ServerArgs),
    /// Run a local cluster on loopback, one process per node.
    Dev(dev::DevArgs),
    /// Read a key: prints every sibling and the context to write back with.
    Get(client::GetArgs),
    /// Write a value (with --context to supersede what a read returned).
    Put(client::PutArgs),
    /// Delete a key (with --context to delete exactly what a read returned).
    Delete(client::DeleteArgs),
    /// Check that a node answers.
    Ping(client::PingArgs),
    /// Operator commands: members, status.
    #[command(subcommand)]
    Admin(admin::AdminCommand),
    /// Drive a cluster with YCSB-style workloads, or compare W/R configurations (`bench compare`).
    Bench(Box<bench::BenchArgs>),
    /// Create a cluster CA and node certificates.
    #[command(subcommand)]
    Cert(cert::CertCommand),
    /// Scripted stories on a throwaway local cluster (`demo rebalance`).
    #[command(subcommand)]
    Demo(demo::DemoCommand),
}

/// A multi-threaded runtime with `worker_threads` threads (0: tokio's default, one per core
/// or `TOKIO_WORKER_THREADS`).
fn build_runtime(worker_threads: usize) -> Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if worker_threads > 0 {
        builder.worker_threads(worker_threads);
    }
    builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

pub fn run(cli: Cli) -> Result<()> {
    // Only a node reads how many runtime threads it wants (from its config); every other
    // command takes tokio's default.
    let runtime = || build_runtime(0);
    match cli.command {
        Command::Server(args) => {
            let (config, print_only) = server::effective_config(args)?;
            init_logging();
            build_runtime(config.worker_threads)?.block_on(server::run(config, print_only))
        }
        Command::Dev(args) => {
            init_logging();
            runtime()?.block_on(dev::run(args))
        }
        Command::Get(args) => runtime()?.block_on(client::get(args)),
        Command::Put(args) => runtime()?.block_on(client::put(args)),
        Command::Delete(args) => runtime()?.block_on(client::delete(args)),
        Command::Ping(args) => runtime()?.block_on(client::ping(args)),
        Command::Admin(command) => runtime()?.block_on(admin::run(command)),
        // One thread drives every worker of the bench, as redis-benchmark's one event loop
        // does: the closed-loop workers wait on the network, and a second runtime thread
        // only adds wake-ups between the two (measured: the client's CPU per workload A
        // operation fell from 14.5 to 11.8 µs on one thread).
        Command::Bench(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?
            .block_on(bench::run(args)),
        Command::Cert(command) => cert::run(command),
        Command::Demo(command) => runtime()?.block_on(demo::run(command)),
    }
}

/// Logs go to stderr as spans and fields; `RUST_LOG` overrides the default level (info).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,quinn=warn,fjall=warn,lsm_tree=warn")
    });
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}
