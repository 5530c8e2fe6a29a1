//! Property tests of recovery: random heartbeats (a few devices, late timestamps) are appended and
//! synced, then the last segment is cut at every byte offset of the final entries, or has random
//! bits flipped there, and the shard is reopened. Whatever the damage, the recovered log must be a
//! prefix of what was appended (never a corrupted or invented record), the last-location table must
//! equal a model computed from that prefix, chains must equal the model's per-device sequences, and
//! appending after recovery must work and survive another reopen.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use geobeat::limits::{ENTRY_HEADER_BYTES, SEGMENT_BYTES_MIN};
use geobeat::log::{LogPos, ScanEnd};
use geobeat::record::Heartbeat;
use geobeat::route::ShardId;
use geobeat::store::{ShardStore, StoreConfig};
use proptest::prelude::*;

const IDS: [&str; 4] = ["truck-0001-aaaaaaaaaa", "truck-0002", "s/ü-3", "x"];

fn scratch_root() -> PathBuf {
    // tmpfs keeps thousands of reopen+fsync cycles fast; fall back to the default temp dir.
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

fn config(dir: &Path) -> StoreConfig {
    StoreConfig {
        dir: dir.to_path_buf(),
        shard: ShardId(0),
        segment_bytes: SEGMENT_BYTES_MIN,
        expected_devices: 0,
        write_mode: geobeat::log::WriteMode::default(),
    }
}

/// (device index, device-time step (negative = late), lat, lon, optional speed, attrs length)
type Step = (usize, i64, f64, f64, Option<f32>, usize);

fn steps() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        (
            0..IDS.len(),
            -5_000i64..10_000,
            -90.0f64..=90.0,
            -180.0f64..=180.0,
            prop::option::of(0.0f32..100.0),
            0usize..40,
        ),
        1..40,
    )
}

fn heartbeats(steps: &[Step]) -> Vec<Heartbeat> {
    let mut ts = 1_732_000_000_000i64;
    steps
        .iter()
        .enumerate()
        .map(|(i, &(dev, step, lat, lon, speed, attrs))| {
            ts += step;
            Heartbeat {
                device_id: IDS[dev].to_string(),
                lat,
                lon,
                ts_ms: ts,
                received_ms: 1_732_000_000_000 + i as i64,
                speed_mps: speed,
                attrs: vec![b'a' + (i % 26) as u8; attrs],
                ..Heartbeat::default()
            }
        })
        .collect()
}

/// What the store must look like after recovering `prefix` (heartbeat, position) pairs.
fn check_against_model(store: &ShardStore, prefix: &[(Heartbeat, LogPos)]) {
    // Entries: exactly the prefix, in order, byte-for-byte equal heartbeats, contiguous seqs.
    let got: Vec<(u64, LogPos, Heartbeat)> = store
        .log()
        .scan_from(LogPos(0), ScanEnd::Written)
        .map(|e| (e.seq, e.pos, e.hb.to_owned_heartbeat()))
        .collect();
    assert_eq!(got.len(), prefix.len(), "recovered entry count");
    for (i, ((seq, pos, hb), (want_hb, want_pos))) in got.iter().zip(prefix).enumerate() {
        assert_eq!(*seq, 1 + i as u64);
        assert_eq!(pos, want_pos);
        assert_eq!(hb, want_hb);
    }
    // Table and chains: a model replayed from the prefix.
    let mut last: HashMap<&str, (&Heartbeat, LogPos)> = HashMap::new();
    let mut chains: HashMap<&str, Vec<LogPos>> = HashMap::new();
    for (hb, pos) in prefix {
        let id = hb.device_id.as_str();
        chains.entry(id).or_default().push(*pos);
        let e = last.entry(id).or_insert((hb, *pos));
        if hb.ts_ms >= e.0.ts_ms {
            *e = (hb, *pos);
        }
    }
    assert_eq!(store.table().len(), last.len());
    for (id, (hb, pos)) in &last {
        let l = store.last(id).expect("device in table");
        assert_eq!(
            (l.lat, l.lon, l.ts_ms, l.received_ms),
            (hb.lat, hb.lon, hb.ts_ms, hb.received_ms)
        );
        assert_eq!(l.pos, *pos);
        let mut chain = chains[id].clone();
        assert_eq!(l.head, *chain.last().unwrap());
        chain.reverse();
        let walked: Vec<LogPos> = store.chain(id).map(|e| e.pos).collect();
        assert_eq!(walked, chain, "chain of {id}");
        assert_eq!(&store.last_record(id).unwrap().hb.to_owned_heartbeat(), *hb);
    }
    for id in IDS {
        if !last.contains_key(id) {
            assert!(store.last(id).is_none());
            assert_eq!(store.chain(id).count(), 0);
        }
    }
}

/// Appends one more heartbeat after recovery, syncs, reopens: the log must be prefix + new entry.
fn check_append_after_recovery(dir: &Path, mut store: ShardStore, prefix: &[(Heartbeat, LogPos)]) {
    let extra = Heartbeat {
        device_id: IDS[1].to_string(),
        lat: 1.0,
        lon: 2.0,
        ts_ms: 1,
        received_ms: 2,
        ..Heartbeat::default()
    };
    let pos = store.append(&extra).unwrap();
    store.sync_blocking().unwrap();
    drop(store);
    let (store, report) = ShardStore::open(&config(dir)).unwrap();
    assert!(
        report.damaged.is_empty() && report.torn_tail_bytes == 0,
        "{report:?}"
    );
    let mut want = prefix.to_vec();
    want.push((extra, pos));
    check_against_model(&store, &want);
}

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    seg_path: PathBuf,
    pristine: Vec<u8>,
    appended: Vec<(Heartbeat, LogPos)>,
    /// Per entry: [pos, pos + header + payload) — the bytes its CRC covers.
    covered: Vec<(usize, usize)>,
}

