//! Disk full, end to end: the data directory lives on a small tmpfs (mounted by the test, which
//! needs root; without it the test prints why and checks nothing). A filler file leaves less room
//! than one more segment, heartbeats are ingested until the shards refuse them, and then:
//!
//! - devices get a clear per-heartbeat signal (`{"seq":N,"error":"storage_full"}`), their
//!   connections stay open, and a refused heartbeat is never stored;
//! - queries keep answering (last location and history), and the log says why;
//! - once the filler is deleted, appends resume by themselves (no restart);
//! - after a restart every acked heartbeat is there, nothing refused is, and recovery finds no
//!   damage.
//!
//! A second test asks that `/metrics` counts the `storage_full` refusals under
//! `geobeat_heartbeats_rejected_total{reason="storage_full"}`.

mod common;
use common::*;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use geobeat::route::shard_of;

const TMPFS_BYTES: &str = "8m";
/// Free bytes the filler leaves: less than one 1 MiB segment, so no shard can roll over.
const FREE_AFTER_FILLER: u64 = 512 << 10;
const FRAME_HEARTBEATS: usize = 100;
/// Attributes that make entries about 330 bytes, so a segment fills after ~3,000 heartbeats.
const ATTRS: &str = r#"{"pad":"................................................................................................................................................................................................"}"#;

/// Unmounts (lazily, so a straggling descriptor cannot make it fail) on drop.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

