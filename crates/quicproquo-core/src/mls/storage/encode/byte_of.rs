//! [`ByteOf`]: whether a sequence's element is a byte, and which.

use serde::Serialize;
use serde::ser::{self, Impossible};

use super::EncodeError;

/// Takes the byte out of a value that serializes as one `u8`, and refuses anything else.
pub(super) struct ByteOf;

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
