//! The state file's layout: a header, then frames appended one per save.
//!
//! `"QPQSTATE" | version u32 = 2`, then frames `len u32 | check [8] | body`, where `check` is the
//! first 8 bytes of SHA-256 over `body` and `body` is a sequence of operations:
//!
//! - `1 | seed [32] | suite u8`: the device identity (first in the first frame);
//! - `2 | len u32 | meta`: name, inbox cursor and groups' metadata, replacing the previous;
//! - `3 | key_len u16 | key | value_len u32 | value`: an MLS storage entry written;
//! - `4 | key_len u16 | key`: an MLS storage entry deleted.
//!
//! All integers big-endian. A frame is one save: replaying the frames in order gives the state
//! of the last save whose frame is complete. Only the last frame may be incomplete or fail its
//! check (a write torn by a crash); it is ignored. A bad frame with more after it is corruption.

use std::collections::HashMap;

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// File magic.
pub(super) const MAGIC: &[u8; 8] = b"QPQSTATE";
/// The version this client writes and reads.
pub(super) const VERSION: u32 = 2;
/// Header bytes: magic and version.
pub(super) const HEADER_LEN: usize = 12;
const FRAME_HEAD: usize = 12;

const OP_IDENTITY: u8 = 1;
const OP_META: u8 = 2;
const OP_PUT: u8 = 3;
const OP_DELETE: u8 = 4;

/// Why a file could not be replayed.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Unreadable {
    /// Not a state file, or damaged before its last frame.
    Corrupt,
    /// A state file of another version.
    Version(u32),
}

/// A state file's contents after replaying its frames.
#[derive(Default)]
pub(super) struct Replayed {
    /// The identity seed and suite byte.
    pub(super) identity: Option<(Zeroizing<[u8; 32]>, u8)>,
    /// The last metadata written.
    pub(super) meta: Option<Vec<u8>>,
    /// The MLS storage entries.
    pub(super) mls: HashMap<Vec<u8>, Zeroizing<Vec<u8>>>,
    /// The last frame was torn (incomplete or failing its check) and was ignored.
    pub(super) torn: bool,
}

/// The file header.
pub(super) fn header() -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..].copy_from_slice(&VERSION.to_be_bytes());
    h
}

/// A frame body being built: operations appended in order.
#[derive(Default)]
pub(super) struct Body(Zeroizing<Vec<u8>>);

impl Body {
    /// A body with room for `capacity` bytes of operations.
    pub(super) fn with_capacity(capacity: usize) -> Self {
        Self(Zeroizing::new(Vec::with_capacity(FRAME_HEAD + capacity)))
    }

    fn start(&mut self) {
        if self.0.is_empty() {
            self.0.extend_from_slice(&[0u8; FRAME_HEAD]);
        }
    }

    /// Whether no operation was added.
    pub(super) fn is_empty(&self) -> bool {
        self.0.len() <= FRAME_HEAD
    }

    pub(super) fn identity(&mut self, seed: &[u8; 32], suite: u8) {
        self.start();
        self.0.push(OP_IDENTITY);
        self.0.extend_from_slice(seed);
        self.0.push(suite);
    }

    pub(super) fn meta(&mut self, meta: &[u8]) -> Option<()> {
        self.start();
        self.0.push(OP_META);
        self.0
            .extend_from_slice(&u32::try_from(meta.len()).ok()?.to_be_bytes());
        self.0.extend_from_slice(meta);
        Some(())
    }

    pub(super) fn put(&mut self, key: &[u8], value: &[u8]) -> Option<()> {
        self.start();
        self.0.push(OP_PUT);
        self.0
            .extend_from_slice(&u16::try_from(key.len()).ok()?.to_be_bytes());
        self.0.extend_from_slice(key);
        self.0
            .extend_from_slice(&u32::try_from(value.len()).ok()?.to_be_bytes());
        self.0.extend_from_slice(value);
        Some(())
    }