fn mount_tmpfs(at: &Path) -> Result<Mount, String> {
    std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
    let out = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            // mode=0700: a data directory open to group or others is refused at start.
            &format!("size={TMPFS_BYTES},mode=0700"),
            "tmpfs",
        ])
        .arg(at)
        .output()
        .map_err(|e| format!("running mount: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok(Mount(at.to_path_buf()))
}

fn free_bytes(path: &Path) -> u64 {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: statvfs is plain old data; all-zero bytes are a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: the path is NUL-terminated and `st` is a valid, writable statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    assert_eq!(rc, 0, "statvfs");
    st.f_bavail as u64 * st.f_frsize as u64
}

fn lat_of(ts: i64) -> f64 {
    ((ts % 170_000) - 85_000) as f64 / 1000.0
}

/// What one device was sent: ts → (lat, acked).
type Sent = BTreeMap<i64, (f64, Option<bool>)>;

/// A gateway client writing a fixed set of devices; tracks each heartbeat's fate.
struct Gw {
    ws: Ws,
    seq: u64,
    next_ts: i64,
    /// seq → (device index, ts) awaiting an ack or an error.
    pending: BTreeMap<u64, (usize, i64)>,
    ids: Vec<String>,
    sent: Vec<Sent>,
    reasons: Vec<String>,
}

impl Gw {
    /// Sends one frame of heartbeats for `devices` (indices into `ids`) and waits until every one
    /// of them was acked or refused. Returns (acked, refused) counts.
    fn frame(&mut self, devices: &[usize], count: usize) -> (usize, usize) {
        let mut text = String::from("[");
        for k in 0..count {
            self.seq += 1;
            let d = devices[k % devices.len()];
            let ts = self.next_ts;
            self.next_ts += 1;
            if k > 0 {
                text.push(',');
            }
            text.push_str(&format!(
                r#"{{"seq":{},"id":"{}","lat":{},"lon":2.5,"ts":{ts},"attrs":{ATTRS}}}"#,
                self.seq,
                self.ids[d],
                lat_of(ts)
            ));
            self.sent[d].insert(ts, (lat_of(ts), None));
            self.pending.insert(self.seq, (d, ts));
        }
        text.push(']');
        self.ws.send(Message::text(text)).unwrap();
        let (mut acked, mut refused) = (0, 0);
        loop {
            let v = next_json(&mut self.ws);
            if let Some(seq) = v["seq"].as_u64() {
                let reason = v["error"].as_str().expect("error frame").to_string();
                let (d, ts) = self.pending.remove(&seq).expect("error for a pending seq");
                self.sent[d].get_mut(&ts).unwrap().1 = Some(false);
                self.reasons.push(reason);
                refused += 1;
            } else if let Some(a) = v["ack"].as_u64() {
                let done: Vec<u64> = self.pending.range(..=a).map(|(s, _)| *s).collect();
                for s in done {
                    let (d, ts) = self.pending.remove(&s).unwrap();
                    self.sent[d].get_mut(&ts).unwrap().1 = Some(true);
                    acked += 1;
                }
                if a >= self.seq {
                    assert!(self.pending.is_empty());
                    return (acked, refused);
                }
            } else {
                panic!("unexpected frame {v}");
            }
        }
    }
}

impl Gw {
    /// Sends `frames` frames of `count` heartbeats each without reading in between (a pipelining
    /// device), then reads until every heartbeat was acked or refused; each read may wait
    /// `patience`. Returns (acked, refused) counts, or the answers counted so far when a read
    /// timed out (the connection stopped answering).
    fn pipeline(
        &mut self,
        frames: usize,
        count: usize,
        patience: Duration,
    ) -> Result<(usize, usize), (usize, usize)> {
        let all: Vec<usize> = (0..self.ids.len()).collect();
        let first = self.seq + 1;
        for _ in 0..frames {
            let mut text = String::from("[");
            for k in 0..count {
                self.seq += 1;
                let d = all[k % all.len()];
                let ts = self.next_ts;
                self.next_ts += 1;
                if k > 0 {
                    text.push(',');
                }
                text.push_str(&format!(
                    r#"{{"seq":{},"id":"{}","lat":{},"lon":2.5,"ts":{ts},"attrs":{ATTRS}}}"#,
                    self.seq,
                    self.ids[d],
                    lat_of(ts)
                ));
                self.sent[d].insert(ts, (lat_of(ts), None));
                self.pending.insert(self.seq, (d, ts));
            }
            text.push(']');
            self.ws.send(Message::text(text)).unwrap();
        }
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = self.ws.get_ref() {
            s.set_read_timeout(Some(patience)).unwrap();
        }
        let (mut acked, mut refused) = (0, 0);
        while self.pending.range(first..).next().is_some() {
            let v = match self.ws.read() {
                Ok(Message::Text(t)) => serde_json::from_str::<serde_json::Value>(&t).unwrap(),
                Ok(_) => continue,
                Err(e) => {
                    eprintln!("pipelined read failed: {e}");
                    return Err((acked, refused));
                }
            };
            if let Some(seq) = v["seq"].as_u64() {
                let reason = v["error"].as_str().expect("error frame").to_string();
                let (d, ts) = self.pending.remove(&seq).expect("error for a pending seq");
                self.sent[d].get_mut(&ts).unwrap().1 = Some(false);
                self.reasons.push(reason);
                refused += 1;
            } else if let Some(a) = v["ack"].as_u64() {
                let done: Vec<u64> = self.pending.range(..=a).map(|(s, _)| *s).collect();
                for s in done {
                    let (d, ts) = self.pending.remove(&s).unwrap();
                    self.sent[d].get_mut(&ts).unwrap().1 = Some(true);
                    acked += 1;
                }
            } else {
                panic!("unexpected frame {v}");
            }
        }
        Ok((acked, refused))
    }
}

/// A server whose data directory is full, and what it took to fill it. Fields drop in order: the
/// server is killed before the tmpfs is unmounted.
struct Filled {
    server: Server,
    gw: Gw,
    ids: Vec<String>,
    filler: PathBuf,
    log: PathBuf,
    acked_total: usize,
    refused_total: usize,
    _mount: Mount,
    _work: tempfile::TempDir,
}

/// Mounts the tmpfs, starts the server on it, leaves less than a segment free with a filler file
/// and ingests until both shards refuse. `None` (after printing why) when mounting is impossible.
fn fill_up() -> Option<Filled> {
    let work = tempfile::tempdir().unwrap();
    let mnt = work.path().join("mnt");
    let mount = match mount_tmpfs(&mnt) {
        Ok(m) => m,
        Err(why) => {
            eprintln!("SKIPPED disk_full: cannot mount a tmpfs here ({why}); run as root");
            return None;
        }
    };
    let data = mnt.join("data");
    let log = work.path().join("server.log");
    let server = Server::start_logged(&data, &["--shards", "2", "--segment-bytes", "1MiB"], &log);
    // Two devices per shard.
    let mut ids: Vec<String> = Vec::new();
    let mut per_shard = [0; 2];
    for k in 0.. {
        let id = format!("full-{k}");
        let s = shard_of(&id, 2).0 as usize;
        if per_shard[s] < 2 {
            per_shard[s] += 1;
            ids.push(id);
        }
        if per_shard == [2, 2] {
            break;
        }
    }
    let on_shard = |s: u32| -> Vec<usize> {
        (0..ids.len())
            .filter(|&i| shard_of(&ids[i], 2).0 == s)
            .collect()
    };
    let (shard0, shard1) = (on_shard(0), on_shard(1));

    let filler = mnt.join("filler");
    let fill = free_bytes(&mnt) - FREE_AFTER_FILLER;
    let st = std::process::Command::new("fallocate")
        .args(["-l", &fill.to_string()])
        .arg(&filler)
        .status()
        .unwrap();
    assert!(st.success(), "fallocate filler");
    eprintln!("filler {fill} bytes; {} bytes free", free_bytes(&mnt));

    let mut gw = Gw {
        ws: ws_connect(&server, &server.token(&["gateway", "full-"])).unwrap(),
        seq: 0,
        next_ts: now_ms() - 3_600_000,
        pending: BTreeMap::new(),
        sent: vec![Sent::new(); ids.len()],
        ids: ids.clone(),
        reasons: Vec::new(),
    };
    // Fill: until a whole frame to each shard is refused.
    let started = Instant::now();
    let (mut acked_total, mut refused_total) = (0, 0);
    let mut full = [false; 2];
    while full != [true, true] {
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "the disk never filled"
        );
        for (s, devs) in [(0, &shard0), (1, &shard1)] {
            let (a, r) = gw.frame(devs, FRAME_HEARTBEATS);
            acked_total += a;
            refused_total += r;
            if a == 0 {
                full[s] = true;
            }
        }
    }
    eprintln!("full after {acked_total} acked heartbeats; {refused_total} refused so far");
    assert!(
        acked_total > 1000,
        "both shards stored a segment's worth first"
    );
    assert!(
        gw.reasons.iter().all(|r| r == "storage_full"),
        "refusals say storage_full: {:?}",
        gw.reasons.iter().find(|r| *r != "storage_full")
    );
    Some(Filled {
        server,
        gw,
        ids,
        filler,
        log,
        acked_total,
        refused_total,
        _mount: mount,
        _work: work,
    })
}

