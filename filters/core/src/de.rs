//! Typed configs out of a parsed JSON value, with the path of the first error.
//!
//! A `serde::Deserializer` over `&serde_json::Value` that knows where it is
//! in the document: every call that fails records its path (the first,
//! innermost failure wins), so a wrong type, a missing or unknown field or a
//! bad enum variant is reported at `policies[0].rate`, never at a line and
//! column. It follows `serde_json::Value`'s own deserializer value for value
//! (numbers, options, externally tagged enums, leftover elements) and its
//! error wording, so messages read the same.
//!
//! Why not `serde_path_to_error` over `serde_json::Value`: that crate wraps
//! every visitor of every config type a second time, and in a wasm module
//! that is code every VM loads. Tracking the path here, in the one copy of
//! the code, took 8.2 KB off rate_limiter.wasm and 13.4 KB off
//! meshpatterns.wasm (after wasm-opt), with the same error, field for field,
//! on every config input of the fuzz corpora (22,496 inputs, 6 parsers).

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, IntoDeserializer, Unexpected, Visitor};
use serde_json::{Map, Value};

/// One step of a field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    /// An element of a list.
    Index(usize),
    /// An object key, or an enum variant's name.
    Key(String),
}

/// Where a deserializer is: a chain of borrowed steps back to the root,
/// built on the stack as the walk goes down, turned into a path only on error.
#[derive(Clone, Copy)]
enum Chain<'a> {
    Root,
    Index(&'a Chain<'a>, usize),
    Key(&'a Chain<'a>, &'a str),
}

impl Chain<'_> {
    fn path(&self) -> Vec<Seg> {
        let mut out = Vec::new();
        let mut at = self;
        loop {
            match at {
                Chain::Root => break,
                Chain::Index(p, i) => {
                    out.push(Seg::Index(*i));
                    at = p;
                }
                Chain::Key(p, k) => {
                    out.push(Seg::Key((*k).to_string()));
                    at = p;
                }
            }
        }
        out.reverse();
        out
    }
}

/// The path of the first failure.
#[derive(Default)]
struct Track(RefCell<Option<Vec<Seg>>>);

impl Track {
    fn trigger(&self, chain: &Chain<'_>, e: Error) -> Error {
        let mut p = self.0.borrow_mut();
        if p.is_none() {
            *p = Some(chain.path());
        }
        e
    }
}

/// A deserialization error: serde's message (as `serde_json` words it).
#[derive(Debug)]
pub struct Error(pub String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl de::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Error(msg.to_string())
    }
    fn invalid_type(unexp: Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        Error(format!("invalid type: {}, expected {exp}", Json(unexp)))
    }
    fn invalid_value(unexp: Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        Error(format!("invalid value: {}, expected {exp}", Json(unexp)))
    }
}

/// `Unexpected` as serde_json prints it (`null`, floats with a point).
struct Json<'a>(Unexpected<'a>);

impl fmt::Display for Json<'_> {
    // serde's own words for each kind, except `null` and floats, as
    // serde_json says them. Written out rather than delegated to
    // `Unexpected`'s `Display`, which prints floats with `f64`'s `Display`:
    // about 20 KB of float formatting in every module for a message.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Unexpected::Bool(b) => write!(f, "boolean `{b}`"),
            Unexpected::Unsigned(n) => write!(f, "integer `{n}`"),
            Unexpected::Signed(n) => write!(f, "integer `{n}`"),
            Unexpected::Float(v) => match serde_json::Number::from_f64(v) {
                Some(n) => write!(f, "floating point `{n}`"),
                None if v.is_nan() => f.write_str("floating point `NaN`"),
                None if v > 0.0 => f.write_str("floating point `inf`"),
                None => f.write_str("floating point `-inf`"),
            },
            Unexpected::Char(c) => write!(f, "character `{c}`"),
            Unexpected::Str(s) => write!(f, "string {s:?}"),
            Unexpected::Bytes(_) => f.write_str("byte array"),
            Unexpected::Unit => f.write_str("null"),
            Unexpected::Option => f.write_str("Option value"),
            Unexpected::NewtypeStruct => f.write_str("newtype struct"),
            Unexpected::Seq => f.write_str("sequence"),
            Unexpected::Map => f.write_str("map"),
            Unexpected::Enum => f.write_str("enum"),
            Unexpected::UnitVariant => f.write_str("unit variant"),
            Unexpected::NewtypeVariant => f.write_str("newtype variant"),
            Unexpected::TupleVariant => f.write_str("tuple variant"),
            Unexpected::StructVariant => f.write_str("struct variant"),
            Unexpected::Other(o) => f.write_str(o),
        }
    }
}

