//! Commits the client library never sends, made at the wire level as a member holding its own
//! keys could: a validly signed commit with a bad confirmation tag, and the GroupInfo to go
//! with it re-signed, which the server's public view cannot tell apart from honest ones
//! (ADR 0012, ADR 0015). Classical suite only (32-byte tags, Ed25519 signatures).

use anyhow::{Context, Result, bail, ensure};
use openmls_traits::signatures::Signer as _;

use quicproquo_core::mls::MlsIdentity;

/// An RFC 9420 variable-length vector header.
pub fn put_vec(out: &mut Vec<u8>, bytes: &[u8]) {
    let n = bytes.len();
    if n < 64 {
        out.push(n as u8);
    } else if n < 16384 {
        out.extend_from_slice(&(0x4000 | n as u16).to_be_bytes());
    } else {
        out.extend_from_slice(&(0x8000_0000 | n as u32).to_be_bytes());
    }
    out.extend_from_slice(bytes);
}

/// The (start, end) of the content of the variable-length vector at `at`.
fn vec_at(b: &[u8], at: usize) -> Result<(usize, usize)> {
    let first = *b.get(at).context("vector header past the end")?;
    let (len, header) = match first >> 6 {
        0 => (usize::from(first & 0x3f), 1),
        1 => {
            let h = b.get(at..at + 2).context("short vector header")?;
            (usize::from(u16::from_be_bytes([h[0], h[1]]) & 0x3fff), 2)
        }
        2 => {
            let h = b.get(at..at + 4).context("short vector header")?;
            let n = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) & 0x3fff_ffff;
            (usize::try_from(n)?, 4)
        }
        _ => bail!("bad vector header"),
    };
    ensure!(at + header + len <= b.len(), "vector past the end");
    Ok((at + header, at + header + len))
}

/// Signs `content` with `signer`'s leaf key under the MLS `label` (SignWithLabel).
fn sign_with_label(signer: &MlsIdentity, label: &str, content: &[u8]) -> Result<Vec<u8>> {
    let mut sign_content = Vec::new();
    put_vec(&mut sign_content, format!("MLS 1.0 {label}").as_bytes());
    put_vec(&mut sign_content, content);
    signer
        .signer()
        .sign(&sign_content)
        .map_err(|e| anyhow::anyhow!("signing: {e:?}"))
}

/// `commit` (a PublicMessage commit) with the last byte of its confirmation tag flipped, and
/// `group_info` (its new epoch's GroupInfo) carrying the same flipped tag, re-signed by
/// `committer` (its MLS identity). The commit's signature does not cover its confirmation tag, so it still
/// verifies; its membership tag and confirmation tag no longer do, which only members can see.
pub fn bad_confirmation_tag(
    committer: &MlsIdentity,
    commit: &[u8],
    group_info: &[u8],
) -> Result<(Vec<u8>, Vec<u8>)> {
    // A PublicMessage ends with the confirmation tag then the membership tag, 32 bytes each.
    let mut bad = commit.to_vec();
    let n = bad.len();
    ensure!(
        n > 66 && bad[n - 33] == 32 && bad[n - 66] == 32,
        "not a classical commit"
    );
    bad[n - 34] ^= 1;
    let tag = bad[n - 65..n - 33].to_vec();

    // MLSMessage header (4), then the GroupInfo: its group context (version, suite, group id,
    // epoch, tree hash, confirmed transcript hash, extensions), its extensions, confirmation
    // tag, signer and signature.
    let mut info = group_info.to_vec();
    let mut at = 4 + 2 + 2;
    at = vec_at(&info, at)?.1 + 8;
    for _ in 0..3 {
        at = vec_at(&info, at)?.1;
    }
    at = vec_at(&info, at)?.1;
    let (tag_start, tag_end) = vec_at(&info, at)?;
    ensure!(tag_end - tag_start == tag.len(), "GroupInfo tag length");
    info[tag_start..tag_end].copy_from_slice(&tag);
    let tbs_end = tag_end + 4;
    let (sig_start, sig_end) = vec_at(&info, tbs_end)?;
    let signature = sign_with_label(committer, "GroupInfoTBS", &info[4..tbs_end])?;
    ensure!(signature.len() == sig_end - sig_start, "signature length");
    info[sig_start..sig_end].copy_from_slice(&signature);
    Ok((bad, info))
}
