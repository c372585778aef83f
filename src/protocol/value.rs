//! The dynamic value model shared by both wire formats (JSON from the brain,
//! JSON or MessagePack from local producers).
//!
//! Why our own rather than `serde_json::Value`: integers are kept exactly
//! with one representation each (`Int` for what fits in `i64`, `UInt` only
//! above it), a map keeps its order and its duplicated keys (as `json.loads`
//! sees them, last wins), and decoding refuses what the canonical writer
//! could not render as Python would, so a stored event can always be signed.
//!
//! Invariants:
//! * A [`Value`] decoded by serde (MessagePack) or by [`super::json::parse`]
//!   (JSON) never contains something the canonical JSON writer would refuse
//!   or render differently from Python: map keys are strings, floats are
//!   finite, there are no byte strings.
//! * Maps keep insertion order. A map may hold a key more than once (we do
//!   not pay for a uniqueness check while decoding); the **last** occurrence
//!   wins everywhere it matters ([`Value::get`], the canonical writer),
//!   exactly like Python's `json.loads`.

use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A JSON-compatible value with integers kept exact.
///
/// `Int` holds every integer that fits in `i64`; `UInt` only the ones above
/// `i64::MAX`, so an integer has exactly one representation.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Value {
    /// JSON `null` / MessagePack nil.
    #[default]
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// An integer in `i64::MIN..=i64::MAX`.
    Int(i64),
    /// An integer above `i64::MAX`.
    UInt(u64),
    /// A float. Finite when decoded; code that builds values by hand must not
    /// put NaN or infinity here (the canonical writer refuses them).
    Float(f64),
    /// A UTF-8 string.
    Str(String),
    /// An ordered list.
    Array(Vec<Value>),
    /// An object: insertion order kept, last duplicate wins.
    Map(Vec<(String, Value)>),
}

const NON_STRING_KEY: &str = "map keys must be strings";
const NON_FINITE: &str = "NaN and infinity are not allowed; send null or a string";
const BINARY: &str = "binary values are not allowed; send a string (e.g. base64)";
const EXTENSION: &str = "MessagePack extension types are not allowed; send a plain value \
                         (e.g. a timestamp as an ISO-8601 string)";

impl Value {
    /// Looks `key` up in a map (last occurrence wins); `None` for non-maps.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Map(entries) => entries.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// Mutable variant of [`Value::get`].
    pub fn get_mut(&mut self, key: &str) -> Option<&mut Value> {
        match self {
            Value::Map(entries) => entries
                .iter_mut()
                .rev()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// Sets `key` in a map, dropping every earlier occurrence of it.
    /// Returns `false` (and does nothing) when `self` is not a map.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<Value>) -> bool {
        match self {
            Value::Map(entries) => {
                let key = key.into();
                entries.retain(|(k, _)| *k != key);
                entries.push((key, value.into()));
                true
            }
            _ => false,
        }
    }

    /// Removes every occurrence of `key` from a map and returns the value
    /// that was in effect (the last one). `None` for non-maps.
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        match self {
            Value::Map(entries) => {
                let mut found = None;
                let mut i = 0;
                while i < entries.len() {
                    if entries[i].0 == key {
                        found = Some(entries.remove(i).1);
                    } else {
                        i += 1;
                    }
                }
                found
            }
            _ => None,
        }
    }

    /// The string, if this is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer, if this is an integer that fits in `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The integer, if this is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Int(i) => u64::try_from(*i).ok(),
            Value::UInt(u) => Some(*u),
            _ => None,
        }
    }

    /// The number as a float (integers are converted, possibly rounding).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            Value::UInt(u) => Some(*u as f64),
            _ => None,
        }
    }

    /// The boolean, if this is a boolean.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The entries, if this is a map.
    pub fn as_map(&self) -> Option<&[(String, Value)]> {
        match self {
            Value::Map(m) => Some(m),
            _ => None,
        }
    }

    /// The items, if this is an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// `true` for [`Value::Null`].
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// A short type name for error messages: `null`, `bool`, `integer`,
    /// `float`, `string`, `array` or `map`.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::UInt(_) => "integer",
            Value::Float(_) => "float",
            Value::Str(_) => "string",
            Value::Array(_) => "array",
            Value::Map(_) => "map",
        }
    }

    /// An empty map, the usual starting point for building a payload.
    pub fn empty_map() -> Value {
        Value::Map(Vec::new())
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Str(s.to_owned())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Str(s)
    }
}

impl From<&String> for Value {
    fn from(s: &String) -> Self {
        Value::Str(s.clone())
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Int(i)
    }
}

impl From<i32> for Value {
    fn from(i: i32) -> Self {
        Value::Int(i64::from(i))
    }
}

impl From<u32> for Value {
    fn from(u: u32) -> Self {
        Value::Int(i64::from(u))
    }
}

impl From<u64> for Value {
    fn from(u: u64) -> Self {
        // Keep the one-representation-per-integer invariant.
        match i64::try_from(u) {
            Ok(i) => Value::Int(i),
            Err(_) => Value::UInt(u),
        }
    }
}

