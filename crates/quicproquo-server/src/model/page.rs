//! Pages: how many list entries one reply (or push) carries, by count and by bytes.
//!
//! Every list the server sends (a group's log, an inbox of Welcomes) is cut into pages that
//! stay under a byte budget as well as a count, so a reply never outgrows the frame the peer
//! accepts, however large the entries are. One entry always fits on its own: the largest
//! accepted message plus its envelope is checked against the frame when the configuration is
//! validated, so a page of one is never too large.

use super::group::{InboxEntry, LogEntry, MAX_GROUP_ID};

/// Bytes an entry costs in a reply beyond its variable fields (struct words, list pointer,
/// integers, padding): a generous upper bound.
pub const ENTRY_OVERHEAD: usize = 96;

/// Default byte budget of one page (the `max_reply_bytes` setting caps the replies a node
/// builds; this is the budget of pages read without an explicit one).
pub const DEFAULT_PAGE_BYTES: usize = 4 * 1024 * 1024;

/// Bytes kept free in a frame for the rest of a call or return around a page's list.
pub const FRAME_HEADROOM: usize = 64 * 1024;

/// The budget of one page: at most `entries` entries and, unless the first entry alone is
/// larger, at most `bytes` bytes of entries (as counted by [`log_entry_bytes`] and
/// [`welcome_bytes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    /// Most entries on the page.
    pub entries: u32,
    /// Most bytes of entries on the page (one entry always fits).
    pub bytes: usize,
}

impl From<u32> for Page {
    /// A page of at most `entries` entries under the default byte budget.
    fn from(entries: u32) -> Self {
        Self {
            entries,
            bytes: DEFAULT_PAGE_BYTES,
        }
    }
}

impl Page {
    /// A page of at most `entries` entries and `bytes` bytes.
    pub fn new(entries: u32, bytes: usize) -> Self {
        Self { entries, bytes }
    }

    /// Whether an entry of `size` bytes joins a page already holding `count` entries of
    /// `used` bytes: the first always does, later ones while both budgets hold.
    pub fn admits(&self, count: usize, used: usize, size: usize) -> bool {
        count < self.entries as usize && (count == 0 || used.saturating_add(size) <= self.bytes)
    }

    /// The longest prefix of `sizes` that fits on the page.
    pub fn fit(&self, sizes: impl IntoIterator<Item = usize>) -> usize {
        let (mut count, mut used) = (0, 0usize);
        for size in sizes {
            if !self.admits(count, used, size) {
                break;
            }
            count += 1;
            used = used.saturating_add(size);
        }
        count
    }
}

/// What a log entry with a `message_id_len`-byte id and `payload_len`-byte payload costs in a
/// reply (its group id counted at the longest).
pub fn log_entry_bytes(message_id_len: usize, payload_len: usize) -> usize {
    ENTRY_OVERHEAD + MAX_GROUP_ID + message_id_len + payload_len
}

/// What a Welcome of `welcome_len` bytes costs in a reply.
pub fn welcome_bytes(welcome_len: usize) -> usize {
    ENTRY_OVERHEAD + MAX_GROUP_ID + welcome_len
}

/// [`log_entry_bytes`] of `entry`.
pub fn entry_size(entry: &LogEntry) -> usize {
    log_entry_bytes(entry.message_id.len(), entry.payload.len())
}

/// [`welcome_bytes`] of `entry`.
pub fn inbox_entry_size(entry: &InboxEntry) -> usize {
    welcome_bytes(entry.welcome.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_stops_at_its_count_or_its_bytes_and_the_first_entry_always_fits() {
        let page = Page::new(3, 100);
        assert_eq!(page.fit([10, 10, 10, 10]), 3, "count");
        assert_eq!(
            page.fit([60, 40, 1]),
            2,
            "bytes: exactly at the budget still fits"
        );
        assert_eq!(page.fit([60, 41]), 1, "bytes");
        assert_eq!(
            page.fit([1000, 1]),
            1,
            "an entry larger than the budget goes alone"
        );
        assert_eq!(page.fit([]), 0);
        assert_eq!(Page::new(0, 100).fit([1]), 0);
    }
}