fn build(hbs: Vec<Heartbeat>) -> Fixture {
    let tmp = tempfile::tempdir_in(scratch_root()).unwrap();
    let dir = tmp.path().join("shard-0000");
    let (mut store, _) = ShardStore::open(&config(&dir)).unwrap();
    let mut appended = Vec::new();
    for hb in hbs {
        let pos = store.append(&hb).unwrap();
        appended.push((hb, pos));
    }
    store.sync_blocking().unwrap();
    assert_eq!(store.stats().segments, 1);
    drop(store);
    let seg_path = dir.join("00000000000000000000.seg");
    let pristine = std::fs::read(&seg_path).unwrap();
    let covered = appended
        .iter()
        .map(|(_, pos)| {
            let at = pos.0 as usize;
            let len = u32::from_le_bytes(pristine[at..at + 4].try_into().unwrap()) as usize;
            (at, at + ENTRY_HEADER_BYTES + len)
        })
        .collect();
    Fixture {
        _tmp: tmp,
        dir,
        seg_path,
        pristine,
        appended,
        covered,
    }
}

impl Fixture {
    fn restore(&self, bytes: &[u8]) {
        let _ = std::fs::remove_dir_all(self.dir.join("quarantine"));
        std::fs::write(&self.seg_path, bytes).unwrap();
    }

    /// Byte range of the final `n` entries (plus a little of the zero tail after them).
    fn final_region(&self, n: usize) -> (usize, usize) {
        let first = self.covered.len().saturating_sub(n);
        let start = self.covered[first].0;
        let end = self.covered.last().unwrap().1 + 24;
        (start, end)
    }
}

proptest! {
    // Each case reopens the shard a few hundred times: keep the case count modest.
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn cut_at_every_offset_recovers_a_prefix(steps in steps()) {
        // Truncates the segment file at every byte offset inside the last two entries: the entries
        // whose bytes all survive the cut are recovered, nothing else, and no damage is reported.
        let fx = build(heartbeats(&steps));
        let (start, end) = fx.final_region(2);
        for cut in start..=end.min(fx.pristine.len()) {
            fx.restore(&fx.pristine[..cut]);
            let (store, report) = ShardStore::open(&config(&fx.dir)).unwrap();
            prop_assert!(report.damaged.is_empty(), "cut {cut}: {report:?}");
            // An entry survives if every byte the cut removed from it was zero anyway (the file is
            // re-extended with zeros), e.g. a payload ending in zero bytes.
            let keep = fx
                .covered
                .iter()
                .take_while(|&&(_, hi)| hi <= cut || fx.pristine[cut..hi].iter().all(|&b| b == 0))
                .count();
            check_against_model(&store, &fx.appended[..keep]);
            if cut % 13 == 0 {
                check_append_after_recovery(&fx.dir, store, &fx.appended[..keep]);
            }
        }
    }

    #[test]
    fn bit_flips_recover_the_prefix_before_the_first_damaged_entry(
        steps in steps(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 0u8..8), 1..4),
    ) {
        // Flips 1-3 random bits in the region of the last three entries (and the zero tail after
        // them). The recovered log is exactly the entries before the first one whose CRC-covered
        // bytes were hit; damage is reported (and quarantined) iff valid entries follow it.
        let fx = build(heartbeats(&steps));
        let (start, end) = fx.final_region(3);
        let mut bytes = fx.pristine.clone();
        let mut hit: Vec<usize> = Vec::new();
        for (idx, bit) in &flips {
            let at = start + idx.index(end - start);
            bytes[at] ^= 1 << bit;
            hit.push(at);
        }
        // Flipping the same bit twice undoes it: judge by the final bytes.
        let changed = |lo: usize, hi: usize| (lo..hi).any(|b| bytes[b] != fx.pristine[b]);
        let first_bad = fx.covered.iter().position(|&(lo, hi)| changed(lo, hi));
        fx.restore(&bytes);
        let (store, report) = ShardStore::open(&config(&fx.dir)).unwrap();
        let keep = first_bad.unwrap_or(fx.appended.len());
        check_against_model(&store, &fx.appended[..keep]);
        let later_valid = first_bad.is_some_and(|k| {
            fx.covered[k + 1..].iter().any(|&(lo, hi)| !changed(lo, hi))
        });
        prop_assert_eq!(!report.damaged.is_empty(), later_valid, "{:?}", report);
        if later_valid {
            let copy = report.damaged[0].copy.clone().expect("quarantine copy");
            prop_assert!(copy.starts_with(fx.dir.join("quarantine")));
            prop_assert_eq!(std::fs::read(&copy).unwrap(), bytes.clone());
            prop_assert_eq!(report.damaged[0].offset as usize, fx.covered[keep].0);
        }
        check_append_after_recovery(&fx.dir, store, &fx.appended[..keep]);
    }
}
