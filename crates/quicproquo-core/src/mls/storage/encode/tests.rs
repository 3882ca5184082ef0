//! The encoder against postcard.

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
