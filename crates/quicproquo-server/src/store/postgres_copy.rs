//! A batch's log rows in PostgreSQL's binary `COPY` format (ADR 0020).
//!
//! `COPY ... FROM STDIN (FORMAT binary)` is the cheapest way into `group_log`: the server
//! reads each field straight into its tuple (no `bytea[]` parameter arrays to build and
//! unnest) and writes the heap in pages (one WAL record per page rather than per row). The
//! columns and their types are the ones `sql/0002_delivery.sql` declares, so the rows are
//! encoded here by hand, in one buffer sent as one `CopyData` message.
//!
//! The unique indexes check every copied row as an insert's do: a repeated message id fails
//! the `COPY`, and with it the transaction, exactly like the `INSERT` it replaces.

use bytes::{BufMut, Bytes, BytesMut};

use super::StoreError;
use super::postgres_plan::LogRows;

/// Starts the copy of a batch's log rows; the server answers once it is ready for them.
pub(super) const COPY_LOG: &str = "
    COPY group_log (group_id, seq, epoch, kind, message_id, payload)
    FROM STDIN (FORMAT binary)";

/// The binary format's signature, flags (none) and header extension length (none).
const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// Fields per row: the columns [`COPY_LOG`] names.
const FIELDS: i16 = 6;
/// A field count of -1 ends the data.
const TRAILER: i16 = -1;

/// A variable-length field's length word.
fn length(bytes: &[u8]) -> Result<i32, StoreError> {
    i32::try_from(bytes.len())
        .map_err(|_| StoreError::InvalidArgument("a log field is too large to copy"))
}

fn put_bytes(out: &mut BytesMut, bytes: &[u8]) -> Result<(), StoreError> {
    out.put_i32(length(bytes)?);
    out.put_slice(bytes);
    Ok(())
}

fn put_bigint(out: &mut BytesMut, n: i64) {
    out.put_i32(8);
    out.put_i64(n);
}

fn put_smallint(out: &mut BytesMut, n: i16) {
    out.put_i32(2);
    out.put_i16(n);
}

/// `rows` as the whole of a binary `COPY` stream for [`COPY_LOG`] (header, rows, trailer).
pub(super) fn encode_log_rows(rows: &LogRows<'_>) -> Result<Bytes, StoreError> {
    let n = rows.seqs.len();
    let consistent = [
        rows.groups.len(),
        rows.epochs.len(),
        rows.kinds.len(),
        rows.message_ids.len(),
        rows.payloads.len(),
    ]
    .iter()
    .all(|&len| len == n);
    if !consistent {
        return Err(StoreError::Corrupt(
            "log rows with columns of different lengths".into(),
        ));
    }
    // Per row: the field count, six length words, two bigints and a smallint.
    let fixed = 2 + 6 * 4 + 8 + 8 + 2;
    let variable: usize = (0..n)
        .map(|i| rows.groups[i].len() + rows.message_ids[i].len() + rows.payloads[i].len())
        .sum();
    let mut out = BytesMut::with_capacity(HEADER.len() + n * fixed + variable + 2);
    out.put_slice(HEADER);
    for i in 0..n {
        out.put_i16(FIELDS);
        put_bytes(&mut out, rows.groups[i])?;
        put_bigint(&mut out, rows.seqs[i]);
        put_bigint(&mut out, rows.epochs[i]);
        put_smallint(&mut out, rows.kinds[i]);
        put_bytes(&mut out, rows.message_ids[i])?;
        put_bytes(&mut out, rows.payloads[i])?;
    }
    out.put_i16(TRAILER);
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::{Result, ensure};

    #[test]
    fn rows_are_framed_as_the_binary_format_says() -> Result<()> {
        let rows = LogRows {
            groups: vec![b"g"],
            seqs: vec![7],
            epochs: vec![2],
            kinds: vec![1],
            message_ids: vec![b"id"],
            payloads: vec![b"xyz"],
        };
        let bytes = encode_log_rows(&rows)?;
        let mut expected = HEADER.to_vec();
        expected.extend_from_slice(&6i16.to_be_bytes());
        expected.extend_from_slice(&[0, 0, 0, 1, b'g']);
        expected.extend_from_slice(&[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 7]);
        expected.extend_from_slice(&[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 2]);
        expected.extend_from_slice(&[0, 0, 0, 2, 0, 1]);
        expected.extend_from_slice(&[0, 0, 0, 2, b'i', b'd']);
        expected.extend_from_slice(&[0, 0, 0, 3, b'x', b'y', b'z']);
        expected.extend_from_slice(&[0xff, 0xff]);
        ensure!(bytes[..] == expected[..]);
        ensure!(HEADER.len() == 19);
        Ok(())
    }

    #[test]
    fn no_rows_is_a_header_and_a_trailer() -> Result<()> {
        let bytes = encode_log_rows(&LogRows::default())?;
        ensure!(bytes.len() == HEADER.len() + 2 && bytes.ends_with(&[0xff, 0xff]));
        Ok(())
    }

    #[test]
    fn columns_of_different_lengths_are_refused() {
        let rows = LogRows {
            seqs: vec![1],
            ..LogRows::default()
        };
        assert!(matches!(
            encode_log_rows(&rows),
            Err(StoreError::Corrupt(_))
        ));
    }
}