    pub(super) fn delete(&mut self, key: &[u8]) -> Option<()> {
        self.start();
        self.0.push(OP_DELETE);
        self.0
            .extend_from_slice(&u16::try_from(key.len()).ok()?.to_be_bytes());
        self.0.extend_from_slice(key);
        Some(())
    }

    /// The complete frame: length and check filled in.
    pub(super) fn into_frame(mut self) -> Option<Zeroizing<Vec<u8>>> {
        self.start();
        let len = u32::try_from(self.0.len() - FRAME_HEAD).ok()?;
        let check = Sha256::digest(&self.0[FRAME_HEAD..]);
        self.0[..4].copy_from_slice(&len.to_be_bytes());
        self.0[4..FRAME_HEAD].copy_from_slice(&check[..8]);
        Some(self.0)
    }
}

/// Replays a whole state file.
pub(super) fn replay(bytes: &[u8]) -> Result<Replayed, Unreadable> {
    let (head, mut rest) = bytes
        .split_at_checked(HEADER_LEN)
        .ok_or(Unreadable::Corrupt)?;
    if &head[..8] != MAGIC {
        return Err(Unreadable::Corrupt);
    }
    let version = u32::from_be_bytes([head[8], head[9], head[10], head[11]]);
    if version != VERSION {
        return Err(Unreadable::Version(version));
    }
    let mut out = Replayed::default();
    while !rest.is_empty() {
        let Some(body) = next_frame(&mut rest) else {
            // Only the last frame may be torn: a torn frame is one whose declared end is at or
            // past the end of the file (its length was written, its body was not), or one with
            // nothing after it.
            let declared_end = rest
                .get(..4)
                .map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize + FRAME_HEAD);
            if declared_end.is_none_or(|end| end >= rest.len()) {
                out.torn = true;
                break;
            }
            return Err(Unreadable::Corrupt);
        };
        apply(body, &mut out).ok_or(Unreadable::Corrupt)?;
    }
    if out.identity.is_none() {
        return Err(Unreadable::Corrupt);
    }
    Ok(out)
}

/// The next complete frame whose check passes; `None` leaves `rest` where it was.
fn next_frame<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (head, after) = rest.split_at_checked(FRAME_HEAD)?;
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let (body, after) = after.split_at_checked(len)?;
    if Sha256::digest(body)[..8] != head[4..FRAME_HEAD] {
        return None;
    }
    *rest = after;
    Some(body)
}

fn apply(mut body: &[u8], out: &mut Replayed) -> Option<()> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, tail) = b.split_at_checked(n)?;
        *b = tail;
        Some(head)
    }
    fn len16(b: &mut &[u8]) -> Option<usize> {
        Some(usize::from(u16::from_be_bytes(
            take(b, 2)?.try_into().ok()?,
        )))
    }
    fn len32(b: &mut &[u8]) -> Option<usize> {
        usize::try_from(u32::from_be_bytes(take(b, 4)?.try_into().ok()?)).ok()
    }
    while let Some((&op, rest)) = body.split_first() {
        body = rest;
        match op {
            OP_IDENTITY => {
                let seed: [u8; 32] = take(&mut body, 32)?.try_into().ok()?;
                let suite = take(&mut body, 1)?[0];
                out.identity = Some((Zeroizing::new(seed), suite));
            }
            OP_META => {
                let n = len32(&mut body)?;
                out.meta = Some(take(&mut body, n)?.to_vec());
            }
            OP_PUT => {
                let n = len16(&mut body)?;
                let key = take(&mut body, n)?.to_vec();
                let n = len32(&mut body)?;
                let value = Zeroizing::new(take(&mut body, n)?.to_vec());
                out.mls.insert(key, value);
            }
            OP_DELETE => {
                let n = len16(&mut body)?;
                out.mls.remove(take(&mut body, n)?);
            }
            _ => return None,
        }
    }
    Some(())
}