impl From<usize> for Value {
    fn from(u: usize) -> Self {
        Value::from(u as u64)
    }
}

impl From<f64> for Value {
    fn from(f: f64) -> Self {
        Value::Float(f)
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(o: Option<T>) -> Self {
        o.map_or(Value::Null, Into::into)
    }
}

impl From<Vec<Value>> for Value {
    fn from(items: Vec<Value>) -> Self {
        Value::Array(items)
    }
}

impl From<Vec<(String, Value)>> for Value {
    fn from(entries: Vec<(String, Value)>) -> Self {
        Value::Map(entries)
    }
}

/// Collects `(key, value)` pairs into a [`Value::Map`].
impl<K: Into<String>, V: Into<Value>> FromIterator<(K, V)> for Value {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Value::Map(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Null => serializer.serialize_unit(),
            Value::Bool(b) => serializer.serialize_bool(*b),
            Value::Int(i) => serializer.serialize_i64(*i),
            Value::UInt(u) => serializer.serialize_u64(*u),
            Value::Float(f) => serializer.serialize_f64(*f),
            Value::Str(s) => serializer.serialize_str(s),
            Value::Array(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Value::Map(entries) => {
                let mut map = serializer.serialize_map(Some(entries.len()))?;
                for (k, v) in entries {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON-compatible value (null, bool, number, string, array or map)")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Value::deserialize(d)
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }

    fn visit_i64<E: de::Error>(self, i: i64) -> Result<Value, E> {
        Ok(Value::Int(i))
    }

    fn visit_u64<E: de::Error>(self, u: u64) -> Result<Value, E> {
        Ok(Value::from(u))
    }

    fn visit_i128<E: de::Error>(self, i: i128) -> Result<Value, E> {
        if let Ok(v) = i64::try_from(i) {
            Ok(Value::Int(v))
        } else if let Ok(v) = u64::try_from(i) {
            Ok(Value::UInt(v))
        } else {
            Err(E::custom(
                "integer out of range (-2^63 .. 2^64-1); send it as a string",
            ))
        }
    }

    fn visit_u128<E: de::Error>(self, u: u128) -> Result<Value, E> {
        u64::try_from(u)
            .map(Value::from)
            .map_err(|_| E::custom("integer out of range (-2^63 .. 2^64-1); send it as a string"))
    }

    fn visit_f64<E: de::Error>(self, f: f64) -> Result<Value, E> {
        if f.is_finite() {
            Ok(Value::Float(f))
        } else {
            Err(E::custom(NON_FINITE))
        }
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Value, E> {
        Ok(Value::Str(s.to_owned()))
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<Value, E> {
        Ok(Value::Str(s))
    }

    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Value, E> {
        Err(E::custom(BINARY))
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, _: D) -> Result<Value, D::Error> {
        // rmp_serde reports MessagePack ext types this way; serde_json never does.
        Err(de::Error::custom(EXTENSION))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        // Cap the pre-allocation: the length hint comes from untrusted input.
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(item) = seq.next_element::<Value>()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(4096));
        while let Some(key) = map.next_key_seed(KeySeed)? {
            let value = map.next_value::<Value>()?;
            entries.push((key, value));
        }
        Ok(Value::Map(entries))
    }
}

/// Decodes a map key, refusing anything but a string with a message that
/// tells the producer what to change (the default serde message would say
/// "invalid type", which is less helpful to someone writing a client).
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_any(KeyVisitor)
    }
}

struct KeyVisitor;

impl KeyVisitor {
    fn refuse<E: de::Error>(got: &str) -> Result<String, E> {
        Err(E::custom(format_args!(
            "{NON_STRING_KEY} (got a {got} key)"
        )))
    }
}

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(NON_STRING_KEY)
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<String, E> {
        Ok(s.to_owned())
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<String, E> {
        Ok(s)
    }

    fn visit_unit<E: de::Error>(self) -> Result<String, E> {
        Self::refuse("null")
    }

    fn visit_none<E: de::Error>(self) -> Result<String, E> {
        Self::refuse("null")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<String, E> {
        Self::refuse("bool")
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<String, E> {
        Self::refuse("integer")
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<String, E> {
        Self::refuse("integer")
    }

    fn visit_i128<E: de::Error>(self, _: i128) -> Result<String, E> {
        Self::refuse("integer")
    }

    fn visit_u128<E: de::Error>(self, _: u128) -> Result<String, E> {
        Self::refuse("integer")
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<String, E> {
        Self::refuse("float")
    }

    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<String, E> {
        Self::refuse("binary")
    }

    fn visit_some<D: Deserializer<'de>>(self, _: D) -> Result<String, D::Error> {
        Self::refuse("optional")
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, _: D) -> Result<String, D::Error> {
        Self::refuse("extension")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<String, A::Error> {
        Self::refuse("array")
    }

    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<String, A::Error> {
        Self::refuse("map")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgpack<T: Serialize>(v: &T) -> Vec<u8> {
        rmp_serde::to_vec(v).unwrap()
    }

    #[test]
    fn json_integers_pick_one_representation() {
        let v: Value =
            serde_json::from_str(r#"[0, -1, 9223372036854775807, 9223372036854775808, 18446744073709551615, -9223372036854775808]"#)
                .unwrap();
        assert_eq!(
            v,
            Value::Array(vec![
                Value::Int(0),
                Value::Int(-1),
                Value::Int(i64::MAX),
                Value::UInt(1 << 63),
                Value::UInt(u64::MAX),
                Value::Int(i64::MIN),
            ])
        );
    }

    #[test]
    fn json_and_msgpack_decode_to_the_same_value() {
        let json = r#"{"b":[1,-2,2.5,"x",null,true],"a":{"z":"é","k":{}}}"#;
        let from_json: Value = serde_json::from_str(json).unwrap();
        let from_msgpack: Value = rmp_serde::from_slice(&msgpack(&from_json)).unwrap();
        assert_eq!(from_json, from_msgpack);
        assert_eq!(
            from_json.get("a").and_then(|a| a.get("z")),
            Some(&Value::from("é"))
        );
        // Insertion order kept.
        let keys: Vec<&str> = from_json
            .as_map()
            .unwrap()
            .iter()
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(keys, ["b", "a"]);
    }

    #[test]
    fn msgpack_small_and_unsigned_integers() {
        let v: Value = rmp_serde::from_slice(&msgpack(&(5u8, -3i8, u64::MAX, 300u16))).unwrap();
        assert_eq!(
            v,
            Value::Array(vec![
                Value::Int(5),
                Value::Int(-3),
                Value::UInt(u64::MAX),
                Value::Int(300)
            ])
        );
    }

    #[test]
    fn msgpack_nan_and_infinity_refused() {
        for f in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let err = rmp_serde::from_slice::<Value>(&msgpack(&f)).unwrap_err();
            assert!(err.to_string().contains(NON_FINITE), "{err}");
        }
        let err = rmp_serde::from_slice::<Value>(&msgpack(&vec![f32::NAN])).unwrap_err();
        assert!(err.to_string().contains(NON_FINITE), "{err}");
    }

    #[test]
    fn msgpack_int_key_refused() {
        let mut m = std::collections::BTreeMap::new();
        m.insert(1u32, "x");
        let err = rmp_serde::from_slice::<Value>(&msgpack(&m)).unwrap_err();
        assert!(
            err.to_string().contains("map keys must be strings"),
            "{err}"
        );
    }

    #[test]
    fn msgpack_binary_refused() {
        // bin 8, length 3
        let err = rmp_serde::from_slice::<Value>(&[0xc4, 3, 1, 2, 3]).unwrap_err();
        assert!(err.to_string().contains(BINARY), "{err}");
        // nested inside a map value
        let err = rmp_serde::from_slice::<Value>(&[0x81, 0xa1, b'k', 0xc4, 1, 0]).unwrap_err();
        assert!(
            err.to_string().contains("binary values are not allowed"),
            "{err}"
        );
    }

    #[test]
    fn msgpack_extension_refused() {
        // fixext 1, type 5, one byte
        let err = rmp_serde::from_slice::<Value>(&[0xd4, 5, 0]).unwrap_err();
        assert!(err.to_string().contains("extension"), "{err}");
    }

    #[test]
    fn serialize_round_trips_through_json() {
        let v: Value = vec![
            ("n".to_owned(), Value::Null),
            ("u".to_owned(), Value::UInt(u64::MAX)),
            ("f".to_owned(), Value::Float(0.5)),
            ("a".to_owned(), Value::from(vec![Value::from(true)])),
        ]
        .into();
        let text = serde_json::to_string(&v).unwrap();
        assert_eq!(
            text,
            r#"{"n":null,"u":18446744073709551615,"f":0.5,"a":[true]}"#
        );
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), v);
    }

    #[test]
    fn helpers() {
        let mut v: Value = [("a", Value::from(1i64)), ("a", Value::from(2i64))]
            .into_iter()
            .collect();
        assert_eq!(v.get("a").and_then(Value::as_i64), Some(2), "last wins");
        assert!(v.insert("a", "x"));
        assert_eq!(v.as_map().unwrap().len(), 1);
        assert_eq!(v.remove("a"), Some(Value::from("x")));
        assert_eq!(v.remove("a"), None);
        assert_eq!(Value::from(u64::MAX).type_name(), "integer");
        assert_eq!(Value::from(7u64), Value::Int(7));
        assert_eq!(Value::from(None::<i64>), Value::Null);
        assert_eq!(Value::from(1.5).type_name(), "float");
        assert_eq!(Value::Int(-1).as_u64(), None);
        assert_eq!(Value::from("s").as_str(), Some("s"));
        assert!(Value::Null.get("x").is_none());
    }
}
