//! The `dynkv` binary: server, local dev cluster, CLI client and certificates.

mod cli;

use clap::Parser;
use std::process::ExitCode;

/// mimalloc instead of glibc's malloc: allocation and free were about a tenth of a node's
/// CPU under load with glibc (see ARCHITECTURE.md, "Profile").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc v3's `mimalloc.h` (`mi_option_e`); the bindings of
/// libmimalloc-sys 0.1.49 name no constant for it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// mimalloc v3 keeps memory freed by the program for `purge_delay` (1 s by default) before it
/// gives it back to the OS. Under a flood of large values, memory freed and not yet returned
/// took a node up to 30 MiB past the bound its limits set (`tests/flood.rs`: peaks of up to
/// 458 MiB against 428, failing about one run in four; with immediate purging, 8 runs peaked at
/// 250-357). Returning it at once cost nothing measurable (`benches/ab.sh`, 4 runs of A:
/// 80.4 -> 78.1 µs/op; 3 of C: 16.0 -> 16.0). An operator's `MIMALLOC_PURGE_DELAY` still wins.
fn return_freed_memory_at_once() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option of the allocator; mimalloc reads options atomically,
        // so this is sound at any time, and here it runs before any thread is started.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    }
}

fn main() -> ExitCode {
    return_freed_memory_at_once();
    match cli::run(cli::Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // The error chain, one line, without a backtrace: these are user-facing messages.
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