fn unexpected(v: &Value) -> Unexpected<'_> {
    match v {
        Value::Null => Unexpected::Unit,
        Value::Bool(b) => Unexpected::Bool(*b),
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => Unexpected::Unsigned(u),
            (None, Some(i)) => Unexpected::Signed(i),
            _ => Unexpected::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Unexpected::Str(s),
        Value::Array(_) => Unexpected::Seq,
        Value::Object(_) => Unexpected::Map,
    }
}

/// Deserialize `T` from `v`; on error, the message and the path of the
/// innermost value that failed.
pub fn from_value<T: de::DeserializeOwned>(v: &Value) -> Result<T, (Error, Vec<Seg>)> {
    let track = Track::default();
    let root = Chain::Root;
    T::deserialize(De { v, chain: &root, track: &track }).map_err(|e| (e, track.0.into_inner().unwrap_or_default()))
}

struct De<'c> {
    v: &'c Value,
    chain: &'c Chain<'c>,
    track: &'c Track,
}

impl<'c> De<'c> {
    fn fail(&self, e: Error) -> Error {
        self.track.trigger(self.chain, e)
    }
}

fn visit_array<'de, V: Visitor<'de>>(a: &[Value], chain: &Chain<'_>, track: &Track, visitor: V) -> Result<V::Value, Error> {
    let mut seq = SeqDe { iter: a.iter(), index: 0, chain, track };
    let out = visitor.visit_seq(&mut seq)?;
    if seq.iter.len() == 0 {
        Ok(out)
    } else {
        Err(de::Error::invalid_length(a.len(), &"fewer elements in array"))
    }
}

fn visit_object<'de, V: Visitor<'de>>(m: &Map<String, Value>, chain: &Chain<'_>, track: &Track, visitor: V) -> Result<V::Value, Error> {
    let mut map = MapDe { iter: m.iter(), value: None, chain, track };
    let out = visitor.visit_map(&mut map)?;
    if map.iter.len() == 0 {
        Ok(out)
    } else {
        Err(de::Error::invalid_length(m.len(), &"fewer elements in map"))
    }
}

impl<'de> de::Deserializer<'de> for De<'_> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let r = match self.v {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Number(n) => match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => visitor.visit_u64(u),
                (None, Some(i)) => visitor.visit_i64(i),
                _ => visitor.visit_f64(n.as_f64().unwrap_or(f64::NAN)),
            },
            Value::String(s) => visitor.visit_str(s),
            Value::Array(a) => visit_array(a, self.chain, self.track, visitor),
            Value::Object(m) => visit_object(m, self.chain, self.track, visitor),
        };
        r.map_err(|e| self.fail(e))
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let (chain, track) = (self.chain, self.track);
        let r = match self.v {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        };
        r.map_err(|e| track.trigger(chain, e))
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, Error> {
        let (chain, track) = (self.chain, self.track);
        visitor.visit_newtype_struct(self).map_err(|e| track.trigger(chain, e))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        let r = match self.v {
            Value::String(s) => visitor.visit_enum(EnumDe { variant: s, value: None, chain: self.chain, track: self.track }),
            Value::Object(m) => {
                let mut it = m.iter();
                match (it.next(), it.next()) {
                    (Some((k, v)), None) => visitor.visit_enum(EnumDe { variant: k, value: Some(v), chain: self.chain, track: self.track }),
                    _ => Err(de::Error::invalid_value(Unexpected::Map, &"map with a single key")),
                }
            }
            other => Err(de::Error::invalid_type(unexpected(other), &"string or map")),
        };
        r.map_err(|e| self.fail(e))
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit().map_err(|e| self.fail(e))
    }

    // The kinds every config is made of take only their own JSON kind, with
    // the message `deserialize_any` would give for any other (the visitor's
    // default `visit_*` words it the same way). One arm and one error instead
    // of seven visitor calls per config type, and no positional struct
    // parsing: `serde_json::Value` also reads a struct from an array, which
    // no config documents, and the code for it was in every module.
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_map(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let r = match self.v {
            Value::Object(m) => visit_object(m, self.chain, self.track, visitor),
            other => Err(de::Error::invalid_type(unexpected(other), &visitor)),
        };
        r.map_err(|e| self.fail(e))
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let r = match self.v {
            Value::Array(a) => visit_array(a, self.chain, self.track, visitor),
            other => Err(de::Error::invalid_type(unexpected(other), &visitor)),
        };
        r.map_err(|e| self.fail(e))
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let r = match self.v {
            Value::String(s) => visitor.visit_str(s),
            other => Err(de::Error::invalid_type(unexpected(other), &visitor)),
        };
        r.map_err(|e| self.fail(e))
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let r = match self.v {
            Value::Bool(b) => visitor.visit_bool(*b),
            other => Err(de::Error::invalid_type(unexpected(other), &visitor)),
        };
        r.map_err(|e| self.fail(e))
    }

    serde::forward_to_deserialize_any! {
        i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char
        bytes byte_buf unit unit_struct tuple tuple_struct identifier
    }
}

