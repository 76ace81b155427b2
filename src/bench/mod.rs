//! The library part of `dynkv bench`: what a benchmark run is made of, free of any cluster.
//!
//! - [`cpu`]: CPU seconds of the nodes and the client per operation.
//! - [`keys`]: uniform and zipfian key choice from a seed (YCSB's scrambled zipfian).
//! - [`workload`]: the YCSB-style operation mixes A, B, C, W and a custom read share.
//! - [`report`]: HDR latency histograms per operation, errors by kind, the text table and the
//!   JSON document of a run.
//! - [`staleness`]: reads issued a measured gap after an acknowledged write, tallied by gap
//!   bucket (the measured counterpart of PBS t-visibility).
//! - [`svg`]: the hand-written SVG chart of a compare run.
//!
//! The driver that talks to a cluster lives in the CLI (`src/cli/bench.rs`).

pub mod cpu;
pub mod keys;
pub mod report;
pub mod staleness;
pub mod svg;
pub mod workload;
