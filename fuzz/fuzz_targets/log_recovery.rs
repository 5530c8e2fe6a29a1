//! Fuzz target: shard log recovery on arbitrary bytes (`geobeat::store::ShardStore::open`). The
//! input becomes segment files in a fresh shard directory (on /dev/shm when present), in one of
//! three shapes chosen by the first byte:
//!
//! - raw file: the whole segment file is the input (headers, sizes, short files);
//! - raw data: a valid header, then the input as the entry area;
//! - structured: the input describes heartbeats, written as valid entries (correct CRCs, seqs,
//!   back-pointers, possibly across two segments), then damaged by fuzz-chosen byte edits.
//!
//! Checks: opening never panics; every recovered entry validates and every table row points at a
//! readable record of that device; in the structured shape the recovered entries are exactly a
//! prefix of what was written (damage never invents or alters an entry); a second open finds a
//! clean log with the same entries (recovery repairs what it reports, once).
#![no_main]

use std::path::Path;

use geobeat::limits::SEGMENT_HEADER_BYTES;
use geobeat::log::format::{segment_file_name, write_entry, SegmentHeader, POS_NONE};
use geobeat::log::ScanEnd;
use geobeat::record::Heartbeat;
use geobeat::route::{device_hash, ShardId};
use geobeat::store::{ShardStore, StoreConfig};
use libfuzzer_sys::fuzz_target;

const SEGMENT_BYTES: u64 = 1 << 20;
const IDS: [&str; 4] = [
    "a",
    "fleet-a/1",
    "\u{e9}t\u{e9}",
    "0123456789012345678901234567890123456789012345678901234567890123",
];

fn header(base: u64, first_seq: u64) -> Vec<u8> {
    let mut h = vec![0u8; SEGMENT_HEADER_BYTES];
    SegmentHeader {
        shard: 0,
        base,
        segment_bytes: SEGMENT_BYTES,
        first_seq,
        created_ms: 1_732_200_000_000,
    }
    .encode(&mut h);
    h
}

/// One entry as compared: device id, device time, latitude bits.
type Rec = (String, i64, u64);
/// Segment files to write: (base position, bytes).
type Files = Vec<(u64, Vec<u8>)>;

/// Entries read back from an opened store, in log order.
fn entries(store: &ShardStore) -> Vec<Rec> {
    let log = store.log();
    let mut out = Vec::new();
    for e in log.scan_from(log.first_pos(), ScanEnd::Written) {
        e.hb.validate().expect("recovered entries validate");
        out.push((
            e.hb.device_id.as_str().to_string(),
            e.hb.ts_ms.to_native(),
            e.hb.lat.to_native().to_bits(),
        ));
    }
    out
}

fn check_table(store: &ShardStore) {
    for (id, last) in store.table().iter() {
        let rec = store
            .last_record(id)
            .expect("a table row points at a readable record");
        assert_eq!(rec.hb.device_id.as_str(), id);
        assert_eq!(rec.hb.ts_ms.to_native(), last.ts_ms);
        for e in store.chain(id) {
            assert_eq!(e.hb.device_id.as_str(), id, "chains stay on one device");
        }
    }
}

/// Writes heartbeats described by `ops` as valid entries; returns the files and what was written.
fn structured(ops: &[u8]) -> (Files, Vec<Rec>, &[u8]) {
    // The op list ends at a 0xFF byte; what follows are damage edits.
    let split = ops.iter().position(|&b| b == 0xFF).unwrap_or(ops.len());
    let (ops, damage) = (&ops[..split], ops.get(split + 1..).unwrap_or(&[]));
    let mut files: Files = vec![(0, header(0, 1))];
    let mut written = Vec::new();
    let mut off = SEGMENT_HEADER_BYTES;
    let mut seq = 1u64;
    let mut heads = [POS_NONE; IDS.len()];
    let mut enc = rkyv::util::AlignedVec::<16>::new();
    for op in ops.chunks_exact(6) {
        if op[0] == 0xFE && files.len() < 2 {
            // Seal: the next entries go to a second segment.
            files.push((SEGMENT_BYTES, header(SEGMENT_BYTES, seq)));
            off = SEGMENT_HEADER_BYTES;
            continue;
        }
        let d = usize::from(op[0]) % IDS.len();
        let hb = Heartbeat {
            device_id: IDS[d].to_string(),
            lat: f64::from(i16::from_le_bytes([op[1], op[2]])) / 400.0,
            lon: f64::from(op[3]) - 100.0,
            ts_ms: 1_732_200_000_000 + i64::from(u16::from_le_bytes([op[4], op[5]])),
            received_ms: 1_732_200_000_000,
            speed_mps: (op[3] & 1 == 1).then_some(f32::from(op[4])),
            attrs: if op[5] & 3 == 0 {
                b"{\"k\":1}".to_vec()
            } else {
                Vec::new()
            },
            ..Default::default()
        };
        hb.validate().expect("generated heartbeats are valid");
        hb.encode_into(&mut enc);
        let (base, bytes) = files.last_mut().unwrap();
        bytes.resize(off + 2048, 0);
        let used = write_entry(
            &mut bytes[off..],
            seq,
            heads[d],
            device_hash(IDS[d]),
            &enc,
        );
        bytes.truncate(off + used);
        heads[d] = *base + off as u64;
        off += used;
        seq += 1;
        written.push((hb.device_id, hb.ts_ms, hb.lat.to_bits()));
    }
    (files, written, damage)
}

