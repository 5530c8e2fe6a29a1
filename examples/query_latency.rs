//! Query latency against a running geobeat: one keep-alive HTTP connection sends
//! `GET /v1/devices/{id}` (or `/history?limit=N`) round-robin over a set of device ids for a
//! fixed time and prints p50/p90/p99/p999 from an HDR histogram. Run it while `geobeat-load`
//! drives ingest to measure "query latency while ingest runs".
//!
//! Usage: `cargo run --release --example query_latency -- ADDR OPS_TOKEN ID_PREFIX ID_COUNT SECONDS [history]`
//! e.g. `... 127.0.0.1:8080 $(geobeat token ops) dev- 1000 10`

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 6 {
        eprintln!("usage: query_latency ADDR OPS_TOKEN ID_PREFIX ID_COUNT SECONDS [history]");
        std::process::exit(2);
    }
    let (addr, token, prefix) = (&args[1], &args[2], &args[3]);
    let count: usize = args[4].parse().expect("ID_COUNT");
    let seconds: f64 = args[5].parse().expect("SECONDS");
    let history = args.get(6).is_some_and(|a| a == "history");
    let connect = || -> std::io::Result<(BufReader<TcpStream>, TcpStream)> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        Ok((BufReader::new(stream.try_clone()?), stream))
    };
    let (mut reader, mut writer) = connect()?;
    let mut hist = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
    let (mut ok, mut not_found, mut other) = (0u64, 0u64, 0u64);
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let mut i = 0usize;
    let mut line = String::new();
    let mut body = Vec::new();
    while Instant::now() < end {
        let path = if history {
            format!("/v1/devices/{prefix}{}/history?limit=100", i % count)
        } else {
            format!("/v1/devices/{prefix}{}", i % count)
        };
        i += 1;
        let req =
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n\r\n");
        let t = Instant::now();
        writer.write_all(req.as_bytes())?;
        line.clear();
        reader.read_line(&mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut len = 0usize;
        let mut close = false;
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
            close |= lower.starts_with("connection: close");
        }
        body.resize(len, 0);
        reader.read_exact(&mut body)?;
        hist.record(t.elapsed().as_micros() as u64).expect("record");
        if close {
            // The server ends keep-alive connections after a bounded number of requests.
            (reader, writer) = connect()?;
        }
        match status {
            200 => ok += 1,
            404 => not_found += 1,
            _ => other += 1,
        }
    }
    let q = |p: f64| hist.value_at_quantile(p);
    println!(
        "{} queries ({ok} ok, {not_found} not found, {other} other) in {seconds} s: p50 {} us, p90 {} us, p99 {} us, p99.9 {} us, max {} us",
        hist.len(),
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999),
        hist.max()
    );
    Ok(())
}
