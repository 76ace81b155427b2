//! Process-wide counters that the node bumps and `/stats` reads back (the `metrics` facade
//! only writes). Each is also recorded through `metrics` for `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};

static READ_REPAIRS: AtomicU64 = AtomicU64::new(0);

/// One stale replica sent the merged object after a get.
pub fn record_read_repair() {
    READ_REPAIRS.fetch_add(1, Ordering::Relaxed);
    metrics::counter!("dynkv_read_repairs_total").increment(1);
}

pub fn read_repairs() -> u64 {
    READ_REPAIRS.load(Ordering::Relaxed)
}
