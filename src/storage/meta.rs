//! The node metadata file: the actor id drawn when the data directory was created, and the
//! node's incarnations (see `core::epoch`).
//!
//! Format (version 2), text lines so an operator can read it:
//!
//! ```text
//! dynkv storage metadata
//! format_version = 2
//! actor = 0123456789abcdef
//! incarnation = 0000000000000003
//! trusted_from = 0000000000000001
//! stopped_cleanly = 0000000000000000
//! checksum = 89abcdef01234567
//! ```
//!
//! The checksum (FNV-1a 64 over every byte before the `checksum` line) catches a flipped
//! digit in the actor, which would otherwise silently turn this node into another actor. The
//! header and the trailing checksum line are kept by every future version, so a reader can
//! tell "corrupt" from "written by a newer build". Version 1 files (no incarnation lines) are
//! read as a node that never stopped cleanly.
//!
//! At every open the incarnation is counted up and the file rewritten with
//! `stopped_cleanly = 0` before the store serves; a clean close (everything fsynced) writes
//! `stopped_cleanly = 1`. `trusted_from` is written as the incarnation (every start trusts only
//! its own key actors); `stopped_cleanly` is logged at the next start, for the operator.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::TryRngCore;
use rand::rngs::OsRng;

use super::engine::MemoryDisk;
use super::{MetaProblem, StorageError};
use crate::core::epoch::NodeEpoch;
use crate::core::ids::Actor;

/// Name of the metadata file inside the data directory.
pub(super) const META_FILE: &str = "node.meta";

/// The metadata format this build writes and reads.
pub(super) const META_FORMAT_VERSION: u32 = 2;

const HEADER: &str = "dynkv storage metadata";
/// The file is seven short lines; anything bigger is not ours.
const MAX_META_BYTES: u64 = 4096;

/// Where the metadata file lives: in the data directory, or on a simulated disk.
pub(super) enum MetaLocation {
    Dir(PathBuf),
    Memory(Arc<MemoryDisk>),
}

impl MetaLocation {
    /// The file's path, for error messages.
    fn path(&self) -> PathBuf {
        match self {
            MetaLocation::Dir(dir) => dir.join(META_FILE),
            MetaLocation::Memory(_) => PathBuf::from("<in-memory disk>").join(META_FILE),
        }
    }

    fn read(&self) -> io::Result<Vec<u8>> {
        match self {
            MetaLocation::Dir(dir) => read_bounded(&dir.join(META_FILE)),
            MetaLocation::Memory(disk) => disk
                .read_meta()
                .map(String::into_bytes)
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound)),
        }
    }

    fn write_durably(&self, contents: &str) -> io::Result<()> {
        match self {
            MetaLocation::Dir(dir) => write_durably(dir, contents),
            MetaLocation::Memory(disk) => {
                disk.write_meta(contents.to_string());
                Ok(())
            }
        }
    }
}

/// What the metadata file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Meta {
    actor: Actor,
    /// `(incarnation, trusted_from)` of the last start; `None` in a version 1 file.
    epoch: Option<(u64, u64)>,
    stopped_cleanly: bool,
}

/// Opens the node's identity for a new start: reads the metadata file (or draws a new actor
/// for a new or wiped data directory), counts the incarnation up, and writes the file back
/// durably, marked as not stopped cleanly, before anything is served.
pub(super) fn open_epoch(location: &MetaLocation) -> Result<NodeEpoch, StorageError> {
    let path = location.path();
    let epoch = match location.read() {
        Ok(bytes) => {
            let meta = decode(&bytes).map_err(|problem| match problem {
                Decoded::Corrupt(problem) => StorageError::CorruptMeta {
                    path: path.clone(),
                    problem,
                },
                Decoded::Unsupported(found) => StorageError::UnsupportedMetaVersion {
                    path: path.clone(),
                    found,
                    supported: META_FORMAT_VERSION,
                },
            })?;
            // A version 1 file had no incarnations: as if incarnation 0 had run.
            let previous = meta.epoch.map_or(0, |(incarnation, _)| incarnation);
            if !meta.stopped_cleanly {
                tracing::info!(
                    incarnation = previous,
                    "the last start did not stop cleanly"
                );
            }
            NodeEpoch::next(meta.actor, Some(previous), draw_random()?)
        }
        Err(source) if source.kind() == io::ErrorKind::NotFound => {
            let actor = draw_actor()?;
            tracing::info!(actor, "created data directory identity");
            NodeEpoch::next(actor, None, draw_random()?)
        }
        Err(source) => return Err(StorageError::ReadMeta { path, source }),
    };
    write_epoch(location, &epoch, false)?;
    Ok(epoch)
}