fn open(dir: &Path) -> Option<ShardStore> {
    let mut cfg = StoreConfig::new(dir, ShardId(0));
    cfg.segment_bytes = SEGMENT_BYTES;
    match ShardStore::open(&cfg) {
        Ok((store, _report)) => Some(store),
        Err(_) => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let tmp = if Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm").unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let dir = tmp.path().join("shard-0000");
    std::fs::create_dir_all(&dir).unwrap();
    let max = SEGMENT_BYTES as usize;
    // What was written as valid entries, and whether any damage edit was applied.
    let mut expected: Option<(Vec<Rec>, bool)> = None;
    match mode % 3 {
        0 => {
            let file = &rest[..rest.len().min(max)];
            std::fs::write(dir.join(segment_file_name(0)), file).unwrap();
        }
        1 => {
            let mut file = header(0, 1);
            file.extend_from_slice(&rest[..rest.len().min(max - SEGMENT_HEADER_BYTES)]);
            std::fs::write(dir.join(segment_file_name(0)), file).unwrap();
        }
        _ => {
            let (mut files, written, damage) = structured(rest);
            let damaged = damage.chunks_exact(4).any(|d| d[3] != 0);
            // Damage: (file selector, offset u16, xor byte) triples.
            for d in damage.chunks_exact(4) {
                let f = usize::from(d[0]) % files.len();
                let bytes = &mut files[f].1;
                let at = usize::from(u16::from_le_bytes([d[1], d[2]])) % (bytes.len() + 64);
                if at >= bytes.len() {
                    bytes.resize(at + 1, 0);
                }
                bytes[at] ^= d[3];
            }
            for (base, bytes) in &files {
                std::fs::write(dir.join(segment_file_name(*base)), bytes).unwrap();
            }
            expected = Some((written, damaged));
        }
    }
    let Some(store) = open(&dir) else {
        // Refusing to open (e.g. an unusable first header) is allowed; it must not panic.
        return;
    };
    let got = entries(&store);
    check_table(&store);
    if let Some((written, damaged)) = &expected {
        if *damaged {
            assert!(got.len() <= written.len(), "recovery invented entries");
            assert_eq!(
                &written[..got.len()],
                &got[..],
                "recovered entries are a prefix"
            );
        } else {
            assert_eq!(&got, written, "an undamaged log recovers every entry");
        }
    }
    // The log accepts a new append after recovery.
    let mut store = store;
    let hb = Heartbeat {
        device_id: "after".into(),
        lat: 1.0,
        lon: 2.0,
        ts_ms: 1,
        received_ms: 1,
        ..Default::default()
    };
    let appended = store.append(&hb).is_ok();
    if appended {
        store.sync_blocking().expect("sync after recovery");
    }
    drop(store);
    // Second open: clean, same entries (plus the append).
    let mut cfg = StoreConfig::new(&dir, ShardId(0));
    cfg.segment_bytes = SEGMENT_BYTES;
    let (store, report) = ShardStore::open(&cfg).expect("a recovered log reopens");
    assert!(
        report.damaged.is_empty(),
        "damage reported twice: {:?}",
        report.damaged
    );
    assert_eq!(report.torn_tail_bytes, 0, "torn tail reported twice");
    let mut again = entries(&store);
    if appended {
        let last = again.pop().expect("the append survived");
        assert_eq!(last.0, "after");
    }
    assert_eq!(again, got, "reopening changed the recovered entries");
    check_table(&store);
});
