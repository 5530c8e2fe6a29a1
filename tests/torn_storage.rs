//! Torn and damaged storage, end to end: heartbeats are ingested through the real server
//! (`--segment-bytes 1MiB`, so each shard has several segments), the server is stopped, segment
//! files are truncated at random offsets, bit-flipped and given bad headers (the format is in
//! `shards/README.md`; this file parses it independently), and the server is restarted.
//!
//! Each scenario checks that the server starts (or, for the one documented case — an unusable
//! header on a shard's first segment — refuses with a message naming the file, and starts once it
//! is moved aside), logs what it found, serves exactly the heartbeats before the damage point (the
//! history of every device equals the intact prefix: nothing lost before the damage, nothing
//! resurrected after it), keeps the last location at the newest surviving heartbeat, accepts new
//! heartbeats, and still agrees after one more restart. Offsets are random; the seed is printed
//! and `GB_SEED` replays it.

mod common;
use common::*;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use geobeat::route::shard_of;
use rand::{Rng, SeedableRng};

const SHARDS: u32 = 2;
const DEVICES_PER_SHARD: usize = 4;
/// Heartbeats ingested in total: with `ATTRS` each entry takes about 330 bytes, so each shard
/// gets 3+ segments of 1 MiB while there are few entries to read back.
const HEARTBEATS: usize = 21_000;
const FRAME_HEARTBEATS: usize = 150;
/// Attributes carried by every heartbeat (within the 256-byte bound).
const ATTRS: &str = r#"{"pad":"................................................................................................................................................................................................"}"#;
const SEGMENT_HEADER: usize = 4096;
const ENTRY_HEADER: usize = 32;

/// One entry found in a segment file.
#[derive(Debug, Clone)]
struct Rec {
    /// Index of its segment in the shard (base order).
    segment: usize,
    /// Byte offset of the entry in the segment file.
    offset: usize,
    /// Bytes covered by the CRC end here (header + payload, padding excluded).
    covered_end: usize,
    /// One past the entry's last non-zero byte. A truncation at or after it leaves the entry
    /// intact: recovery extends a short file with zeros, which restores exactly these bytes.
    nonzero_end: usize,
    device: String,
    ts: i64,
    lat: f64,
}

/// One shard's segment files (base order) and entries (log order).
#[derive(Debug, Clone)]
struct ShardFiles {
    segments: Vec<PathBuf>,
    recs: Vec<Rec>,
}

/// The pristine data directory, built once per test binary and copied by every scenario.
struct Fixture {
    dir: PathBuf,
    shards: Vec<ShardFiles>,
    /// Device ids per shard.
    devices: Vec<Vec<String>>,
}

fn lat_of(ts: i64) -> f64 {
    ((ts % 170_000) - 85_000) as f64 / 1000.0
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}

/// Parses a shard directory by the documented format: segments named by base, a 4096-byte
/// header, then 8-aligned entries `[len u32][crc u32][seq][prev][hash][reserved][payload]`.
fn parse_shard(dir: &Path) -> ShardFiles {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segments.sort();
    let mut recs = Vec::new();
    for (i, path) in segments.iter().enumerate() {
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(&bytes[..8], b"GEOBLOG\0", "{}", path.display());
        let mut off = SEGMENT_HEADER;
        while off + ENTRY_HEADER <= bytes.len() {
            let len = u32_at(&bytes, off) as usize;
            if len == 0 {
                break;
            }
            let covered_end = off + ENTRY_HEADER + len;
            let crc = crc32c::crc32c_append(
                crc32c::crc32c(&bytes[off..off + 4]),
                &bytes[off + 8..covered_end],
            );
            assert_eq!(crc, u32_at(&bytes, off + 4), "pristine entry CRC");
            let mut aligned = rkyv::util::AlignedVec::<16>::new();
            aligned.extend_from_slice(&bytes[off + ENTRY_HEADER..covered_end]);
            let hb = geobeat::record::access(&aligned).expect("pristine record");
            let nonzero_end = off
                + 1
                + bytes[off..covered_end]
                    .iter()
                    .rposition(|&b| b != 0)
                    .expect("an entry header is never all zero");
            recs.push(Rec {
                segment: i,
                offset: off,
                covered_end,
                nonzero_end,
                device: hb.device_id.as_str().to_string(),
                ts: hb.ts_ms.to_native(),
                lat: hb.lat.to_native(),
            });
            off += (ENTRY_HEADER + len).div_ceil(8) * 8;
        }
    }
    ShardFiles { segments, recs }
}