struct SeqDe<'c> {
    iter: std::slice::Iter<'c, Value>,
    index: usize,
    chain: &'c Chain<'c>,
    track: &'c Track,
}

impl<'de> de::SeqAccess<'de> for SeqDe<'_> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, Error> {
        let Some(v) = self.iter.next() else { return Ok(None) };
        let chain = Chain::Index(self.chain, self.index);
        self.index += 1;
        seed.deserialize(De { v, chain: &chain, track: self.track }).map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}

struct MapDe<'c> {
    iter: serde_json::map::Iter<'c>,
    value: Option<(&'c str, &'c Value)>,
    chain: &'c Chain<'c>,
    track: &'c Track,
}

impl<'de> de::MapAccess<'de> for MapDe<'_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Error> {
        let Some((k, v)) = self.iter.next() else { return Ok(None) };
        self.value = Some((k, v));
        let key: de::value::StrDeserializer<'_, Error> = k.as_str().into_deserializer();
        seed.deserialize(key).map(Some).map_err(|e| self.track.trigger(&Chain::Key(self.chain, k), e))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let Some((k, v)) = self.value.take() else { return Err(de::Error::custom("value is missing")) };
        let chain = Chain::Key(self.chain, k);
        seed.deserialize(De { v, chain: &chain, track: self.track })
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}

struct EnumDe<'c> {
    variant: &'c str,
    value: Option<&'c Value>,
    chain: &'c Chain<'c>,
    track: &'c Track,
}

impl<'de, 'c> de::EnumAccess<'de> for EnumDe<'c> {
    type Error = Error;
    type Variant = VariantDe<'c>;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, VariantDe<'c>), Error> {
        let name: de::value::StrDeserializer<'_, Error> = self.variant.into_deserializer();
        let v = seed.deserialize(name).map_err(|e| self.track.trigger(self.chain, e))?;
        Ok((v, VariantDe { variant: self.variant, value: self.value, chain: self.chain, track: self.track }))
    }
}

struct VariantDe<'c> {
    variant: &'c str,
    value: Option<&'c Value>,
    chain: &'c Chain<'c>,
    track: &'c Track,
}