/// Writes the metadata file for `epoch`; `stopped_cleanly` once every write is durable.
pub(super) fn write_epoch(
    location: &MetaLocation,
    epoch: &NodeEpoch,
    stopped_cleanly: bool,
) -> Result<(), StorageError> {
    let meta = Meta {
        actor: epoch.base,
        epoch: Some((epoch.incarnation, epoch.trusted_from)),
        stopped_cleanly,
    };
    location
        .write_durably(&encode(&meta))
        .map_err(|source| StorageError::WriteMeta {
            path: location.path(),
            source,
        })
}

fn read_bounded(path: &Path) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::open(path)?
        .take(MAX_META_BYTES + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Draws a nonzero actor from the OS generator; zero is kept free as a "no actor" sentinel.
/// 64 random bits from the OS (a start's nonce, see `core::epoch`).
fn draw_random() -> Result<u64, StorageError> {
    OsRng
        .try_next_u64()
        .map_err(|source| StorageError::Entropy { source })
}

fn draw_actor() -> Result<Actor, StorageError> {
    loop {
        let actor = OsRng
            .try_next_u64()
            .map_err(|source| StorageError::Entropy { source })?;
        if actor != 0 {
            return Ok(actor);
        }
    }
}

/// Writes the metadata file durably (see [`write_file_durably`]).
fn write_durably(dir: &Path, contents: &str) -> io::Result<()> {
    write_file_durably(&dir.join(META_FILE), contents.as_bytes())
}

/// Writes `path` through a temporary file beside it, fsyncs that, renames it into place and
/// fsyncs the directory, so a crash or power loss leaves either the old file or the complete
/// new one, never an empty or partial file.
pub fn write_file_durably(path: &Path, contents: &[u8]) -> io::Result<()> {
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut temporary_name = file_name.to_os_string();
    temporary_name.push(".tmp");
    let temporary = path.with_file_name(temporary_name);
    let mut file = File::create(&temporary)?;
    file.write_all(contents)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&temporary, path)?;
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

fn encode(meta: &Meta) -> String {
    let (incarnation, trusted_from) = meta.epoch.unwrap_or((0, 0));
    let body = format!(
        "{HEADER}\nformat_version = {META_FORMAT_VERSION}\nactor = {:016x}\nincarnation = {incarnation:016x}\ntrusted_from = {trusted_from:016x}\nstopped_cleanly = {:016x}\n",
        meta.actor,
        u64::from(meta.stopped_cleanly)
    );
    let checksum = fnv1a_64(body.as_bytes());
    format!("{body}checksum = {checksum:016x}\n")
}

enum Decoded {
    Corrupt(MetaProblem),
    Unsupported(u32),
}

fn decode(bytes: &[u8]) -> Result<Meta, Decoded> {
    use Decoded::Corrupt;
    if bytes.len() as u64 > MAX_META_BYTES {
        return Err(Corrupt(MetaProblem::TooLarge));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| Corrupt(MetaProblem::NotText))?;
    let body_and_checksum = text
        .strip_suffix('\n')
        .ok_or(Corrupt(MetaProblem::Truncated))?;
    let (body, checksum_line) = body_and_checksum
        .rsplit_once('\n')
        .ok_or(Corrupt(MetaProblem::Truncated))?;
    let mut lines = body.split('\n');
    if lines.next() != Some(HEADER) {
        return Err(Corrupt(MetaProblem::WrongHeader));
    }
    let stored_checksum = field(checksum_line, "checksum")?;
    let body_with_newline = &text[..body.len() + 1];
    if parse_hex(stored_checksum, "checksum")? != fnv1a_64(body_with_newline.as_bytes()) {
        return Err(Corrupt(MetaProblem::ChecksumMismatch));
    }
    let version_text = field(lines.next().unwrap_or_default(), "format_version")?;
    let version: u32 = version_text.parse().map_err(|_| {
        Corrupt(MetaProblem::InvalidField {
            field: "format_version",
        })
    })?;
    if version != 1 && version != META_FORMAT_VERSION {
        return Err(Decoded::Unsupported(version));
    }
    let mut next_hex = |name: &'static str| -> Result<u64, Decoded> {
        parse_hex(field(lines.next().unwrap_or_default(), name)?, name)
    };
    let actor = next_hex("actor")?;
    let (epoch, stopped_cleanly) = if version == 1 {
        (None, false)
    } else {
        let incarnation = next_hex("incarnation")?;
        let trusted_from = next_hex("trusted_from")?;
        let stopped_cleanly = match next_hex("stopped_cleanly")? {
            0 => false,
            1 => true,
            _ => {
                return Err(Decoded::Corrupt(MetaProblem::InvalidField {
                    field: "stopped_cleanly",
                }));
            }
        };
        if trusted_from > incarnation {
            return Err(Decoded::Corrupt(MetaProblem::InvalidField {
                field: "trusted_from",
            }));
        }
        (Some((incarnation, trusted_from)), stopped_cleanly)
    };
    if lines.next().is_some() {
        return Err(Corrupt(MetaProblem::UnexpectedLine));
    }
    Ok(Meta {
        actor,
        epoch,
        stopped_cleanly,
    })
}

