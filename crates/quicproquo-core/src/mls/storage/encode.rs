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
//! elements are bytes in one pass. postcard still decodes everything; whatever this encoder
//! does not handle itself (a sequence of unknown length, a sequence whose elements are bytes
//! only sometimes, `collect_str`) makes [`encode_into`] start again with postcard's own
//! serializer, so the bytes are postcard's in every case. Its output buffer is zeroized
//! whenever it has to grow.
//!
//! It is not a general serializer: it exists for the store's values and keys.

use serde::Serialize;
use serde::ser::{self, Impossible};
use zeroize::Zeroize;

use super::StorageError;

/// Why [`Encoder`] stopped.
#[derive(Debug, thiserror::Error)]
enum EncodeError {
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
    out.zeroize();
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
    fn varint(&mut self, mut v: u128) {
        reserve(self.out, 19);
        while v >= 0x80 {
            self.out.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.out.push(v as u8);
    }

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

/// Takes the byte out of a value that serializes as one `u8`, and refuses anything else.
struct ByteOf;

macro_rules! not_a_byte {
    ($($method:ident($ty:ty)),* $(,)?) => {$(
        #[inline]
        fn $method(self, _: $ty) -> Result<u8, EncodeError> {
            Err(EncodeError::Fallback)
        }
    )*};
}

impl ser::Serializer for ByteOf {
    type Ok = u8;
    type Error = EncodeError;
    type SerializeSeq = Impossible<u8, EncodeError>;
    type SerializeTuple = Impossible<u8, EncodeError>;
    type SerializeTupleStruct = Impossible<u8, EncodeError>;
    type SerializeTupleVariant = Impossible<u8, EncodeError>;
    type SerializeMap = Impossible<u8, EncodeError>;
    type SerializeStruct = Impossible<u8, EncodeError>;
    type SerializeStructVariant = Impossible<u8, EncodeError>;

    fn is_human_readable(&self) -> bool {
        false
    }

    #[inline]
    fn serialize_u8(self, v: u8) -> Result<u8, EncodeError> {
        Ok(v)
    }

    not_a_byte!(
        serialize_bool(bool),
        serialize_i8(i8),
        serialize_i16(i16),
        serialize_i32(i32),
        serialize_i64(i64),
        serialize_i128(i128),
        serialize_u16(u16),
        serialize_u32(u32),
        serialize_u64(u64),
        serialize_u128(u128),
        serialize_f32(f32),
        serialize_f64(f64),
        serialize_char(char),
        serialize_str(&str),
        serialize_bytes(&[u8]),
        serialize_unit_struct(&'static str),
    );

    fn serialize_none(self) -> Result<u8, EncodeError> {
        Err(EncodeError::Fallback)
    }

    fn serialize_some<T: ?Sized + Serialize>(self, _: &T) -> Result<u8, EncodeError> {
        Err(EncodeError::Fallback)
    }

    fn serialize_unit(self) -> Result<u8, EncodeError> {
        Err(EncodeError::Fallback)
    }

    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
    ) -> Result<u8, EncodeError> {
        Err(EncodeError::Fallback)
    }

    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: &T,
    ) -> Result<u8, EncodeError> {
        Err(EncodeError::Fallback)
    }

    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<u8, EncodeError> {
        Err(EncodeError::Fallback)
    }

    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, EncodeError> {
        Err(EncodeError::Fallback)
    }

    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, EncodeError> {
        Err(EncodeError::Fallback)
    }

    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleStruct, EncodeError> {
        Err(EncodeError::Fallback)
    }

    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, EncodeError> {
        Err(EncodeError::Fallback)
    }

    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, EncodeError> {
        Err(EncodeError::Fallback)
    }

    fn serialize_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStruct, EncodeError> {
        Err(EncodeError::Fallback)
    }

    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, EncodeError> {
        Err(EncodeError::Fallback)
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

    fn serialize_i128(self, v: i128) -> Result<(), EncodeError> {
        self.varint(((v << 1) ^ (v >> 127)) as u128);
        Ok(())
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

    fn serialize_u128(self, v: u128) -> Result<(), EncodeError> {
        self.varint(v);
        Ok(())
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
                // Within the reserved room, so the buffer never moves unzeroized.
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

impl ser::SerializeSeq for &mut Encoder<'_> {
    type Ok = ();
    type Error = EncodeError;

    #[inline]
    fn serialize_element<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), EncodeError> {
        value.serialize(&mut **self)
    }

    fn end(self) -> Result<(), EncodeError> {
        Ok(())
    }
}

impl ser::SerializeTuple for &mut Encoder<'_> {
    type Ok = ();
    type Error = EncodeError;

    #[inline]
    fn serialize_element<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), EncodeError> {
        value.serialize(&mut **self)
    }

    fn end(self) -> Result<(), EncodeError> {
        Ok(())
    }
}

impl ser::SerializeTupleStruct for &mut Encoder<'_> {
    type Ok = ();
    type Error = EncodeError;

    #[inline]
    fn serialize_field<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), EncodeError> {
        value.serialize(&mut **self)
    }

    fn end(self) -> Result<(), EncodeError> {
        Ok(())
    }
}

