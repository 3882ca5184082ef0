//! The store's buffers of secret bytes, and how they are wiped.
//!
//! `zeroize`'s impl for `Vec<u8>` wipes the elements one at a time (a volatile store per
//! byte, which the compiler may not merge); its impl for a slice of bytes fills it and then
//! puts an optimisation barrier behind the fill (on the targets it knows, x86_64 among them).
//! The store's large entries are replaced often (a 1000-member group's message secrets,
//! ~88 KB, after every decryption), and wiping the replaced one the first way took ~20 µs, the
//! second ~1 µs. So the store wipes its buffers as slices: the bytes in use, then the spare
//! capacity.

use std::ops::{Deref, DerefMut};

use zeroize::Zeroize;

/// Wipes the whole of `v`'s buffer, its spare capacity too, and empties it.
pub(super) fn wipe_vec(v: &mut Vec<u8>) {
    v.as_mut_slice().zeroize();
    v.spare_capacity_mut().zeroize();
    v.clear();
}

/// A stored value's bytes: its whole buffer is wiped when it is dropped.
#[derive(Default)]
pub(super) struct SecretBytes(Vec<u8>);

impl SecretBytes {
    /// An empty buffer with room for `capacity` bytes.
    pub(super) fn with_capacity(capacity: usize) -> Self {
        Self(Vec::with_capacity(capacity))
    }
}

impl From<Vec<u8>> for SecretBytes {
    fn from(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }
}

impl Deref for SecretBytes {
    type Target = Vec<u8>;

    fn deref(&self) -> &Vec<u8> {
        &self.0
    }
}

impl DerefMut for SecretBytes {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        wipe_vec(&mut self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wiped_buffer_is_empty_and_keeps_its_room() {
        let mut v = Vec::with_capacity(100);
        v.extend_from_slice(&[7u8; 60]);
        wipe_vec(&mut v);
        assert!(v.is_empty());
        assert!(v.capacity() >= 100);
    }
}
