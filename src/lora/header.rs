//! The safetensors header, parsed and validated without copying names.
//!
//! The `safetensors` crate's own parser buffers the whole header through
//! `serde`'s generic content type (it uses `#[serde(flatten)]`) and builds two
//! hash maps; for a 128-tensor adapter that costs ~0.2 ms, more than reading
//! the `first_layer_b` tensors themselves. This parser borrows tensor names
//! from the input and checks the same invariants, in layers:
//!
//! 1. at least 8 bytes; the declared header length within the caller's limit
//!    (before anything is allocated) and within the buffer;
//! 2. the header is UTF-8 JSON: an object of tensor entries plus an optional
//!    `__metadata__` string map; a name may appear once;
//! 3. every entry's element count × dtype width is computed with checked
//!    arithmetic and equals its byte range; the ranges, in offset order, tile
//!    the data section from 0 to its end exactly (no gap, overlap or trailing
//!    bytes).
//!
//! Violations are reported with the same [`SafeTensorError`] variants the
//! `safetensors` crate uses.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use safetensors::{Dtype, SafeTensorError};
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::error::{Error, Result};
use crate::lora::io::ReadLimits;

const LEN_PREFIX: usize = 8;
const METADATA_KEY: &str = "__metadata__";

/// One tensor's header entry.
pub(crate) struct HeaderEntry<'h> {
    pub name: Cow<'h, str>,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: &'h [u8],
}

/// A validated header: entries sorted by name, and the free-form metadata.
pub(crate) struct Header<'h> {
    pub entries: Vec<HeaderEntry<'h>>,
    pub metadata: HashMap<String, String>,
}

#[derive(Deserialize)]
struct RawInfo {
    dtype: Dtype,
    #[serde(deserialize_with = "shape_vec")]
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

/// A shape, collected into a vector sized for the common rank ≤ 4 up front
/// (JSON gives no length hint, so serde's default would grow it from empty).
fn shape_vec<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<usize>, D::Error> {
    struct ShapeVisitor;
    impl<'de> Visitor<'de> for ShapeVisitor {
        type Value = Vec<usize>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of dimensions")
        }

        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut shape = Vec::with_capacity(4);
            while let Some(d) = seq.next_element()? {
                shape.push(d);
            }
            Ok(shape)
        }
    }
    deserializer.deserialize_seq(ShapeVisitor)
}

#[derive(Deserialize)]
struct Name<'a>(#[serde(borrow)] Cow<'a, str>);

struct RawHeader<'h> {
    entries: Vec<(Cow<'h, str>, RawInfo)>,
    metadata: HashMap<String, String>,
}

impl<'de> Deserialize<'de> for RawHeader<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(RawHeaderVisitor)
    }
}

struct RawHeaderVisitor;

impl<'de> Visitor<'de> for RawHeaderVisitor {
    type Value = RawHeader<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a safetensors header object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut header = RawHeader {
            entries: Vec::with_capacity(map.size_hint().unwrap_or(0)),
            metadata: HashMap::new(),
        };
        while let Some(Name(name)) = map.next_key()? {
            if name == METADATA_KEY {
                header.metadata = map.next_value()?;
            } else {
                header.entries.push((name, map.next_value()?));
            }
        }
        Ok(header)
    }
}

/// Parses and validates the header of `bytes`; entry byte ranges borrow `bytes`.
pub(crate) fn parse_header<'h>(bytes: &'h [u8], limits: &ReadLimits) -> Result<Header<'h>> {
    let (json, data) = split_header(bytes, limits)?;
    let text = std::str::from_utf8(json).map_err(SafeTensorError::InvalidHeader)?;
    let raw: RawHeader<'h> =
        serde_json::from_str(text).map_err(SafeTensorError::InvalidHeaderDeserialization)?;
    let mut entries = resolve_ranges(raw.entries, data)?;
    entries.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    if let Some(pair) = entries
        .windows(2)
        .find(|w| w.first().map(|a| &a.name) == w.get(1).map(|b| &b.name))
    {
        let name = pair.first().map(|e| e.name.to_string()).unwrap_or_default();
        let message = format!("tensor name `{name}` appears twice in the header");
        return Err(
            SafeTensorError::InvalidHeaderDeserialization(de::Error::custom(message)).into(),
        );
    }
    Ok(Header {
        entries,
        metadata: raw.metadata,
    })
}

/// Layer 1: the length prefix, checked against the limit and the buffer.
fn split_header<'h>(bytes: &'h [u8], limits: &ReadLimits) -> Result<(&'h [u8], &'h [u8])> {
    let Some((prefix, rest)) = bytes.split_first_chunk::<LEN_PREFIX>() else {
        return Err(SafeTensorError::HeaderTooSmall.into());
    };
    let declared = u64::from_le_bytes(*prefix);
    if declared > limits.max_header_bytes {
        return Err(Error::HeaderTooLarge {
            declared,
            limit: limits.max_header_bytes,
        });
    }
    let len = usize::try_from(declared).map_err(|_| SafeTensorError::HeaderTooLarge)?;
    if len > rest.len() {
        return Err(SafeTensorError::InvalidHeaderLength.into());
    }
    Ok(rest.split_at(len))
}

