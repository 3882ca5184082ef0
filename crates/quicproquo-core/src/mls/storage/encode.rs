//! The store's encoder: postcard's bytes, written in one pass where openmls gives byte strings
//! one element at a time.
//!
//! openmls's secrets, keys and hashes are `Vec<u8>`s (tls_codec's `VLBytes`) without
//! `serde_bytes`, so serde hands each of their bytes to the serializer as an element of a
//! sequence. postcard writes those one call at a time. A member of a 1000-member group has a
//! sender ratchet per member in its message secrets, which openmls rewrites after every
//! decryption, and that per-byte path was about a third of the load generator's CPU.
//!
//! [`Encoder`] is a serde serializer of postcard's wire format (varints, zigzag integers,
//! length-prefixed sequences; postcard 1.x's specification) that copies a sequence whose
//! elements are bytes in one pass. postcard still decodes everything. Whatever this encoder
//! does not handle itself (a sequence of unknown length, a sequence whose elements are bytes
//! only sometimes, 128-bit integers, `collect_str`) makes [`encode_into`] start again with
//! postcard's own serializer, so the bytes are postcard's in every case. Its output buffer is
//! wiped whenever it has to grow.
//!
//! It is not a general serializer: it exists for the store's values and keys.

use serde::Serialize;
use serde::ser;
use zeroize::Zeroize;

use super::StorageError;

mod byte_of;

use byte_of::ByteOf;

/// Why [`Encoder`] stopped.
#[derive(Debug, thiserror::Error)]
pub(super) enum EncodeError {
    /// Something this encoder leaves to postcard: start again with it.
    #[error("left to postcard")]
    Fallback,
    /// The value's own `Serialize` failed.
    #[error("the value could not be serialized")]
    Value,
}

impl ser::Error for EncodeError {
    fn custom<T: std::fmt::Display>(_msg: T) -> Self {
        // The message could name secret content: it is not kept.
        Self::Value
    }
}

/// Appends the postcard encoding of `value` to `out`.
pub(super) fn encode_into<T: Serialize + ?Sized>(
    value: &T,
    out: &mut Vec<u8>,
) -> Result<(), StorageError> {
    let start = out.len();
    match value.serialize(&mut Encoder { out: &mut *out }) {
        Ok(()) => {
            // In this crate's tests every entity openmls stores is checked against postcard.
            #[cfg(test)]
            assert_eq!(
                out.get(start..),
                postcard::to_stdvec(value).ok().as_deref(),
                "the encoder wrote other bytes than postcard"
            );
            Ok(())
        }
        Err(EncodeError::Fallback) => {
            if let Some(tail) = out.get_mut(start..) {
                tail.zeroize();
            }
            out.truncate(start);
            postcard::serialize_with_flavor(value, SecretBuf(out)).map_err(|_| StorageError::Encode)
        }
        Err(EncodeError::Value) => Err(StorageError::Encode),
    }
}

/// Grows `out` to hold `more` bytes beyond its length, zeroizing the buffer it leaves behind.
#[inline]
pub(super) fn reserve(out: &mut Vec<u8>, more: usize) {
    if out.capacity() - out.len() < more {
        grow(out, more);
    }
}

#[cold]
fn grow(out: &mut Vec<u8>, more: usize) {
    let need = out.len().saturating_add(more);
    let mut grown = Vec::with_capacity(need.max(out.capacity().saturating_mul(2)));
    grown.extend_from_slice(out);
    super::secret::wipe_vec(out);
    *out = grown;
}

/// A postcard output that writes into a zeroizing buffer (the fallback's).
struct SecretBuf<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for SecretBuf<'_> {
    type Output = ();

    #[inline]
    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        reserve(self.0, 1);
        self.0.push(data);
        Ok(())
    }

    #[inline]
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        reserve(self.0, data.len());
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// A serde serializer of postcard's format into a zeroizing buffer.
struct Encoder<'a> {
    out: &'a mut Vec<u8>,
}