fn shard_dir(data: &Path, shard: usize) -> PathBuf {
    data.join(format!("shard-{shard:04}"))
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        // Remove fixtures of earlier runs whose process is gone.
        for e in std::fs::read_dir(&root).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(pid) = name.strip_prefix("torn-fixture-") {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = root.join(format!("torn-fixture-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut devices: Vec<Vec<String>> = vec![Vec::new(); SHARDS as usize];
        for k in 0.. {
            let id = format!("torn-{k}");
            let s = shard_of(&id, SHARDS).0 as usize;
            if devices[s].len() < DEVICES_PER_SHARD {
                devices[s].push(id);
            }
            if devices.iter().all(|d| d.len() == DEVICES_PER_SHARD) {
                break;
            }
        }
        let all: Vec<&String> = devices.iter().flatten().collect();
        let log = dir.join("ingest.log");
        let mut server = Server::start_logged(
            &dir.join("data"),
            &["--shards", "2", "--segment-bytes", "1MiB"],
            &log,
        );
        let gw = server.token(&["gateway", "torn-"]);
        let mut ws = ws_connect(&server, &gw).unwrap();
        let base = now_ms() - 7_200_000;
        let mut seq = 0u64;
        for frame in 0..HEARTBEATS / FRAME_HEARTBEATS {
            let mut text = String::from("[");
            for k in 0..FRAME_HEARTBEATS {
                let i = frame * FRAME_HEARTBEATS + k;
                let id = all[i % all.len()];
                let ts = base + i as i64;
                seq += 1;
                if k > 0 {
                    text.push(',');
                }
                text.push_str(&format!(
                    r#"{{"seq":{seq},"id":"{id}","lat":{},"lon":1.5,"ts":{ts},"attrs":{ATTRS}}}"#,
                    lat_of(ts)
                ));
            }
            text.push(']');
            ws.send(Message::text(text)).unwrap();
            // Every 8 frames, and at the end: wait for the ack covering everything sent.
            if frame % 8 == 7 || frame + 1 == HEARTBEATS / FRAME_HEARTBEATS {
                assert!(wait_ack(&mut ws, seq).is_empty());
            }
        }
        drop(ws);
        assert!(server.sigterm().success());
        let shards: Vec<ShardFiles> = (0..SHARDS as usize)
            .map(|s| parse_shard(&shard_dir(&dir.join("data"), s)))
            .collect();
        for (s, f) in shards.iter().enumerate() {
            assert!(
                f.segments.len() >= 3,
                "shard {s} has {} segments; the scenarios need 3",
                f.segments.len()
            );
            let n: usize = f.recs.len();
            assert!(n > 0);
        }
        assert_eq!(
            shards.iter().map(|s| s.recs.len()).sum::<usize>(),
            HEARTBEATS,
            "every acked heartbeat is in the files"
        );
        Fixture {
            dir,
            shards,
            devices,
        }
    })
}

fn rng_for(name: &str) -> rand::rngs::StdRng {
    let seed: u64 = std::env::var("GB_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("{name}: seed {seed} (GB_SEED={seed} replays)");
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// A private copy of the pristine data directory.
fn copy_data(to: &Path) -> PathBuf {
    let data = to.join("data");
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(fixture().dir.join("data"))
        .arg(&data)
        .status()
        .unwrap();
    assert!(st.success());
    data
}

/// Where a shard's log is cut: entries of earlier segments survive, and in `segment` those whose
/// CRC-covered bytes end at or before `offset`; everything later is gone.
#[derive(Debug, Clone, Copy)]
struct Cut {
    segment: usize,
    offset: usize,
}

/// Surviving (ts, lat) per device, given one optional cut per shard and, per shard, the first
/// segment kept (segments before it were moved aside by the operator).
fn survivors(cuts: &[Option<Cut>], first_kept: &[usize]) -> HashMap<String, BTreeMap<i64, f64>> {
    let f = fixture();
    let mut out: HashMap<String, BTreeMap<i64, f64>> = HashMap::new();
    for id in f.devices.iter().flatten() {
        out.insert(id.clone(), BTreeMap::new());
    }
    for (s, files) in f.shards.iter().enumerate() {
        for r in &files.recs {
            if r.segment < first_kept[s] {
                continue;
            }
            let keep = match cuts[s] {
                None => true,
                Some(c) => {
                    r.segment < c.segment || (r.segment == c.segment && r.nonzero_end <= c.offset)
                }
            };
            if keep {
                out.get_mut(&r.device).unwrap().insert(r.ts, r.lat);
            }
        }
    }
    out
}

/// Every device's history is exactly `expected` (newest first), and its last location is the
/// newest of them.
fn check_served(
    server: &Server,
    ops: &str,
    expected: &HashMap<String, BTreeMap<i64, f64>>,
    when: &str,
) {
    for (id, want) in expected {
        let got = history_all(server, id, ops).unwrap_or_default();
        let got_ts: Vec<i64> = got.iter().map(|h| h["ts"].as_i64().unwrap()).collect();
        let want_ts: Vec<i64> = want.keys().rev().copied().collect();
        if got_ts != want_ts {
            let missing = want_ts.iter().filter(|t| !got_ts.contains(t)).count();
            let extra = got_ts.iter().filter(|t| !want.contains_key(t)).count();
            panic!(
                "{when}: {id}: history has {} heartbeats, expected {} ({missing} missing, {extra} \
                 not expected)",
                got_ts.len(),
                want_ts.len()
            );
        }
        for h in &got {
            assert_eq!(
                h["lat"].as_f64(),
                Some(want[&h["ts"].as_i64().unwrap()]),
                "{when}: {id}"
            );
        }
        match (want.iter().next_back(), last_location(server, id, ops)) {
            (None, None) => {}
            (Some((ts, lat)), Some(last)) => {
                assert_eq!(
                    last["ts"].as_i64(),
                    Some(*ts),
                    "{when}: {id}: last location"
                );
                assert_eq!(
                    last["lat"].as_f64(),
                    Some(*lat),
                    "{when}: {id}: last location"
                );
            }
            (w, l) => panic!("{when}: {id}: expected last {w:?}, got {l:?}"),
        }
    }
}

/// Restarts on damaged data, checks what is served, appends one new heartbeat per device (when
/// `append`), then restarts once more and checks again. Returns the server log.
fn restart_and_check(
    work: &Path,
    data: &Path,
    mut expected: HashMap<String, BTreeMap<i64, f64>>,
    append: bool,
) -> String {
    let log = work.join("server.log");
    let mut server =
        Server::start_logged(data, &["--shards", "2", "--segment-bytes", "1MiB"], &log);
    let ops = server.token(&["ops"]);
    check_served(&server, &ops, &expected, "after recovery");
    if append {
        append_one_each(&server, &mut expected);
        for (id, want) in &expected {
            let last = last_location(&server, id, &ops).expect("appended");
            assert_eq!(
                last["ts"].as_i64(),
                want.keys().next_back().copied(),
                "{id}"
            );
        }
    }
    assert!(server.sigterm().success());
    server.restart_logged(&log);
    check_served(&server, &ops, &expected, "after a second restart");
    assert!(server.sigterm().success());
    std::fs::read_to_string(&log).unwrap()
}

/// New heartbeats (one per device, newer than everything) land after the damage point.
fn append_one_each(server: &Server, expected: &mut HashMap<String, BTreeMap<i64, f64>>) {
    let gw = server.token(&["gateway", "torn-"]);
    let mut ws = ws_connect(server, &gw).unwrap();
    let ts = now_ms();
    let mut seq = 0;
    for (id, want) in expected.iter_mut() {
        seq += 1;
        ws.send(Message::text(format!(
            r#"{{"seq":{seq},"id":"{id}","lat":{},"lon":1.5,"ts":{ts}}}"#,
            lat_of(ts)
        )))
        .unwrap();
        want.insert(ts, lat_of(ts));
    }
    assert!(wait_ack(&mut ws, seq).is_empty(), "appends after recovery");
}

fn quarantined(data: &Path, shard: usize) -> Vec<String> {
    let q = shard_dir(data, shard).join("quarantine");
    let mut names: Vec<String> = std::fs::read_dir(q)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn flip_bit(path: &Path, offset: usize, bit: u8) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset] ^= 1 << bit;
    std::fs::write(path, bytes).unwrap();
}

fn truncate(path: &Path, len: usize) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(len as u64).unwrap();
}

/// A segment file's path in the copy `data`.
fn seg_in(data: &Path, shard: usize, segment: usize) -> PathBuf {
    let name = fixture().shards[shard].segments[segment]
        .file_name()
        .unwrap()
        .to_owned();
    shard_dir(data, shard).join(name)
}

#[test]
fn truncated_last_segments_keep_every_entry_before_the_cut() {
    // Shard 0's last segment is cut at a random byte inside its data, shard 1's exactly at an
    // entry boundary. The server starts, logs the short files and the torn tail, serves every
    // entry that ends before the cut, and nothing after it.
    let mut rng = rng_for("truncate");
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let data = copy_data(work.path());
    let mut cuts = vec![None; 2];
    for (s, cut) in cuts.iter_mut().enumerate() {
        let last = f.shards[s].segments.len() - 1;
        let in_last: Vec<&Rec> = f.shards[s]
            .recs
            .iter()
            .filter(|r| r.segment == last)
            .collect();
        let data_end = in_last.last().unwrap().covered_end;
        let at = if s == 0 {
            rng.gen_range(SEGMENT_HEADER + 1..data_end)
        } else {
            in_last[rng.gen_range(0..in_last.len())].offset
        };
        truncate(&seg_in(&data, s, last), at);
        *cut = Some(Cut {
            segment: last,
            offset: at,
        });
        eprintln!("shard {s}: last segment truncated to {at} bytes");
    }
    let log = restart_and_check(work.path(), &data, survivors(&cuts, &[0, 0]), true);
    assert!(
        log.contains("segment file shorter than its header says"),
        "the short files are reported:\n{log}"
    );
    assert!(log.contains("shard log opened"), "{log}");
}

#[test]
fn bit_flips_in_the_last_segment_keep_the_valid_prefix() {
    // Shard 0: one bit flipped inside an entry in the middle of its last segment (valid entries
    // follow: "damage in the middle", quarantine copy, error log). Shard 1: one bit flipped in the
    // last entry (a torn tail, warning). Both serve exactly the entries before the flipped one.
    let mut rng = rng_for("bitflip");
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let data = copy_data(work.path());
    let mut cuts = vec![None; 2];
    for (s, cut) in cuts.iter_mut().enumerate() {
        let last = f.shards[s].segments.len() - 1;
        let in_last: Vec<&Rec> = f.shards[s]
            .recs
            .iter()
            .filter(|r| r.segment == last)
            .collect();
        let victim = if s == 0 {
            in_last[rng.gen_range(0..in_last.len() - 10)]
        } else {
            in_last[in_last.len() - 1]
        };
        let at = rng.gen_range(victim.offset..victim.covered_end);
        flip_bit(&seg_in(&data, s, last), at, rng.gen_range(0..8));
        *cut = Some(Cut {
            segment: last,
            offset: victim.offset,
        });
        eprintln!(
            "shard {s}: bit flipped at {at} (entry at {})",
            victim.offset
        );
    }
    let log = restart_and_check(work.path(), &data, survivors(&cuts, &[0, 0]), true);
    assert!(
        log.contains("DAMAGE in the middle of the shard log"),
        "{log}"
    );
    assert!(log.contains("zeroing torn tail"), "{log}");
    assert_eq!(
        quarantined(&data, 0).len(),
        1,
        "a forensic copy of the damaged segment"
    );
    assert!(
        quarantined(&data, 1).is_empty(),
        "a torn tail needs no quarantine"
    );
}

#[test]
fn damage_in_a_sealed_segment_quarantines_the_later_segments() {
    // A bit flip inside an entry of shard 0's second segment (sealed, with successors) and a
    // truncation in the middle of shard 1's first segment: each shard keeps the entries before the
    // damage; its later segments are moved into quarantine, and new appends continue at the
    // damage point.
    let mut rng = rng_for("sealed");
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let data = copy_data(work.path());
    let s0: Vec<&Rec> = f.shards[0].recs.iter().filter(|r| r.segment == 1).collect();
    let victim = s0[rng.gen_range(0..s0.len())];
    let at = rng.gen_range(victim.offset..victim.covered_end);
    flip_bit(&seg_in(&data, 0, 1), at, rng.gen_range(0..8));
    let s1: Vec<&Rec> = f.shards[1].recs.iter().filter(|r| r.segment == 0).collect();
    // Strictly inside an entry, so the damage is found in this segment (a cut at an entry
    // boundary is found at the next segment instead, whose first seq then does not follow).
    let victim1 = s1[rng.gen_range(1..s1.len())];
    // Before its last non-zero byte, so the cut really damages it (zeros after it would be
    // restored by the zero extension and leave the entry intact).
    let cut1 = rng.gen_range(victim1.offset + 1..victim1.nonzero_end);
    truncate(&seg_in(&data, 1, 0), cut1);
    eprintln!("shard 0: bit flipped at {at} of segment 1; shard 1: segment 0 cut at {cut1}");
    let cuts = [
        Some(Cut {
            segment: 1,
            offset: victim.offset,
        }),
        Some(Cut {
            segment: 0,
            offset: victim1.offset,
        }),
    ];
    let log = restart_and_check(work.path(), &data, survivors(&cuts, &[0, 0]), true);
    assert!(
        log.contains("DAMAGE in the middle of the shard log"),
        "{log}"
    );
    for (s, damaged) in [(0usize, 1usize), (1, 0)] {
        let q = quarantined(&data, s);
        let later = f.shards[s].segments.len() - damaged - 1;
        assert_eq!(
            q.len(),
            later + 1,
            "shard {s}: a copy plus {later} moved segments: {q:?}"
        );
        for seg in damaged + 1..f.shards[s].segments.len() {
            let name = f.shards[s].segments[seg]
                .file_name()
                .unwrap()
                .to_string_lossy()
                .to_string();
            assert!(
                q.iter().any(|n| n.starts_with(&name)),
                "shard {s}: {name} in {q:?}"
            );
        }
    }
}

#[test]
fn bad_segment_headers_after_the_first_keep_the_segments_before() {
    // Shard 0: a flipped bit in the magic of its third segment's header; shard 1: its second
    // segment truncated inside the header. Everything before those segments is served.
    let mut rng = rng_for("header");
    let work = tempfile::tempdir().unwrap();
    let data = copy_data(work.path());
    flip_bit(
        &seg_in(&data, 0, 2),
        rng.gen_range(0..8),
        rng.gen_range(0..8),
    );
    truncate(&seg_in(&data, 1, 1), rng.gen_range(1..SEGMENT_HEADER));
    let cuts = [
        Some(Cut {
            segment: 2,
            offset: 0,
        }),
        Some(Cut {
            segment: 1,
            offset: 0,
        }),
    ];
    let log = restart_and_check(work.path(), &data, survivors(&cuts, &[0, 0]), true);
    assert!(
        log.contains("DAMAGE in the middle of the shard log"),
        "{log}"
    );
}

#[test]
fn a_bad_first_segment_header_refuses_to_start_naming_the_file_until_moved_aside() {
    // The one case the damage policy refuses: shard 0's first segment has a corrupt header. The
    // server exits non-zero naming the file; after the operator moves it into quarantine/, the
    // server starts and serves the later segments (and shard 1 in full).
    let mut rng = rng_for("first-header");
    let work = tempfile::tempdir().unwrap();
    let data = copy_data(work.path());
    let first = seg_in(&data, 0, 0);
    // Any header byte: magic, version, shard, base, size, seq, created or CRC.
    flip_bit(&first, rng.gen_range(0..52), rng.gen_range(0..8));
    let (status, stderr) = serve_until_exit(
        &[
            "serve",
            "--shards",
            "2",
            "--listen",
            &free_addr().to_string(),
            "--data-dir",
            data.to_str().unwrap(),
        ],
        &work.path().join("refused.log"),
    );
    assert!(
        status.is_some_and(|s| !s.success()),
        "refuses to start: {status:?} {stderr}"
    );
    let name = first.file_name().unwrap().to_string_lossy().to_string();
    assert!(stderr.contains(&name), "the message names {name}: {stderr}");
    let q = shard_dir(&data, 0).join("quarantine");
    // Private like everything in a data directory (the server refuses group/other access).
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&q)
        .unwrap();
    std::fs::rename(&first, q.join(&name)).unwrap();
    restart_and_check(work.path(), &data, survivors(&[None, None], &[1, 0]), true);
}