impl ser::SerializeTupleVariant for &mut Encoder<'_> {
    type Ok = ();
    type Error = EncodeError;

    #[inline]
    fn serialize_field<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), EncodeError> {
        value.serialize(&mut **self)
    }

    fn end(self) -> Result<(), EncodeError> {
        Ok(())
    }
}

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

impl ser::SerializeStruct for &mut Encoder<'_> {
    type Ok = ();
    type Error = EncodeError;

    #[inline]
    fn serialize_field<T: ?Sized + Serialize>(
        &mut self,
        _: &'static str,
        value: &T,
    ) -> Result<(), EncodeError> {
        value.serialize(&mut **self)
    }

    fn end(self) -> Result<(), EncodeError> {
        Ok(())
    }
}

impl ser::SerializeStructVariant for &mut Encoder<'_> {
    type Ok = ();
    type Error = EncodeError;

    fn serialize_field<T: ?Sized + Serialize>(
        &mut self,
        _: &'static str,
        value: &T,
    ) -> Result<(), EncodeError> {
        value.serialize(&mut **self)
    }

    fn end(self) -> Result<(), EncodeError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, VecDeque};

    use serde::Serialize;

    use super::encode_into;
    use crate::mls::storage::StorageError;

    fn ours<T: Serialize + ?Sized>(v: &T) -> Result<Vec<u8>, StorageError> {
        let mut out = Vec::with_capacity(1);
        encode_into(v, &mut out)?;
        Ok(out)
    }

    fn same<T: Serialize + ?Sized + std::fmt::Debug>(v: &T) -> Result<(), StorageError> {
        let theirs = postcard::to_stdvec(v).map_err(|_| StorageError::Encode)?;
        assert_eq!(ours(v)?, theirs, "{v:?}");
        Ok(())
    }

    #[derive(Debug, Serialize)]
    struct Unit;

    #[derive(Debug, Serialize)]
    struct Newtype(Vec<u8>);

    #[derive(Debug, Serialize)]
    struct Pair(u16, i32);

    #[derive(Debug, Serialize)]
    enum Kind {
        A,
        B(Vec<u8>),
        C(u8, String),
        D { x: i64, y: Option<Vec<u8>> },
    }

    #[derive(Debug, Serialize)]
    struct Ratchet {
        secret: Vec<u8>,
        generation: u32,
        past: VecDeque<Option<(Vec<u8>, [u8; 12])>>,
        kind: Kind,
    }

    /// Elements that are bytes only sometimes.
    #[derive(Debug, Serialize)]
    #[serde(untagged)]
    enum Mixed {
        Byte(u8),
        Text(String),
    }

    #[test]
    fn writes_what_postcard_writes() -> Result<(), StorageError> {
        for v in [0u64, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            same(&v)?;
            same(&(v as u32))?;
            same(&(v as u16))?;
            same(&(v as u8))?;
        }
        for v in [0i64, -1, 1, -64, 64, i64::MIN, i64::MAX] {
            same(&v)?;
            same(&(v as i32))?;
            same(&(v as i16))?;
            same(&(v as i8))?;
        }
        same(&u128::MAX)?;
        same(&i128::MIN)?;
        same(&(1.5f32, -2.25f64, true, false, 'é', "text"))?;
        same(&Unit)?;
        same(&())?;
        same(&Newtype(vec![1, 2, 3]))?;
        same(&Pair(65535, -7))?;
        same(&vec![
            Kind::A,
            Kind::B(vec![9; 200]),
            Kind::C(4, "x".into()),
        ])?;
        same(&Kind::D {
            x: -300,
            y: Some(vec![]),
        })?;
        same(&Vec::<u8>::new())?;
        same(&vec![0u8; 1000])?;
        same(&vec![vec![1u8; 32], vec![], vec![2u8; 500]])?;
        same(&BTreeMap::from([(vec![1u8], 2u32), (vec![3u8, 4], 5u32)]))?;
        same(&vec![
            Some(Ratchet {
                secret: vec![7; 32],
                generation: 12,
                past: VecDeque::from([None, Some((vec![3; 16], [1; 12]))]),
                kind: Kind::A,
            }),
            None,
        ])?;
        same(&vec![
            Mixed::Byte(1),
            Mixed::Text("two".into()),
            Mixed::Byte(3),
        ])?;
        same(&vec![Mixed::Text("one".into()), Mixed::Byte(2)])?;
        Ok(())
    }

    #[test]
    fn a_fallback_keeps_what_was_there_before() -> Result<(), StorageError> {
        let mut out = vec![0xAA, 0xBB];
        encode_into(&vec![Mixed::Byte(1), Mixed::Text("t".into())], &mut out)?;
        let mut expected = vec![0xAA, 0xBB];
        expected.extend(
            postcard::to_stdvec(&vec![Mixed::Byte(1), Mixed::Text("t".into())])
                .map_err(|_| StorageError::Encode)?,
        );
        assert_eq!(out, expected);
        Ok(())
    }
}