impl Encoder<'_> {
    #[inline]
    fn byte(&mut self, b: u8) {
        reserve(self.out, 1);
        self.out.push(b);
    }

    #[inline]
    fn bytes(&mut self, b: &[u8]) {
        reserve(self.out, b.len());
        self.out.extend_from_slice(b);
    }

    /// An unsigned LEB128 varint, as postcard writes every integer wider than a byte.
    #[inline]
    fn varint_u64(&mut self, mut v: u64) {
        reserve(self.out, 10);
        while v >= 0x80 {
            self.out.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.out.push(v as u8);
    }

    #[inline]
    fn len(&mut self, len: usize) {
        self.varint_u64(len as u64);
    }
}

impl<'a> ser::Serializer for &mut Encoder<'a> {
    type Ok = ();
    type Error = EncodeError;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Self;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    fn is_human_readable(&self) -> bool {
        false
    }

    #[inline]
    fn serialize_bool(self, v: bool) -> Result<(), EncodeError> {
        self.byte(u8::from(v));
        Ok(())
    }

    #[inline]
    fn serialize_i8(self, v: i8) -> Result<(), EncodeError> {
        self.byte(v.to_le_bytes()[0]);
        Ok(())
    }

    #[inline]
    fn serialize_i16(self, v: i16) -> Result<(), EncodeError> {
        self.serialize_i64(v.into())
    }

    #[inline]
    fn serialize_i32(self, v: i32) -> Result<(), EncodeError> {
        self.serialize_i64(v.into())
    }

    #[inline]
    fn serialize_i64(self, v: i64) -> Result<(), EncodeError> {
        // Zigzag: the sign in the lowest bit.
        self.varint_u64(((v << 1) ^ (v >> 63)) as u64);
        Ok(())
    }

    /// 128-bit integers are left to postcard (openmls has none).
    fn serialize_i128(self, _: i128) -> Result<(), EncodeError> {
        Err(EncodeError::Fallback)
    }

    #[inline]
    fn serialize_u8(self, v: u8) -> Result<(), EncodeError> {
        self.byte(v);
        Ok(())
    }

    #[inline]
    fn serialize_u16(self, v: u16) -> Result<(), EncodeError> {
        self.varint_u64(v.into());
        Ok(())
    }

    #[inline]
    fn serialize_u32(self, v: u32) -> Result<(), EncodeError> {
        self.varint_u64(v.into());
        Ok(())
    }

    #[inline]
    fn serialize_u64(self, v: u64) -> Result<(), EncodeError> {
        self.varint_u64(v);
        Ok(())
    }

    fn serialize_u128(self, _: u128) -> Result<(), EncodeError> {
        Err(EncodeError::Fallback)
    }

    fn serialize_f32(self, v: f32) -> Result<(), EncodeError> {
        self.bytes(&v.to_bits().to_le_bytes());
        Ok(())
    }

    fn serialize_f64(self, v: f64) -> Result<(), EncodeError> {
        self.bytes(&v.to_bits().to_le_bytes());
        Ok(())
    }

    fn serialize_char(self, v: char) -> Result<(), EncodeError> {
        let mut buf = [0u8; 4];
        self.serialize_str(v.encode_utf8(&mut buf))
    }

    fn serialize_str(self, v: &str) -> Result<(), EncodeError> {
        self.serialize_bytes(v.as_bytes())
    }

    fn serialize_bytes(self, v: &[u8]) -> Result<(), EncodeError> {
        self.len(v.len());
        self.bytes(v);
        Ok(())
    }

    #[inline]
    fn serialize_none(self) -> Result<(), EncodeError> {
        self.byte(0);
        Ok(())
    }

    #[inline]
    fn serialize_some<T: ?Sized + Serialize>(self, value: &T) -> Result<(), EncodeError> {
        self.byte(1);
        value.serialize(self)
    }

    fn serialize_unit(self) -> Result<(), EncodeError> {
        Ok(())
    }

    fn serialize_unit_struct(self, _: &'static str) -> Result<(), EncodeError> {
        Ok(())
    }

    fn serialize_unit_variant(
        self,
        _: &'static str,
        index: u32,
        _: &'static str,
    ) -> Result<(), EncodeError> {
        self.varint_u64(index.into());
        Ok(())
    }