/// The value of a `name = value` line.
fn field<'line>(line: &'line str, name: &'static str) -> Result<&'line str, Decoded> {
    line.strip_prefix(name)
        .and_then(|rest| rest.strip_prefix(" = "))
        .ok_or(Decoded::Corrupt(MetaProblem::MissingField { field: name }))
}

fn parse_hex(text: &str, name: &'static str) -> Result<u64, Decoded> {
    if text.len() != 16 {
        return Err(Decoded::Corrupt(MetaProblem::InvalidField { field: name }));
    }
    u64::from_str_radix(text, 16)
        .map_err(|_| Decoded::Corrupt(MetaProblem::InvalidField { field: name }))
}

fn fnv1a_64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(PRIME)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_durable_write_replaces_the_file_whole_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("members");
        write_file_durably(&path, b"first").unwrap();
        write_file_durably(&path, b"second, longer").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second, longer");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("members")]);
    }

    fn meta(actor: Actor) -> Meta {
        Meta {
            actor,
            epoch: Some((3, 1)),
            stopped_cleanly: true,
        }
    }

    #[test]
    fn metadata_round_trips() {
        let text = encode(&meta(0x0123_4567_89ab_cdef));
        assert!(text.contains("actor = 0123456789abcdef\n"));
        assert!(
            matches!(decode(text.as_bytes()), Ok(decoded) if decoded == meta(0x0123_4567_89ab_cdef))
        );
    }

    #[test]
    fn version_1_files_are_read_as_an_unclean_stop() {
        let body = format!("{HEADER}\nformat_version = 1\nactor = 0000000000000007\n");
        let text = format!("{body}checksum = {:016x}\n", fnv1a_64(body.as_bytes()));
        let decoded = decode(text.as_bytes()).ok().expect("version 1 is read");
        assert_eq!(decoded.actor, 7);
        assert_eq!(decoded.epoch, None);
        assert!(!decoded.stopped_cleanly);
    }

    #[test]
    fn each_open_is_a_new_incarnation_that_trusts_only_itself() {
        let dir = tempfile::tempdir().unwrap();
        let location = MetaLocation::Dir(dir.path().to_path_buf());
        let first = open_epoch(&location).unwrap();
        assert_eq!((first.incarnation, first.trusted_from), (1, 1));
        write_epoch(&location, &first, true).unwrap();
        // A clean close keeps no trust either: the directory may be a restored backup.
        let clean = open_epoch(&location).unwrap();
        assert_eq!(clean.base, first.base);
        assert_eq!((clean.incarnation, clean.trusted_from), (2, 2));
        let unclean = open_epoch(&location).unwrap();
        assert_eq!((unclean.incarnation, unclean.trusted_from), (3, 3));
        // Every start draws its own nonce.
        assert_ne!(first.nonce, clean.nonce);
        assert_ne!(clean.nonce, unclean.nonce);
    }

    #[test]
    fn damaged_metadata_is_refused() {
        let text = encode(&meta(7));
        let flipped = text.replace("actor = 0000000000000007", "actor = 0000000000000006");
        assert!(matches!(
            decode(flipped.as_bytes()),
            Err(Decoded::Corrupt(MetaProblem::ChecksumMismatch))
        ));
        assert!(matches!(
            decode(&text.as_bytes()[..text.len() - 5]),
            Err(Decoded::Corrupt(MetaProblem::Truncated))
        ));
        assert!(matches!(
            decode(b"garbage\n"),
            Err(Decoded::Corrupt(MetaProblem::Truncated))
        ));
        assert!(matches!(
            decode(b"\xff\xfe\n"),
            Err(Decoded::Corrupt(MetaProblem::NotText))
        ));
    }

    #[test]
    fn newer_format_versions_are_reported_as_such() {
        let body = format!("{HEADER}\nformat_version = 3\nactor = 0000000000000007\n");
        let text = format!("{body}checksum = {:016x}\n", fnv1a_64(body.as_bytes()));
        assert!(matches!(
            decode(text.as_bytes()),
            Err(Decoded::Unsupported(3))
        ));
    }
}
