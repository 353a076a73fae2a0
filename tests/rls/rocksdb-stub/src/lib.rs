//! A stand-in for the `rocksdb` crate, so that `limitador` builds without a
//! RocksDB (a long C++ build on two cores) in tests/rls.
//!
//! Why it exists: limitador 0.11 to 0.14 do not compile with only their
//! `redis_storage` feature. The Redis storage encodes the keys of limits that
//! have an id with the `storage::keys::bin` module, which is compiled only
//! with the `disk_storage` feature, and that feature pulls `rocksdb`. With
//! `disk_storage` on and this crate patched in (root Cargo.toml,
//! `[patch.crates-io]`), limitador compiles; its disk storage exists but
//! cannot open anything: every operation here returns an error and
//! tests/rls never constructs it. Only the names and signatures limitador's
//! disk storage uses are provided. Remove this crate (and the patch) once
//! limitador builds with `default-features = false, features = ["redis_storage"]`.

use std::fmt;
use std::marker::PhantomData;
use std::path::Path;

/// What every operation returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no RocksDB in this build (rocksdb stand-in, see tests/rls/rocksdb-stub)")
    }
}

impl std::error::Error for Error {}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::NotSupported
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    NotSupported,
    TimedOut,
    TryAgain,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DBCompressionType {
    None,
    Bz2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompactionDecision {
    Keep,
    Remove,
}

#[derive(Debug, Clone, Copy)]
pub enum IteratorMode<'a> {
    Start,
    From(&'a [u8]),
}

/// The operands of a merge, as the merge operator sees them.
#[derive(Debug, Default)]
pub struct MergeOperands {
    operands: Vec<Vec<u8>>,
}

impl<'a> IntoIterator for &'a MergeOperands {
    type Item = &'a [u8];
    type IntoIter = std::iter::Map<std::slice::Iter<'a, Vec<u8>>, fn(&'a Vec<u8>) -> &'a [u8]>;
    fn into_iter(self) -> Self::IntoIter {
        self.operands.iter().map(Vec::as_slice)
    }
}

#[derive(Debug, Default)]
pub struct Options;

impl Options {
    pub fn set_compression_type(&mut self, _t: DBCompressionType) {}
    pub fn create_if_missing(&mut self, _create: bool) {}
    pub fn set_compaction_filter<F>(&mut self, _name: &str, _filter: F)
    where
        F: FnMut(u32, &[u8], &[u8]) -> CompactionDecision + Send + 'static,
    {
    }
    pub fn set_merge_operator_associative<F>(&mut self, _name: &str, _merge: F)
    where
        F: Fn(&[u8], Option<&[u8]>, &MergeOperands) -> Option<Vec<u8>> + Send + Sync + Clone + 'static,
    {
    }
}

#[derive(Debug)]
pub struct MultiThreaded;

pub type KeyValue = (Box<[u8]>, Box<[u8]>);

/// An iterator with nothing in it.
#[derive(Debug, Default)]
pub struct DBIterator;

impl Iterator for DBIterator {
    type Item = Result<KeyValue, Error>;
    fn next(&mut self) -> Option<Self::Item> {
        None
    }
}

#[derive(Debug)]
pub struct DBWithThreadMode<T> {
    mode: PhantomData<T>,
}

pub type DB = DBWithThreadMode<MultiThreaded>;

impl<T> DBWithThreadMode<T> {
    pub fn open<P: AsRef<Path>>(_opts: &Options, _path: P) -> Result<Self, Error> {
        Err(Error)
    }
    pub fn get<K: AsRef<[u8]>>(&self, _key: K) -> Result<Option<Vec<u8>>, Error> {
        Err(Error)
    }
    pub fn delete<K: AsRef<[u8]>>(&self, _key: K) -> Result<(), Error> {
        Err(Error)
    }
    pub fn merge<K: AsRef<[u8]>, V: AsRef<[u8]>>(&self, _key: K, _value: V) -> Result<(), Error> {
        Err(Error)
    }
    pub fn iterator(&self, _mode: IteratorMode<'_>) -> DBIterator {
        DBIterator
    }
    pub fn prefix_iterator<P: AsRef<[u8]>>(&self, _prefix: P) -> DBIterator {
        DBIterator
    }
}