/// Layer 3: sizes from shapes, byte ranges tiling the data section exactly.
fn resolve_ranges<'h>(
    raw: Vec<(Cow<'h, str>, RawInfo)>,
    data: &'h [u8],
) -> Result<Vec<HeaderEntry<'h>>> {
    let mut by_offset: Vec<(Cow<'h, str>, RawInfo)> = raw;
    by_offset.sort_unstable_by_key(|(_, info)| info.data_offsets);
    let mut expected_start = 0usize;
    let mut entries = Vec::with_capacity(by_offset.len());
    for (name, info) in by_offset {
        let (start, end) = info.data_offsets;
        if start != expected_start || end < start {
            return Err(SafeTensorError::InvalidOffset(name.into_owned()).into());
        }
        if byte_size(&info)? != end - start {
            return Err(SafeTensorError::TensorInvalidInfo.into());
        }
        let Some(bytes) = data.get(start..end) else {
            return Err(SafeTensorError::MetadataIncompleteBuffer.into());
        };
        expected_start = end;
        entries.push(HeaderEntry {
            name,
            dtype: info.dtype,
            shape: info.shape,
            bytes,
        });
    }
    if expected_start != data.len() {
        return Err(SafeTensorError::MetadataIncompleteBuffer.into());
    }
    Ok(entries)
}

fn byte_size(info: &RawInfo) -> Result<usize> {
    let elements = info
        .shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or(SafeTensorError::ValidationOverflow)?;
    let bits = elements
        .checked_mul(info.dtype.bitsize())
        .ok_or(SafeTensorError::ValidationOverflow)?;
    if bits % 8 != 0 {
        return Err(SafeTensorError::MisalignedSlice.into());
    }
    Ok(bits / 8)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use safetensors::SafeTensors;

    use super::*;

    fn fixture() -> Vec<u8> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/lora/update_f16.safetensors"
        );
        std::fs::read(path).unwrap_or_default()
    }

    fn header_bytes(json: &str, data_len: usize) -> Vec<u8> {
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(json.as_bytes());
        bytes.resize(bytes.len() + data_len, 0);
        bytes
    }

    #[test]
    fn a_name_given_twice_is_refused() {
        let json = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        let err = parse_header(&header_bytes(json, 8), &ReadLimits::default()).err();
        assert!(
            matches!(&err, Some(Error::Malformed(SafeTensorError::InvalidHeaderDeserialization(e))) if e.to_string().contains("`a` appears twice")),
            "{err:?}"
        );
    }

    #[test]
    fn names_with_escapes_are_decoded() {
        let json = r#"{"a\u002eb":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        let bytes = header_bytes(json, 4);
        let header = parse_header(&bytes, &ReadLimits::default()).ok();
        let names: Vec<String> = header
            .map(|h| h.entries.iter().map(|e| e.name.to_string()).collect())
            .unwrap_or_default();
        assert_eq!(names, ["a.b"]);
    }

    #[test]
    fn a_gap_between_tensors_is_refused() {
        let json = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#;
        let err = parse_header(&header_bytes(json, 12), &ReadLimits::default()).err();
        assert!(
            matches!(err, Some(Error::Malformed(SafeTensorError::InvalidOffset(n))) if n == "b")
        );
    }

    #[test]
    fn a_size_that_disagrees_with_the_shape_is_refused() {
        let json = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#;
        let err = parse_header(&header_bytes(json, 4), &ReadLimits::default()).err();
        assert!(matches!(
            err,
            Some(Error::Malformed(SafeTensorError::TensorInvalidInfo))
        ));
    }

    #[test]
    fn an_overflowing_shape_is_refused() {
        let json = r#"{"a":{"dtype":"F32","shape":[18446744073709551615,4],"data_offsets":[0,4]}}"#;
        let err = parse_header(&header_bytes(json, 4), &ReadLimits::default()).err();
        assert!(matches!(
            err,
            Some(Error::Malformed(SafeTensorError::ValidationOverflow))
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Differential test against the `safetensors` crate: on mutated
        /// files both parsers accept or reject together, and agree on every
        /// accepted tensor.
        #[test]
        fn agrees_with_the_safetensors_crate(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            header_only in any::<bool>(),
        ) {
            let mut bytes = fixture();
            let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            for (at, value) in edits {
                // Concentrate edits in the header where parsing decisions are made.
                let i = if header_only { 8 + at.index(header_end - 8) } else { at.index(bytes.len()) };
                bytes[i] = value;
            }
            let ours = parse_header(&bytes, &ReadLimits::default());
            let theirs = SafeTensors::deserialize(&bytes);
            prop_assert_eq!(ours.is_ok(), theirs.is_ok(), "ours {:?} theirs {:?}", ours.as_ref().err(), theirs.as_ref().err());
            if let (Ok(ours), Ok(theirs)) = (ours, theirs) {
                prop_assert_eq!(ours.entries.len(), theirs.len());
                for entry in &ours.entries {
                    let view = theirs.tensor(&entry.name).unwrap();
                    prop_assert_eq!(view.dtype(), entry.dtype);
                    prop_assert_eq!(view.shape(), entry.shape.as_slice());
                    prop_assert_eq!(view.data(), entry.bytes);
                }
            }
        }
    }
}
