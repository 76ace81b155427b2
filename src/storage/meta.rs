//! The node metadata file: the actor id drawn when the data directory was created.
//!
//! Format (version 1), four text lines so an operator can read it:
//!
//! ```text
//! dynkv storage metadata
//! format_version = 1
//! actor = 0123456789abcdef
//! checksum = 89abcdef01234567
//! ```
//!
//! The checksum (FNV-1a 64 over every byte before the `checksum` line) catches a flipped
//! digit in the actor, which would otherwise silently turn this node into another actor. The
//! header and the trailing checksum line are kept by every future version, so a reader can
//! tell "corrupt" from "written by a newer build".

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::Path;

use rand::TryRngCore;
use rand::rngs::OsRng;

use super::{MetaProblem, StorageError};
use crate::core::ids::Actor;

/// Name of the metadata file inside the data directory.
pub(super) const META_FILE: &str = "node.meta";

/// The metadata format this build writes and reads.
pub(super) const META_FORMAT_VERSION: u32 = 1;

const HEADER: &str = "dynkv storage metadata";
/// The file is four short lines; anything bigger is not ours.
const MAX_META_BYTES: u64 = 4096;

/// Reads the actor from `dir`'s metadata file, or draws a new one and writes it durably if the
/// file does not exist (a new or wiped data directory).
pub(super) fn load_or_create(dir: &Path) -> Result<Actor, StorageError> {
    let path = dir.join(META_FILE);
    match read_bounded(&path) {
        Ok(bytes) => decode(&bytes).map_err(|problem| match problem {
            Decoded::Corrupt(problem) => StorageError::CorruptMeta { path, problem },
            Decoded::Unsupported(found) => StorageError::UnsupportedMetaVersion {
                path,
                found,
                supported: META_FORMAT_VERSION,
            },
        }),
        Err(source) if source.kind() == io::ErrorKind::NotFound => {
            let actor = draw_actor()?;
            write_durably(dir, &encode(actor))
                .map_err(|source| StorageError::WriteMeta { path, source })?;
            tracing::info!(actor, "created data directory identity");
            Ok(actor)
        }
        Err(source) => Err(StorageError::ReadMeta { path, source }),
    }
}

fn read_bounded(path: &Path) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::open(path)?
        .take(MAX_META_BYTES + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Draws a nonzero actor from the OS generator; zero is kept free as a "no actor" sentinel.
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

/// Writes through a temporary file, fsyncs it, renames it into place and fsyncs the
/// directory, so a crash leaves either no metadata file or a complete one.
fn write_durably(dir: &Path, contents: &str) -> io::Result<()> {
    let temporary = dir.join(format!("{META_FILE}.tmp"));
    let mut file = File::create(&temporary)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    drop(file);
    fs::rename(&temporary, dir.join(META_FILE))?;
    File::open(dir)?.sync_all()
}

fn encode(actor: Actor) -> String {
    let body = format!("{HEADER}\nformat_version = {META_FORMAT_VERSION}\nactor = {actor:016x}\n");
    let checksum = fnv1a_64(body.as_bytes());
    format!("{body}checksum = {checksum:016x}\n")
}

enum Decoded {
    Corrupt(MetaProblem),
    Unsupported(u32),
}

fn decode(bytes: &[u8]) -> Result<Actor, Decoded> {
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
    if version != META_FORMAT_VERSION {
        return Err(Decoded::Unsupported(version));
    }
    let actor = parse_hex(field(lines.next().unwrap_or_default(), "actor")?, "actor")?;
    if lines.next().is_some() {
        return Err(Corrupt(MetaProblem::UnexpectedLine));
    }
    Ok(actor)
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
    fn metadata_round_trips() {
        let text = encode(0x0123_4567_89ab_cdef);
        assert!(text.contains("actor = 0123456789abcdef\n"));
        assert!(matches!(decode(text.as_bytes()), Ok(0x0123_4567_89ab_cdef)));
    }

    #[test]
    fn damaged_metadata_is_refused() {
        let text = encode(7);
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
        let body = format!("{HEADER}\nformat_version = 2\nactor = 0000000000000007\n");
        let text = format!("{body}checksum = {:016x}\n", fnv1a_64(body.as_bytes()));
        assert!(matches!(
            decode(text.as_bytes()),
            Err(Decoded::Unsupported(2))
        ));
    }
}
