//! Human-readable rendering of a load run: one line describing the setup, and a block of
//! results. It owns wording and layout only; the numbers come from [`Summary`]. Invariant: every
//! number printed is taken from the summary unchanged (rounded for display, never recomputed).

use std::fmt::Write as _;

use super::config::{Mode, Plan};
use crate::stats::Summary;

/// One line describing what a plan will do.
pub fn describe(plan: &Plan) -> String {
    let args = &plan.args;
    let pacing = match args.mode {
        Mode::Closed => format!("closed loop, window {} per device", plan.inflight_max),
        Mode::Open => format!(
            "open loop, {:.0} heartbeats/s total (in-flight cap {} per device)",
            plan.rate_per_s.unwrap_or(0.0),
            plan.inflight_max
        ),
    };
    format!(
        "geobeat-load: {} devices -> {} ({}, batch {}), {pacing}; {} {} thread(s) x {} \
         process(es); ramp {:.1} s, warmup {:.1} s, measure {:.1} s, drain {:.1} s",
        plan.devices,
        args.url,
        value_name(args.format),
        args.batch,
        plan.threads,
        value_name(args.runtime),
        args.processes,
        plan.ramp.as_secs_f64(),
        plan.warmup.as_secs_f64(),
        plan.duration.as_secs_f64(),
        plan.drain.as_secs_f64(),
    )
}

/// The flag spelling of a value-enum value.
fn value_name(value: impl clap::ValueEnum) -> String {
    value
        .to_possible_value()
        .map_or_else(String::new, |v| v.get_name().to_owned())
}

/// The results block.
pub fn render(summary: &Summary) -> String {
    let c = &summary.counters;
    let l = &summary.latency;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "connections: {} of {} connected, {} connect failures, {} disconnects",
        c.connected, c.devices, c.connect_failures, c.disconnects
    );
    let _ = writeln!(
        out,
        "measured:    sent {} acked {} unacked {} | whole run: sent {} acked {} in {} frames",
        c.sent, c.acked, c.unacked, c.sent_total, c.acked_total, c.frames_sent_total
    );
    let _ = writeln!(
        out,
        "errors:      rejected {} frame-rejections {} protocol-errors {}",
        c.rejected, c.frame_rejections, c.protocol_errors
    );
    for (reason, count) in &summary.rejection_reasons {
        let _ = writeln!(out, "  rejection {reason:?}: {count}");
    }
    let _ = writeln!(
        out,
        "throughput:  {:.0} acked heartbeats/s over {:.1} s",
        summary.throughput_acked_per_s, summary.measured_s
    );
    let _ = writeln!(
        out,
        "ack latency: p50 {} us, p90 {} us, p99 {} us, p99.9 {} us, max {} us, mean {:.0} us \
         ({} samples)",
        l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us, l.mean_us, l.count
    );
    if summary.service.count > 0 {
        let g = &summary.service;
        let _ = writeln!(
            out,
            "service:     p50 {} us, p90 {} us, p99 {} us, p99.9 {} us (actual send to ack: \
             the latency above without the client's own pacing delay)",
            g.p50_us, g.p90_us, g.p99_us, g.p999_us
        );
    }
    if summary.send_lag.count > 0 {
        let g = &summary.send_lag;
        let _ = writeln!(
            out,
            "send lag:    p50 {} us, p99 {} us, max {} us (client timer/scheduling delay, \
             already part of the latency above)",
            g.p50_us, g.p99_us, g.max_us
        );
    }
    let _ = write!(
        out,
        "client cpu:  user {:.2} s, sys {:.2} s (subtract from machine totals)",
        summary.client_cpu.user_s, summary.client_cpu.sys_s
    );
    out
}
