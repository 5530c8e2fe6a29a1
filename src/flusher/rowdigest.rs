//! The digest chain of PostgreSQL `history` rows (issue 18 item 3): the canonical bytes of a row
//! and the chain step `digest = SHA-256(previous digest ‖ canonical bytes)`. The PostgreSQL sink
//! computes it from log entries while it writes; `geobeat audit verify --postgres` recomputes it
//! from the rows it reads back. It owns the byte layout of the canonical form (version 1 below)
//! and nothing else: it does not read or write PostgreSQL or the log.
//!
//! Canonical bytes, version 1 (all integers little-endian): `shard` u32, `pos` u64, `seq` u64,
//! the id's length u32 and its UTF-8 bytes, `lat` and `lon` as f64 bits, `ts` and `received_at`
//! i64, then `alt`, `speed`, `heading`, `acc` each as a byte 0 (null) or 1 followed by the f32
//! bits, then `attrs` as a byte 0 (null) or 1 followed by the length u32 and the bytes of the
//! canonical JSON of the attrs (object keys sorted, duplicates resolved to the last as jsonb
//! does, every number as the shortest text of its f64 value, integral values below 2^53 without
//! a fraction, -0 as 0, no whitespace) — because `jsonb` normalises what the sink sends (key
//! order, spacing, number spelling), so only a normal form both sides reach is comparable.
//! Floating columns are hashed as bits: `double precision` and `real` store them exactly.
//!
//! Invariant: the canonical bytes of a row depend only on its column values, so a row written by
//! the sink and the same row read back from PostgreSQL hash the same, and any change of any
//! column (or of the predecessor's digest) changes the digest.

use sha2::{Digest as _, Sha256};

/// The predecessor digest of a shard's first chained row (and of the first row after rows
/// written without digests, by an older build).
pub const GENESIS: [u8; 32] = [0; 32];

/// The column values of one `history` row, as the sink writes them and as the verifier reads
/// them back.
#[derive(Debug, Clone, PartialEq)]
pub struct RowFields {
    /// `shard`.
    pub shard: u32,
    /// `pos`: the entry's log position.
    pub pos: u64,
    /// `seq`: the shard-wide sequence number.
    pub seq: u64,
    /// `id`: the device id.
    pub id: String,
    /// `lat`.
    pub lat: f64,
    /// `lon`.
    pub lon: f64,
    /// `ts`: device time, ms.
    pub ts: i64,
    /// `received_at`: server time, ms.
    pub received_at: i64,
    /// `alt`, `speed`, `heading`, `acc`.
    pub opt: [Option<f32>; 4],
    /// `attrs` as JSON text (any spelling: it is normalised before hashing), `None` for null.
    pub attrs: Option<String>,
}

/// Names of [`RowFields::opt`], in order.
pub const OPT_COLUMNS: [&str; 4] = ["alt", "speed", "heading", "acc"];

impl RowFields {
    /// The fields of log entry `e` of shard `shard`, as the sink writes them.
    pub fn from_entry(shard: crate::route::ShardId, e: &crate::log::Entry<'_>) -> RowFields {
        let hb = e.hb;
        let attrs = if hb.attrs.is_empty() {
            None
        } else {
            let mut json = Vec::new();
            super::encode::write_attrs_json(&mut json, hb.attrs.as_slice());
            Some(String::from_utf8_lossy(&json).into_owned())
        };
        let o = |v: &rkyv::option::ArchivedOption<rkyv::rend::f32_le>| {
            v.as_ref().map(|x| x.to_native())
        };
        RowFields {
            shard: shard.0,
            pos: e.pos.0,
            seq: e.seq,
            id: hb.device_id.as_str().to_owned(),
            lat: hb.lat.to_native(),
            lon: hb.lon.to_native(),
            ts: hb.ts_ms.to_native(),
            received_at: hb.received_ms.to_native(),
            opt: [
                o(&hb.alt_m),
                o(&hb.speed_mps),
                o(&hb.heading_deg),
                o(&hb.acc_m),
            ],
            attrs,
        }
    }

