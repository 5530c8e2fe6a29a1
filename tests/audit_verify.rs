//! `geobeat audit verify` against the real binary (issue 18 item 3): data directories are filled
//! through the real `ShardStore` (whose chain thread writes the `.chain` sidecars), audit files
//! through the real flusher; then the binary checks them. Untouched data verifies clean (exit 0);
//! a byte flipped in a sealed segment, and a line deleted from an audit file, are each named
//! (exit 1); verify beside a live writer exits 0; a writer killed with SIGKILL mid-stream leaves
//! a log whose chain the next open extends, and that verifies clean.

mod flusher_support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use flusher_support::{append, audit_sink, drain_in_process, open_stores};
use geobeat::log::chain::chain_file_name;
use geobeat::log::format::segment_file_name;

fn verify(data: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_geobeat"))
        .args(["audit", "verify", "--data-dir", data.to_str().unwrap()])
        .args(extra)
        .env_remove("GEOBEAT_DATA_DIR")
        .output()
        .expect("run geobeat audit verify")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Fills a data directory of `shards` shards with `total` heartbeats, synced, and closes it
/// (a clean stop: the chain threads finish their groups).
fn fill(data: &Path, shards: u32, total: u64) {
    let mut stores = open_stores(data, shards);
    append(&mut stores, 0..total, total, 2);
    for s in &mut stores {
        s.sync_blocking().unwrap();
    }
}

/// The sorted segment bases of a shard directory.
fn bases(dir: &Path) -> Vec<u64> {
    let mut out: Vec<u64> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter_map(|e| geobeat::log::format::parse_segment_file_name(e.file_name().to_str()?))
        .collect();
    out.sort();
    out
}

#[test]
fn untouched_data_verifies_clean_and_a_flipped_byte_in_a_sealed_segment_is_named() {
    // 30,000 heartbeats over 2 shards of 1 MiB segments (at least one sealed each): verify exits 0
    // with every entry chained. Then one byte inside an entry of a sealed segment of shard 1
    // is flipped: verify exits 1 naming shard 1, that segment and the entry's position.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    fill(&data, 2, 30_000);
    let out = verify(&data, &[]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(t.contains("verified: no mismatch"), "{t}");
    println!("{t}");
    assert!(t.contains("0 newest entries not yet chained"), "{t}");
    let shard1 = data.join("shard-0001");
    let b = bases(&shard1);
    assert!(b.len() >= 2, "{b:?}");
    for base in &b {
        assert!(shard1.join(chain_file_name(*base)).exists());
    }
    let victim = shard1.join(segment_file_name(b[0]));
    let mut bytes = std::fs::read(&victim).unwrap();
    let at = 4096 + 5000; // inside an entry (entries are contiguous from 4096)
    bytes[at] ^= 0x20;
    std::fs::write(&victim, &bytes).unwrap();
    let out = verify(&data, &[]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    println!("{t}");
    assert!(t.contains("MISMATCH: shard 1 segment"), "{t}");
    assert!(t.contains(&segment_file_name(b[0])), "{t}");
    let pos: u64 = t
        .split("position ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a position in {t}"));
    assert!(
        pos <= b[0] + at as u64 && b[0] + at as u64 - pos < 1100,
        "{pos} {t}"
    );
    assert!(t.ends_with("1 mismatches\n"), "{t}");
}

#[test]
fn a_deleted_audit_line_is_named() {
    // The flusher writes plain and zstd audit files with digest sidecars; verify with
    // --audit-dir checks every line (exit 0). Deleting one line from the middle of a plain
    // file makes verify name that file and line (exit 1).
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (plain, zst) = (dir.path().join("plain"), dir.path().join("zst"));
    fill(&data, 1, 5_000);
    drain_in_process(
        &data,
        vec![
            audit_sink("plain", &plain, false),
            audit_sink("zst", &zst, true),
        ],
    );
    for d in [&plain, &zst] {
        let out = verify(&data, &["--audit-dir", d.to_str().unwrap()]);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(0), "{t}");
        assert!(t.contains("audit shard 0:"), "{t}");
        println!("{t}");
        assert!(!t.contains(" 0 lines in"), "{t}");
    }
    let shard0 = plain.join("shard-0000");
    let mut files: Vec<_> = std::fs::read_dir(&shard0)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    let victim = &files[files.len() / 2];
    let content = std::fs::read_to_string(victim).unwrap();
    let mut lines: Vec<&str> = content.lines().collect();
    assert!(lines.len() > 10, "{}", lines.len());
    let k = lines.len() / 2;
    lines.remove(k);
    std::fs::write(victim, lines.join("\n") + "\n").unwrap();
    let out = verify(&data, &["--audit-dir", plain.to_str().unwrap()]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    println!("{t}");
    let name = victim.file_name().unwrap().to_str().unwrap();
    assert!(
        t.contains(&format!("{name} line {}:", k + 1)),
        "line {} of {name} expected in {t}",
        k + 1
    );
}

#[test]
fn after_sigkill_the_next_open_extends_the_chain_and_it_verifies() {
    // A child process appends and syncs continuously (its chain thread a little behind); verify
    // run beside it exits 0; then the child is killed with SIGKILL. The next open recovers the log and extends the chain from it (a torn
    // sidecar record is cut off); after a clean stop verify exits 0 with nothing unchained.
    if let Ok(dir) = std::env::var("GEOBEAT_TEST_CHAIN_CHILD") {
        let mut stores = open_stores(Path::new(&dir), 1);
        let mut i = 0;
        loop {
            append(&mut stores, i..i + 500, 10_000_000, 2);
            stores[0].sync_blocking().unwrap();
            i += 500;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "after_sigkill_the_next_open_extends_the_chain_and_it_verifies",
            "--exact",
            "--nocapture",
        ])
        .env("GEOBEAT_TEST_CHAIN_CHILD", &data)
        .spawn()
        .unwrap();
    let shard0 = data.join("shard-0000");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !(shard0.is_dir() && bases(&shard0).len() >= 3) {
        assert!(std::time::Instant::now() < deadline, "the child writes");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Live: verify beside the writer only reads, and finds nothing wrong.
    let out = verify(&data, &[]);
    assert_eq!(out.status.code(), Some(0), "live: {}", text(&out));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // Killed: verify sees a consistent prefix (the chain may lag, nothing mismatches).
    let out = verify(&data, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    drop(open_stores(&data, 1));
    let out = verify(&data, &[]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(t.contains("0 newest entries not yet chained"), "{t}");
}