impl<'de> de::VariantAccess<'de> for VariantDe<'_> {
    type Error = Error;

    fn unit_variant(self) -> Result<(), Error> {
        let chain = Chain::Key(self.chain, self.variant);
        match self.value {
            Some(v) => <() as de::Deserialize>::deserialize(De { v, chain: &chain, track: self.track }),
            None => Ok(()),
        }
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, Error> {
        let chain = Chain::Key(self.chain, self.variant);
        match self.value {
            Some(v) => seed.deserialize(De { v, chain: &chain, track: self.track }),
            None => Err(self.track.trigger(&chain, de::Error::invalid_type(Unexpected::UnitVariant, &"newtype variant"))),
        }
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, Error> {
        let chain = Chain::Key(self.chain, self.variant);
        let r = match self.value {
            Some(Value::Array(a)) if a.is_empty() => visitor.visit_unit(),
            Some(Value::Array(a)) => visit_array(a, &chain, self.track, visitor),
            Some(other) => Err(de::Error::invalid_type(unexpected(other), &"tuple variant")),
            None => Err(de::Error::invalid_type(Unexpected::UnitVariant, &"tuple variant")),
        };
        r.map_err(|e| self.track.trigger(&chain, e))
    }

    fn struct_variant<V: Visitor<'de>>(self, _fields: &'static [&'static str], visitor: V) -> Result<V::Value, Error> {
        let chain = Chain::Key(self.chain, self.variant);
        let r = match self.value {
            Some(Value::Object(m)) => visit_object(m, &chain, self.track, visitor),
            Some(other) => Err(de::Error::invalid_type(unexpected(other), &"struct variant")),
            None => Err(de::Error::invalid_type(Unexpected::UnitVariant, &"struct variant")),
        };
        r.map_err(|e| self.track.trigger(&chain, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[allow(dead_code)]
    #[derive(Debug, serde::Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    enum Source {
        Header(String),
        Query { name: String, max: Option<u8> },
        Peer,
    }

    #[allow(dead_code)]
    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        sources: Vec<Source>,
    }

    fn fails(json: &str) -> (String, Vec<Seg>) {
        let v: Value = serde_json::from_str(json).unwrap();
        let (e, path) = from_value::<Doc>(&v).unwrap_err();
        (e.0, path)
    }

    #[test]
    fn the_innermost_failure_names_the_path() {
        let key = |k: &str| Seg::Key(k.to_string());
        let (msg, path) = fails(r#"{"sources": ["peer", {"query": {"name": "q", "max": 300}}]}"#);
        assert_eq!(path, vec![key("sources"), Seg::Index(1), key("query"), key("max")]);
        assert_eq!(msg, "invalid value: integer `300`, expected u8");
        // An unknown field's path ends with the key itself.
        let (msg, path) = fails(r#"{"sources": [{"query": {"name": "q", "nmae": 1}}]}"#);
        assert_eq!(path, vec![key("sources"), Seg::Index(0), key("query"), key("nmae")]);
        assert!(msg.starts_with("unknown field `nmae`"), "{msg}");
        // A missing field fails at the object that lacks it.
        let (msg, path) = fails(r#"{"sources": [{"query": {}}]}"#);
        assert_eq!(path, vec![key("sources"), Seg::Index(0), key("query")]);
        assert_eq!(msg, "missing field `name`");
        // Wrong types word their value as serde_json does.
        let (msg, path) = fails(r#"{"sources": [{"header": null}]}"#);
        assert_eq!(path, vec![key("sources"), Seg::Index(0), key("header")]);
        assert_eq!(msg, "invalid type: null, expected a string");
        let (msg, _) = fails(r#"{"sources": [{"query": {"name": "q", "max": 1.5}}]}"#);
        assert_eq!(msg, "invalid type: floating point `1.5`, expected u8");
        // An enum as an object of two keys, or an unknown variant.
        let (msg, path) = fails(r#"{"sources": [{"header": "a", "peer": null}]}"#);
        assert_eq!(path, vec![key("sources"), Seg::Index(0)]);
        assert_eq!(msg, "invalid value: map, expected map with a single key");
        let (msg, path) = fails(r#"{"sources": ["cookie"]}"#);
        assert_eq!(path, vec![key("sources"), Seg::Index(0)]);
        assert!(msg.starts_with("unknown variant `cookie`"), "{msg}");
        // Each kind takes only its own JSON kind, worded as serde_json words it;
        // a struct is never read from an array by position.
        let (msg, path) = fails(r#"[[]]"#);
        assert_eq!(path, vec![]);
        assert_eq!(msg, "invalid type: sequence, expected struct Doc");
        let (msg, path) = fails(r#"{"sources": "peer"}"#);
        assert_eq!(path, vec![key("sources")]);
        assert_eq!(msg, "invalid type: string \"peer\", expected a sequence");
        let (msg, path) = fails(r#"{"sources": [{"header": 7}]}"#);
        assert_eq!(path, vec![key("sources"), Seg::Index(0), key("header")]);
        assert_eq!(msg, "invalid type: integer `7`, expected a string");
        let (msg, _) = fails(r#"{"sources": [{"header": {}}]}"#);
        assert_eq!(msg, "invalid type: map, expected a string");
        let (msg, _) = fails(r#"{"sources": [{"header": -1.5e300}]}"#);
        assert_eq!(msg, "invalid type: floating point `-1.5e+300`, expected a string");
    }
}