    /// The first column whose value differs from `other`'s, with both values as text (attrs
    /// compared in their canonical form).
    pub fn first_difference(&self, other: &RowFields) -> Option<(&'static str, String, String)> {
        let d = |name, a: String, b: String| if a == b { None } else { Some((name, a, b)) };
        let fbits = |v: f64| {
            format!(
                "{v}{}",
                if v.to_bits() >> 63 == 1 && v == 0.0 {
                    " (-0)"
                } else {
                    ""
                }
            )
        };
        let opt = |v: Option<f32>| v.map_or("null".to_string(), |x| x.to_string());
        let attrs = |a: &Option<String>| match a {
            None => "null".to_string(),
            Some(t) => {
                let mut out = Vec::new();
                canonical_json(&mut out, t);
                String::from_utf8_lossy(&out).into_owned()
            }
        };
        d("shard", self.shard.to_string(), other.shard.to_string())
            .or_else(|| d("pos", self.pos.to_string(), other.pos.to_string()))
            .or_else(|| d("seq", self.seq.to_string(), other.seq.to_string()))
            .or_else(|| d("id", format!("{:?}", self.id), format!("{:?}", other.id)))
            .or_else(|| {
                (self.lat.to_bits() != other.lat.to_bits())
                    .then(|| ("lat", fbits(self.lat), fbits(other.lat)))
            })
            .or_else(|| {
                (self.lon.to_bits() != other.lon.to_bits())
                    .then(|| ("lon", fbits(self.lon), fbits(other.lon)))
            })
            .or_else(|| d("ts", self.ts.to_string(), other.ts.to_string()))
            .or_else(|| {
                d(
                    "received_at",
                    self.received_at.to_string(),
                    other.received_at.to_string(),
                )
            })
            .or_else(|| {
                (0..4).find_map(|k| {
                    let (a, b) = (self.opt[k], other.opt[k]);
                    (a.map(f32::to_bits) != b.map(f32::to_bits))
                        .then(|| (OPT_COLUMNS[k], opt(a), opt(b)))
                })
            })
            .or_else(|| d("attrs", attrs(&self.attrs), attrs(&other.attrs)))
    }

    /// Appends the canonical bytes (version 1, see the module docs) to `out`.
    pub fn canonical(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.shard.to_le_bytes());
        out.extend_from_slice(&self.pos.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&(self.id.len() as u32).to_le_bytes());
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(&self.lat.to_bits().to_le_bytes());
        out.extend_from_slice(&self.lon.to_bits().to_le_bytes());
        out.extend_from_slice(&self.ts.to_le_bytes());
        out.extend_from_slice(&self.received_at.to_le_bytes());
        for v in self.opt {
            match v {
                None => out.push(0),
                Some(x) => {
                    out.push(1);
                    out.extend_from_slice(&x.to_bits().to_le_bytes());
                }
            }
        }
        match &self.attrs {
            None => out.push(0),
            Some(text) => {
                out.push(1);
                let len_at = out.len();
                out.extend_from_slice(&[0; 4]);
                canonical_json(out, text);
                let len = (out.len() - len_at - 4) as u32;
                out[len_at..len_at + 4].copy_from_slice(&len.to_le_bytes());
            }
        }
    }
}

/// The chain step: SHA-256 of the predecessor's digest (as stored: normally 32 bytes, or
/// [`GENESIS`]) followed by a row's canonical bytes.
pub fn row_digest(prev: &[u8], canonical: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(canonical);
    h.finalize().into()
}

/// Appends the canonical JSON of `text` (see the module docs); text that is not JSON (never
/// written by the sink) is appended as is behind a marker byte 0xff, which no JSON text holds.
pub fn canonical_json(out: &mut Vec<u8>, text: &str) {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(v) => write_value(out, &v),
        Err(_) => {
            out.push(0xff);
            out.extend_from_slice(text.as_bytes());
        }
    }
}