#[test]
fn a_full_disk_refuses_with_storage_full_keeps_serving_and_resumes_when_space_returns() {
    // See the file comment. Fails if a device is disconnected for the server's full disk, if a
    // refusal is not `storage_full`, if queries stop working, if appends do not resume after space
    // returns, or if anything acked is missing (or anything refused present) after a restart.
    let Some(Filled {
        mut server,
        mut gw,
        ids,
        filler,
        log,
        mut acked_total,
        mut refused_total,
        _mount,
        _work,
    }) = fill_up()
    else {
        return;
    };
    let ops = server.token(&["ops"]);
    let all: Vec<usize> = (0..ids.len()).collect();
    let mut bystander = ws_connect(&server, &server.token(&["device", "bystander"])).unwrap();
    let mut by_seq = 0;

    // While full: more frames are refused per heartbeat (not disconnected), the bystander
    // device is refused the same way, and queries answer.
    for _ in 0..20 {
        let (a, r) = gw.frame(&all, FRAME_HEARTBEATS);
        assert_eq!((a, r), (0, FRAME_HEARTBEATS), "still full");
        refused_total += r;
    }
    by_seq += 1;
    bystander
        .send(Message::text(hb_json(by_seq, 1.0, 1.0, now_ms())))
        .unwrap();
    let errs = wait_ack(&mut bystander, by_seq);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0]["seq"], by_seq);
    assert_eq!(errs[0]["error"], "storage_full");
    assert_eq!(server.get("/healthz", None).0, 200, "the server is up");
    for (d, id) in ids.iter().enumerate() {
        let newest_acked = gw.sent[d]
            .iter()
            .rev()
            .find(|(_, (_, a))| *a == Some(true))
            .map(|(ts, _)| *ts)
            .expect("each device had heartbeats acked");
        let last = last_location(&server, id, &ops).expect("last location while full");
        assert_eq!(last["ts"].as_i64(), Some(newest_acked), "{id}");
        let (st, _) = history_page(&server, id, "limit=10", &ops);
        assert_eq!(st, 200, "history while full");
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let why = text
        .lines()
        .find(|l| l.contains("no space to preallocate segment"))
        .unwrap_or_else(|| panic!("the log says why:\n{}", log_tail(&log, 20)));
    eprintln!("log: {why}");
    let log_lines_full = text.lines().count();

    // Space returns: appends resume without a restart.
    std::fs::remove_file(&filler).unwrap();
    let resumed = Instant::now();
    loop {
        let (a, r) = gw.frame(&all, 8);
        acked_total += a;
        refused_total += r;
        if r == 0 {
            break;
        }
        assert!(
            resumed.elapsed() < Duration::from_secs(10),
            "appends did not resume after space returned"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for _ in 0..10 {
        let (a, r) = gw.frame(&all, FRAME_HEARTBEATS);
        assert_eq!(r, 0, "appending again");
        acked_total += a;
    }
    by_seq += 1;
    bystander
        .send(Message::text(hb_json(by_seq, 2.0, 2.0, now_ms())))
        .unwrap();
    assert!(
        wait_ack(&mut bystander, by_seq).is_empty(),
        "bystander acked again"
    );
    eprintln!(
        "resumed after {:?}; {acked_total} acked, {refused_total} refused in total; the log grew \
         to {log_lines_full} lines while full",
        resumed.elapsed()
    );

    // Nothing corrupted: after a restart every acked heartbeat is there, no refused one is.
    drop(gw.ws);
    drop(bystander);
    assert!(server.sigterm().success());
    server.restart_logged(&log);
    for (d, id) in ids.iter().enumerate() {
        let hist = history_all(&server, id, &ops).expect("history after restart");
        let stored: BTreeMap<i64, f64> = hist
            .iter()
            .map(|h| (h["ts"].as_i64().unwrap(), h["lat"].as_f64().unwrap()))
            .collect();
        assert_eq!(stored.len(), hist.len(), "{id}: duplicates");
        for (ts, (lat, acked)) in &gw.sent[d] {
            match acked {
                Some(true) => assert_eq!(stored.get(ts), Some(lat), "{id}: acked {ts} lost"),
                Some(false) => assert!(!stored.contains_key(ts), "{id}: refused {ts} stored"),
                None => unreachable!("every heartbeat got an answer"),
            }
        }
        let last = last_location(&server, id, &ops).unwrap();
        assert_eq!(last["ts"].as_i64(), stored.keys().next_back().copied());
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let reopened: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("shard log opened"))
        .skip(2)
        .collect();
    assert_eq!(reopened.len(), 2, "{reopened:?}");
    for l in reopened {
        assert!(
            l.contains("torn_tail_bytes=0") && l.contains("damaged=0"),
            "clean recovery: {l}"
        );
    }
    server.kill9();
}

#[test]
fn a_full_disk_shows_in_the_metrics() {
    // Operators must see a full disk without reading logs: while the shards refuse, /metrics
    // counts the refusals under reason="storage_full" (at least as many as the devices were
    // told about).
    let Some(f) = fill_up() else {
        return;
    };
    let (st, text) = f.server.get("/metrics", None);
    assert_eq!(st, 200, "{text}");
    assert!(
        text.contains("geobeat_log_bytes"),
        "the metrics endpoint: {text}"
    );
    let counted: f64 = 0.0
        + text
            .lines()
            .filter(|l| {
                l.starts_with("geobeat_heartbeats_rejected_total{")
                    && l.contains("reason=\"storage_full\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    assert!(
        counted >= f.refused_total as f64,
        "metrics count {counted} storage_full refusals, devices were sent {}",
        f.refused_total
    );
}

#[test]
fn pipelined_frames_refused_for_a_full_disk_do_not_wedge_the_connection() {
    // Issue 13 §7: a device pipelining several frames of 50 heartbeats while the disk is full got
    // its `storage_full` refusals and then was never read again (no ack, no error, no close), even
    // after space was freed. The refusals fill the connection's error queue, its reader pauses,
    // and the writer drained the queue without waking it. Every refusal and the final ack must
    // arrive while full, and after space returns the same connection must be acked again, with
    // several frames in flight each time.
    let Some(f) = fill_up() else {
        return;
    };
    // A device connection lives on its shard's executor, so its refusals complete each frame
    // before the next one is read: nothing is left in flight to wake its reader.
    let id = f.ids[0].clone();
    let mut dev = Gw {
        ws: ws_connect(&f.server, &f.server.token(&["device", &id])).unwrap(),
        seq: 0,
        next_ts: f.gw.next_ts,
        pending: BTreeMap::new(),
        sent: vec![Sent::new()],
        ids: vec![id],
        reasons: Vec::new(),
    };
    let patience = Duration::from_secs(5);
    for round in 0..3 {
        let got = dev.pipeline(12, 50, patience);
        assert_eq!(
            got,
            Ok((0, 600)),
            "round {round} while full: (acked, refused) of 12 pipelined frames of 50"
        );
    }
    assert!(dev.reasons.iter().all(|r| r == "storage_full"));
    std::fs::remove_file(&f.filler).unwrap();
    let resumed = Instant::now();
    loop {
        let (a, r) = dev
            .pipeline(12, 50, patience)
            .unwrap_or_else(|got| panic!("the connection stopped answering: {got:?}"));
        if r == 0 {
            assert_eq!(a, 600);
            break;
        }
        assert!(
            resumed.elapsed() < Duration::from_secs(10),
            "appends did not resume on the pipelining connection"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for _ in 0..3 {
        assert_eq!(dev.pipeline(12, 50, patience), Ok((600, 0)));
    }
}
