//! Parsing of a bulk fence import body, `{"fences":[{"name":..,"shape":..},..]}`
//! (`POST /v1/geofences`), into validated [`Fence`]s. It owns the envelope format, the per-request
//! entry bound and duplicate-name detection; each entry's name and shape go through
//! [`Fence::parse`], the very code `PUT /v1/geofences/{name}` uses, so both routes accept and
//! refuse exactly the same fences with the same reasons. It does not persist or publish anything
//! (see [`super::FenceRegistry::put_many`]).
//!
//! Invariant: [`parse_batch`] returns either every entry, valid and uniquely named, in request
//! order, or the first entry at fault (by index) and why. The envelope is walked without
//! collecting more than [`FENCE_BULK_ENTRIES_MAX`] entries, whatever the body holds.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use serde::de::{Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{Fence, FenceError};
use crate::limits::FENCE_BULK_ENTRIES_MAX;

/// Why a bulk import body was refused.
#[derive(Debug)]
pub struct BatchError {
    /// 0-based index of the first entry at fault; `None` when the body as a whole is (not the
    /// `{"fences":[..]}` envelope, or too many entries).
    pub index: Option<usize>,
    /// The part at fault: `"name"`, `"shape"` (of entry `index`) or `"fences"`.
    pub param: &'static str,
    /// What is wrong (its `reason()` is the stable reason).
    pub error: FenceError,
}

impl fmt::Display for BatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.index {
            Some(i) => write!(f, "fence {i} ({}): {}", self.param, self.error),
            None => write!(f, "{}", self.error),
        }
    }
}

impl std::error::Error for BatchError {}

/// The raw entries of the envelope: at most [`FENCE_BULK_ENTRIES_MAX`] kept, all counted.
struct Entries<'a> {
    kept: Vec<&'a RawValue>,
    total: usize,
}

impl<'de: 'a, 'a> Deserialize<'de> for Entries<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Entries<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of {\"name\":..,\"shape\":..} objects")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Entries<'a>, A::Error> {
                let mut out = Entries {
                    kept: Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024)),
                    total: 0,
                };
                // Past the bound, entries are only skipped and counted (no memory per entry).
                while out.total < FENCE_BULK_ENTRIES_MAX {
                    match seq.next_element::<&'a RawValue>()? {
                        Some(e) => out.kept.push(e),
                        None => return Ok(out),
                    }
                    out.total += 1;
                }
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    out.total += 1;
                }
                Ok(out)
            }
        }
        d.deserialize_seq(V(std::marker::PhantomData))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope<'a> {
    #[serde(borrow)]
    fences: Entries<'a>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry<'a> {
    /// Borrowed unless it holds escapes (which a valid name never needs, but may use).
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(borrow)]
    shape: &'a RawValue,
}

