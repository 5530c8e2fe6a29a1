//! Memory of the last-location table at one million devices: heap bytes per device must stay at
//! most 64 bytes plus the id's own bytes (the compact-row design target), measured by
//! `heap_bytes()` after inserting 1M devices with 20-byte ids, and every device must be found.

use geobeat::log::LogPos;
use geobeat::table::{LastLocationTable, Observation};

#[test]
fn one_million_devices_fit_in_64_bytes_each_plus_ids() {
    // Inserts 1M distinct 20-byte ids, then compares heap_bytes() with 1M * (64 + 20) and looks a
    // sample of them up again.
    const DEVICES: usize = 1_000_000;
    let mut t = LastLocationTable::new();
    let mut id = String::new();
    for i in 0..DEVICES {
        id.clear();
        use std::fmt::Write;
        write!(id, "device-{i:012}x").unwrap();
        let obs = Observation {
            lat: 1.0,
            lon: 2.0,
            ts_ms: i as i64,
            received_ms: i as i64,
            pos: LogPos(4096 + i as u64 * 8),
        };
        t.observe(&id, &obs).unwrap();
    }
    assert_eq!(t.len(), DEVICES);
    let id_bytes = 20 * DEVICES;
    let per_device_overhead = (t.heap_bytes() - id_bytes) as f64 / DEVICES as f64;
    println!(
        "heap {} bytes for {DEVICES} devices: {per_device_overhead:.1} B/device + 20 id bytes",
        t.heap_bytes()
    );
    assert!(
        per_device_overhead <= 64.0,
        "{per_device_overhead:.1} B/device"
    );
    for i in (0..DEVICES).step_by(9_973) {
        let l = t.get(&format!("device-{i:012}x")).unwrap();
        assert_eq!(l.pos, LogPos(4096 + i as u64 * 8));
    }
}