#[test]
fn garbage_after_the_last_entry_is_zeroed_and_never_resurrected() {
    // Random non-zero bytes written after the last entry of each shard's last segment (what a torn
    // write of a larger batch could leave): all data is served, the tail is zeroed (warning), and
    // entries appended after recovery are not mixed up with the garbage after another restart.
    let mut rng = rng_for("garbage");
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let data = copy_data(work.path());
    for s in 0..2 {
        let last = f.shards[s].segments.len() - 1;
        let end = f.shards[s]
            .recs
            .iter()
            .rfind(|r| r.segment == last)
            .unwrap();
        let start = (end.covered_end).div_ceil(8) * 8;
        let path = seg_in(&data, s, last);
        let mut bytes = std::fs::read(&path).unwrap();
        let n = rng.gen_range(1..4096);
        for b in &mut bytes[start..start + n] {
            *b = rng.gen_range(1..=255);
        }
        std::fs::write(&path, bytes).unwrap();
    }
    let log = restart_and_check(work.path(), &data, survivors(&[None, None], &[0, 0]), true);
    assert!(log.contains("zeroing torn tail"), "{log}");
}

#[test]
fn random_damage_rounds() {
    // Several rounds on one copy, each picking a random shard, entry and kind of damage
    // (truncate, bit flip, overwrite a run of bytes) inside the prefix that is still intact: after
    // each restart the server serves exactly the entries before the damage. Later rounds damage
    // data that earlier recoveries already repaired (zeroed tails, quarantined segments).
    let mut rng = rng_for("random");
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let data = copy_data(work.path());
    let mut cuts: Vec<Option<Cut>> = vec![None; 2];
    for round in 0..2 {
        let s = rng.gen_range(0..2usize);
        let intact: Vec<&Rec> = f.shards[s]
            .recs
            .iter()
            .filter(|r| match cuts[s] {
                None => true,
                Some(c) => {
                    r.segment < c.segment || (r.segment == c.segment && r.nonzero_end <= c.offset)
                }
            })
            .collect();
        assert!(intact.len() > 100, "the prefix shrinks slowly enough");
        let victim = intact[rng.gen_range(intact.len() / 2..intact.len())];
        let path = seg_in(&data, s, victim.segment);
        // Before the victim's last non-zero byte, so that a truncation really damages it.
        let at = rng.gen_range(victim.offset..victim.nonzero_end);
        let kind = ["truncate", "flip", "overwrite"][rng.gen_range(0..3)];
        match kind {
            "truncate" => truncate(&path, at),
            "flip" => flip_bit(&path, at, rng.gen_range(0..8)),
            _ => {
                let mut bytes = std::fs::read(&path).unwrap();
                for b in &mut bytes[at..(at + 64).min(victim.covered_end)] {
                    *b ^= rng.gen_range(1..=255u8);
                }
                std::fs::write(&path, bytes).unwrap();
            }
        }
        eprintln!(
            "round {round}: shard {s}, segment {}, entry at {}, {kind} at {at}",
            victim.segment, victim.offset
        );
        cuts[s] = Some(Cut {
            segment: victim.segment,
            offset: victim.offset,
        });
        let round_dir = work.path().join(format!("round-{round}"));
        std::fs::create_dir_all(&round_dir).unwrap();
        restart_and_check(&round_dir, &data, survivors(&cuts, &[0, 0]), false);
    }
}
