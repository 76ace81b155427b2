//! Free space on the data directory's filesystem, and the guard that refuses writes when it
//! runs low (`storage.min_free_mib`): a full disk must not turn into failed fsyncs (which stop
//! the node) or half-written batches, and reads must keep working while it is full.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Bytes available to this (unprivileged) process on the filesystem holding `path`.
pub fn available_bytes(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let mut bytes = path.as_os_str().as_bytes().to_vec();
    bytes.push(0);
    let path = std::ffi::CStr::from_bytes_with_nul(&bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is NUL-terminated and `stats` points to writable memory of the right
    // type; statvfs initializes it when it returns 0.
    let result = unsafe { libc::statvfs(path.as_ptr(), stats.as_mut_ptr()) };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled `stats`.
    let stats = unsafe { stats.assume_init() };
    // The field types are u64 on 64-bit Linux and narrower elsewhere.
    #[allow(clippy::useless_conversion)]
    let (blocks, block_bytes) = (u64::from(stats.f_bavail), u64::from(stats.f_frsize));
    Ok(blocks.saturating_mul(block_bytes))
}

/// Whether the data directory has room for writes, refreshed by [`SpaceGuard::refresh`].
#[derive(Debug)]
pub struct SpaceGuard {
    dir: PathBuf,
    min_free_bytes: u64,
    full: AtomicBool,
    free_bytes: AtomicU64,
}

impl SpaceGuard {
    pub fn new(dir: PathBuf, min_free_bytes: u64) -> Self {
        let guard = SpaceGuard {
            dir,
            min_free_bytes,
            full: AtomicBool::new(false),
            free_bytes: AtomicU64::new(u64::MAX),
        };
        guard.refresh();
        guard
    }

    /// Measures the free space again; returns whether writes are refused.
    pub fn refresh(&self) -> bool {
        match available_bytes(&self.dir) {
            Ok(free) => {
                self.free_bytes.store(free, Ordering::Relaxed);
                let full = free < self.min_free_bytes;
                let was_full = self.full.swap(full, Ordering::Relaxed);
                if full && !was_full {
                    tracing::warn!(dir = %self.dir.display(), free, min_free = self.min_free_bytes, "disk nearly full: refusing writes until space returns");
                } else if was_full && !full {
                    tracing::info!(dir = %self.dir.display(), free, "disk space is back: accepting writes");
                }
                full
            }
            Err(error) => {
                // Unknown space is not a reason to refuse: fsync failures still stop the node.
                tracing::warn!(dir = %self.dir.display(), error = %error, "cannot measure free space");
                self.full.load(Ordering::Relaxed)
            }
        }
    }

    /// `None` when writes may go ahead, else the reason they may not.
    pub fn refusal(&self) -> Option<String> {
        if !self.full.load(Ordering::Relaxed) {
            return None;
        }
        Some(format!(
            "insufficient space: {} bytes free in {}, below storage.min_free_mib ({} MiB); writes resume when space returns",
            self.free_bytes.load(Ordering::Relaxed),
            self.dir.display(),
            self.min_free_bytes / (1024 * 1024)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space_is_measured_and_a_reserve_above_it_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let free = available_bytes(dir.path()).unwrap();
        assert!(free > 0);
        let roomy = SpaceGuard::new(dir.path().to_path_buf(), 0);
        assert_eq!(roomy.refusal(), None);
        let cramped = SpaceGuard::new(dir.path().to_path_buf(), u64::MAX);
        let reason = cramped.refusal().expect("no disk has u64::MAX bytes free");
        assert!(reason.contains("insufficient space"), "{reason}");
        assert!(reason.contains("storage.min_free_mib"), "{reason}");
        assert!(available_bytes(Path::new("/no/such/dir")).is_err());
    }
}