fn write_value(out: &mut Vec<u8>, v: &serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(0.0);
            if x == 0.0 {
                out.push(b'0');
            } else if x.fract() == 0.0 && x.abs() < 9_007_199_254_740_992.0 {
                out.extend_from_slice(itoa::Buffer::new().format(x as i64).as_bytes());
            } else {
                // Display: the shortest text that reads back as the same f64, no exponent.
                out.extend_from_slice(x.to_string().as_bytes());
            }
        }
        Value::String(s) => {
            serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail")
        }
        Value::Array(a) => {
            out.push(b'[');
            for (k, item) in a.iter().enumerate() {
                if k > 0 {
                    out.push(b',');
                }
                write_value(out, item);
            }
            out.push(b']');
        }
        // serde_json's map is ordered by key (no `preserve_order`), and its parser keeps the
        // last of duplicate keys, as jsonb does.
        Value::Object(m) => {
            out.push(b'{');
            for (k, (key, item)) in m.iter().enumerate() {
                if k > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, key).expect("writing to a Vec cannot fail");
                out.push(b':');
                write_value(out, item);
            }
            out.push(b'}');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> RowFields {
        RowFields {
            shard: 1,
            pos: 4096,
            seq: 7,
            id: "dev-1".into(),
            lat: 52.5,
            lon: 13.4,
            ts: 1_790_000_000_000,
            received_at: 1_790_000_000_100,
            opt: [Some(34.5), None, Some(0.1), Some(4.0)],
            attrs: Some(r#"{"b": 1e3, "a": [1.50, "x\u00e9"], "b": 2.0}"#.into()),
        }
    }

    #[test]
    fn canonical_json_is_the_normal_form_jsonb_and_the_sink_both_reach() {
        // Spelling jsonb changes (key order, spaces, exponents, trailing zeros, escapes) does
        // not change the canonical form; duplicates keep the last value, as jsonb does.
        let mut a = Vec::new();
        canonical_json(
            &mut a,
            r#"{"b": 1e3, "a": [1.50, "x\u00e9", -0], "b": 2.0}"#,
        );
        let mut b = Vec::new();
        canonical_json(&mut b, r#"{"a": [1.5, "xé", 0], "b": 2}"#);
        assert_eq!(
            String::from_utf8(a.clone()).unwrap(),
            r#"{"a":[1.5,"xé",0],"b":2}"#
        );
        assert_eq!(a, b);
        let mut c = Vec::new();
        canonical_json(&mut c, r#"{"a": [1.5, "xé", 0], "b": 3}"#);
        assert_ne!(a, c);
    }

    #[test]
    fn every_column_and_the_predecessor_change_the_digest() {
        let base = row();
        let mut canon = Vec::new();
        base.canonical(&mut canon);
        let d = row_digest(&GENESIS, &canon);
        let mut variants: Vec<RowFields> = Vec::new();
        let mut v = base.clone();
        v.shard = 2;
        variants.push(v);
        let mut v = base.clone();
        v.pos += 1;
        variants.push(v);
        let mut v = base.clone();
        v.seq += 1;
        variants.push(v);
        let mut v = base.clone();
        v.id.push('x');
        variants.push(v);
        let mut v = base.clone();
        v.lat = f64::from_bits(base.lat.to_bits() + 1);
        variants.push(v);
        let mut v = base.clone();
        v.lon = -13.4;
        variants.push(v);
        let mut v = base.clone();
        v.ts += 1;
        variants.push(v);
        let mut v = base.clone();
        v.received_at -= 1;
        variants.push(v);
        for k in 0..4 {
            let mut v = base.clone();
            v.opt[k] = if v.opt[k].is_some() { None } else { Some(0.0) };
            variants.push(v);
        }
        let mut v = base.clone();
        v.attrs = None;
        variants.push(v);
        let mut v = base.clone();
        v.attrs = Some(r#"{"a":[1.5,"xé"],"b":2.5}"#.into());
        variants.push(v);
        for v in &variants {
            let mut c = Vec::new();
            v.canonical(&mut c);
            assert_ne!(row_digest(&GENESIS, &c), d, "{v:?}");
            assert!(base.first_difference(v).is_some(), "{v:?}");
        }
        assert_eq!(
            base.first_difference(&variants[4]).unwrap().0,
            "lat",
            "the column is named"
        );
        assert_ne!(row_digest(&d, &canon), d, "the predecessor counts");
        // The same values in another JSON spelling hash the same.
        let mut same = base.clone();
        same.attrs = Some(r#"{"a":[1.5,"xé"],"b":2}"#.into());
        let mut c = Vec::new();
        same.canonical(&mut c);
        assert_eq!(row_digest(&GENESIS, &c), d);
        assert_eq!(base.first_difference(&same), None);
    }
}