    #[inline]
    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<(), EncodeError> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        index: u32,
        _: &'static str,
        value: &T,
    ) -> Result<(), EncodeError> {
        self.varint_u64(index.into());
        value.serialize(self)
    }

    fn serialize_seq(self, len: Option<usize>) -> Result<Self, EncodeError> {
        self.len(len.ok_or(EncodeError::Fallback)?);
        Ok(self)
    }

    fn serialize_tuple(self, _: usize) -> Result<Self, EncodeError> {
        Ok(self)
    }

    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Self, EncodeError> {
        Ok(self)
    }

    fn serialize_tuple_variant(
        self,
        _: &'static str,
        index: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self, EncodeError> {
        self.varint_u64(index.into());
        Ok(self)
    }

    fn serialize_map(self, len: Option<usize>) -> Result<Self, EncodeError> {
        self.len(len.ok_or(EncodeError::Fallback)?);
        Ok(self)
    }

    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self, EncodeError> {
        Ok(self)
    }

    fn serialize_struct_variant(
        self,
        _: &'static str,
        index: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self, EncodeError> {
        self.varint_u64(index.into());
        Ok(self)
    }

    /// A sequence of known length; one whose first element is a byte is copied in one pass.
    #[inline]
    fn collect_seq<I>(self, iter: I) -> Result<(), EncodeError>
    where
        I: IntoIterator,
        I::Item: Serialize,
    {
        let mut iter = iter.into_iter();
        let len = match iter.size_hint() {
            (lo, Some(hi)) if lo == hi => lo,
            _ => return Err(EncodeError::Fallback),
        };
        self.len(len);
        let Some(first) = iter.next() else {
            return if len == 0 {
                Ok(())
            } else {
                Err(EncodeError::Fallback)
            };
        };
        match first.serialize(ByteOf) {
            Ok(b) => {
                reserve(self.out, len);
                self.out.push(b);
                let start = self.out.len();
                let mut other = false;
                // Within the reserved room, so the buffer never moves unwiped.
                self.out.extend(iter.by_ref().take(len - 1).map(|item| {
                    item.serialize(ByteOf).unwrap_or_else(|_| {
                        other = true;
                        0
                    })
                }));
                if other || self.out.len() - start != len - 1 {
                    return Err(EncodeError::Fallback);
                }
            }
            Err(_) => {
                first.serialize(&mut *self)?;
                let mut n = 1;
                for item in iter.by_ref().take(len - 1) {
                    item.serialize(&mut *self)?;
                    n += 1;
                }
                if n != len {
                    return Err(EncodeError::Fallback);
                }
            }
        }
        if iter.next().is_some() {
            return Err(EncodeError::Fallback);
        }
        Ok(())
    }

    fn collect_str<T: ?Sized + std::fmt::Display>(self, _: &T) -> Result<(), EncodeError> {
        Err(EncodeError::Fallback)
    }
}

/// The compound serializers: postcard writes each element or field in turn, nothing around
/// them (a sequence's length and a variant's index were written when it began).
macro_rules! compound {
    ($($trait:ident::$method:ident($($name:ty)?)),* $(,)?) => {$(
        impl ser::$trait for &mut Encoder<'_> {
            type Ok = ();
            type Error = EncodeError;

            #[inline]
            fn $method<T: ?Sized + Serialize>(
                &mut self,
                $(_: $name,)?
                value: &T,
            ) -> Result<(), EncodeError> {
                value.serialize(&mut **self)
            }

            fn end(self) -> Result<(), EncodeError> {
                Ok(())
            }
        }
    )*};
}

compound!(
    SerializeSeq::serialize_element(),
    SerializeTuple::serialize_element(),
    SerializeTupleStruct::serialize_field(),
    SerializeTupleVariant::serialize_field(),
    SerializeStruct::serialize_field(&'static str),
    SerializeStructVariant::serialize_field(&'static str),
);

impl ser::SerializeMap for &mut Encoder<'_> {
    type Ok = ();
    type Error = EncodeError;

    fn serialize_key<T: ?Sized + Serialize>(&mut self, key: &T) -> Result<(), EncodeError> {
        key.serialize(&mut **self)
    }

    fn serialize_value<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), EncodeError> {
        value.serialize(&mut **self)
    }

    fn end(self) -> Result<(), EncodeError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests;