/// Parses and validates a bulk import body: every entry as `PUT /v1/geofences/{name}` would
/// (name, then shape), names unique within the batch, at most [`FENCE_BULK_ENTRIES_MAX`]
/// entries. Returns the fences in request order, or the first fault.
pub fn parse_batch(body: &[u8]) -> Result<Vec<Fence>, BatchError> {
    let whole = |error: FenceError| BatchError {
        index: None,
        param: "fences",
        error,
    };
    let env: Envelope<'_> = serde_json::from_slice(body).map_err(|e| {
        whole(FenceError::BadBatch(format!(
            "the body must be {{\"fences\":[{{\"name\":..,\"shape\":..}},..]}}: {e}"
        )))
    })?;
    if env.fences.total > FENCE_BULK_ENTRIES_MAX {
        return Err(whole(FenceError::TooManyEntries(env.fences.total)));
    }
    let mut fences = Vec::with_capacity(env.fences.kept.len());
    let mut seen: HashSet<&str> = HashSet::with_capacity(env.fences.kept.len());
    let entries: Vec<Entry<'_>> = env
        .fences
        .kept
        .iter()
        .enumerate()
        .map(|(index, raw)| {
            serde_json::from_str::<Entry<'_>>(raw.get()).map_err(|e| BatchError {
                index: Some(index),
                param: "fences",
                error: FenceError::BadBatch(format!(
                    "each entry must be {{\"name\":<string>,\"shape\":<Polygon or circle>}}: {e}"
                )),
            })
        })
        .collect::<Result<_, _>>()?;
    for (index, e) in entries.iter().enumerate() {
        let at = |param, error| BatchError {
            index: Some(index),
            param,
            error,
        };
        // The name first, with its own param, as the PUT route does (name in the path, then body).
        super::validate_name(&e.name).map_err(|err| at("name", err))?;
        let fence =
            Fence::parse(&e.name, e.shape.get().as_bytes()).map_err(|err| at("shape", err))?;
        if !seen.insert(e.name.as_ref()) {
            return Err(at("name", FenceError::DuplicateName(e.name.to_string())));
        }
        fences.push(fence);
    }
    Ok(fences)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CIRCLE: &str = r#"{"center":[13.4,52.5],"radius_m":500}"#;
    const SQUARE: &str = r#"{"type":"Polygon","coordinates":[[[0,0],[1,0],[1,1],[0,1],[0,0]]]}"#;

    fn body(entries: &[(&str, &str)]) -> String {
        let list: Vec<String> = entries
            .iter()
            .map(|(n, s)| format!(r#"{{"name":{},"shape":{s}}}"#, serde_json::json!(n)))
            .collect();
        format!(r#"{{"fences":[{}]}}"#, list.join(","))
    }

    #[test]
    fn a_good_batch_parses_in_order_like_put() {
        // Three valid entries (one with an escaped name) come back in request order, each
        // equal to what Fence::parse (the PUT path) makes of the same name and shape.
        let text = r#"{"fences":[{"name":"b","shape":SQ},{"shape":CI,"name":"\u0061"},{"name":"c.-_","shape":CI}]}"#
            .replace("SQ", SQUARE)
            .replace("CI", CIRCLE);
        let got = parse_batch(text.as_bytes()).unwrap();
        let want = [
            Fence::parse("b", SQUARE.as_bytes()).unwrap(),
            Fence::parse("a", CIRCLE.as_bytes()).unwrap(),
            Fence::parse("c.-_", CIRCLE.as_bytes()).unwrap(),
        ];
        assert_eq!(got, want);
        assert!(parse_batch(br#"{"fences":[]}"#).unwrap().is_empty());
    }

    #[test]
    fn the_first_bad_entry_is_named_with_the_put_reason() {
        // Each bad entry placed at index 2 of otherwise good batches is reported with index 2,
        // the param at fault and the same reason (and message) Fence::parse gives for PUT;
        // an entry after it that is also bad does not mask it.
        let cases: [(&str, &str, &str, &str); 6] = [
            ("bad name", CIRCLE, "name", "bad_name"),
            (
                "x",
                r#"{"center":[1,2],"radius_m":-1}"#,
                "shape",
                "bad_radius",
            ),
            ("x", r#"{"type":"MultiPolygon"}"#, "shape", "bad_geojson"),
            (
                "x",
                r#"{"center":[200,2],"radius_m":1}"#,
                "shape",
                "bad_coordinates",
            ),
            ("x", r#""not a shape""#, "shape", "bad_geojson"),
            ("a", CIRCLE, "name", "duplicate_name"),
        ];
        for (name, shape, param, reason) in cases {
            let text = body(&[("a", CIRCLE), ("b", SQUARE), (name, shape), ("", "1")]);
            let e = parse_batch(text.as_bytes()).unwrap_err();
            assert_eq!(
                (e.index, e.param, e.error.reason()),
                (Some(2), param, reason),
                "{text}: {e}"
            );
            if reason != "duplicate_name" {
                let put = Fence::parse(name, shape.as_bytes()).unwrap_err();
                assert_eq!(e.error.to_string(), put.to_string());
            }
        }
    }

    #[test]
    fn bad_envelopes_and_entries_are_bad_batch() {
        // Not JSON, not an object, no "fences", an unknown member, "fences" not an array are
        // whole-body faults (no index); an entry missing "shape", with a number as name or an
        // unknown member is a fault of that entry (its index).
        for text in [
            "not json",
            "[]",
            "{}",
            r#"{"fences":[],"x":1}"#,
            r#"{"fences":{}}"#,
        ] {
            let e = parse_batch(text.as_bytes()).unwrap_err();
            assert_eq!((e.index, e.error.reason()), (None, "bad_batch"), "{text}");
        }
        for bad in [
            r#"{"name":"x"}"#.to_string(),
            format!(r#"{{"name":7,"shape":{CIRCLE}}}"#),
            format!(r#"{{"name":"x","shape":{CIRCLE},"props":{{}}}}"#),
            "null".to_string(),
        ] {
            let text = format!(r#"{{"fences":[{{"name":"a","shape":{CIRCLE}}},{bad}]}}"#);
            let e = parse_batch(text.as_bytes()).unwrap_err();
            assert_eq!(
                (e.index, e.param, e.error.reason()),
                (Some(1), "fences", "bad_batch"),
                "{text}"
            );
        }
    }

    #[test]
    fn entries_beyond_the_bound_are_refused_with_their_count() {
        // FENCE_BULK_ENTRIES_MAX distinct circles parse; one more is too_many_entries naming
        // the count found, even when the extra entries are not objects at all.
        let names: Vec<String> = (0..=FENCE_BULK_ENTRIES_MAX)
            .map(|i| format!("f{i}"))
            .collect();
        let entries: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), CIRCLE)).collect();
        let at_max = body(&entries[..FENCE_BULK_ENTRIES_MAX]);
        assert_eq!(
            parse_batch(at_max.as_bytes()).unwrap().len(),
            FENCE_BULK_ENTRIES_MAX
        );
        let over = body(&entries);
        let e = parse_batch(over.as_bytes()).unwrap_err();
        assert_eq!((e.index, e.error.reason()), (None, "too_many_entries"));
        assert!(
            e.to_string()
                .contains(&(FENCE_BULK_ENTRIES_MAX + 1).to_string()),
            "{e}"
        );
        let junk = format!("{}, 1, 2]}}", &at_max[..at_max.len() - 2]);
        let e = parse_batch(junk.as_bytes()).unwrap_err();
        assert_eq!(e.error.reason(), "too_many_entries", "{e}");
    }
}
