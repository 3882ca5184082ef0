//! Reading RFC 9420 encodings where openmls exposes no accessor: the lifetime of a serialized
//! LeafNode (§7.2; only leaves with a basic credential, all of ours), and the vector framing
//! (§2.1.2) the public view's GroupInfo check walks, and its writing (a GroupInfo re-signed
//! without the ratchet tree).

/// (`not_before`, `not_after`) of a TLS-serialized LeafNode whose source is a KeyPackage;
/// `None` for a leaf from an update or commit, or bytes that do not parse.
pub(super) fn of_leaf(mut leaf: &[u8]) -> Option<(u64, u64)> {
    let r = &mut leaf;
    skip_vector(r)?; // encryption_key
    skip_vector(r)?; // signature_key
    let credential_type = u16::from_be_bytes(take(r, 2)?.try_into().ok()?);
    if credential_type != 1 {
        return None;
    }
    skip_vector(r)?; // basic credential: identity
    for _ in 0..5 {
        skip_vector(r)?; // capabilities: versions, suites, extensions, proposals, credentials
    }
    let source = take(r, 1)?[0];
    if source != 1 {
        return None;
    }
    let not_before = u64::from_be_bytes(take(r, 8)?.try_into().ok()?);
    let not_after = u64::from_be_bytes(take(r, 8)?.try_into().ok()?);
    Some((not_before, not_after))
}

/// The next `n` bytes of `r`.
pub(super) fn take<'a>(r: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if r.len() < n {
        return None;
    }
    let (head, tail) = r.split_at(n);
    *r = tail;
    Some(head)
}

/// Skips an `opaque<V>` / vector: a variable-length length (RFC 9000 style, 1, 2 or 4 bytes),
/// then that many bytes.
fn skip_vector(r: &mut &[u8]) -> Option<()> {
    vector(r).map(drop)
}

/// The contents of the `opaque<V>` / vector at the start of `r` (after its variable-length
/// length, RFC 9420 §2.1.2), which it consumes.
pub(super) fn vector<'a>(r: &mut &'a [u8]) -> Option<&'a [u8]> {
    let first = *r.first()?;
    let len = match first >> 6 {
        0 => usize::from(take(r, 1)?[0] & 0x3f),
        1 => {
            let b = take(r, 2)?;
            usize::from(u16::from_be_bytes([b[0] & 0x3f, b[1]]))
        }
        2 => {
            let b = take(r, 4)?;
            u32::from_be_bytes([b[0] & 0x3f, b[1], b[2], b[3]]) as usize
        }
        _ => return None,
    };
    take(r, len)
}

/// Appends `bytes` to `out` as an `opaque<V>` (RFC 9420 §2.1.2: the shortest variable-length
/// length, then the bytes); `None` if longer than the encoding allows (2^30 - 1).
pub(super) fn put_vector(out: &mut Vec<u8>, bytes: &[u8]) -> Option<()> {
    let len = bytes.len();
    if len < 1 << 6 {
        out.push(len as u8);
    } else if len < 1 << 14 {
        out.extend_from_slice(&(len as u16 | 0x4000).to_be_bytes());
    } else if len < 1 << 30 {
        out.extend_from_slice(&(len as u32 | 0x8000_0000).to_be_bytes());
    } else {
        return None;
    }
    out.extend_from_slice(bytes);
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_round_trip_at_each_length_size() {
        for len in [0, 1, 63, 64, 16_383, 16_384, 70_000] {
            let bytes = vec![7u8; len];
            let mut out = Vec::new();
            assert_eq!(put_vector(&mut out, &bytes), Some(()));
            let mut r = out.as_slice();
            assert_eq!(vector(&mut r), Some(bytes.as_slice()), "length {len}");
            assert!(r.is_empty());
        }
    }
}
