//! The loop of one sink thread: for each shard ("lane") in turn, read the durable entries past
//! the sink's cursor into a batch, have the sink commit it, then persist the cursor and publish
//! progress; on failure back off (bounded exponential), bring the sink back in line with the
//! cursor, and retry from the cursor. It owns batching, the retry policy and the cursor/status
//! bookkeeping; how a batch is written is the [`Sink`]'s business.
//!
//! Invariant: the order is always "sink confirms, then cursor file replaced, then cursor
//! published", so a crash anywhere replays from a cursor the sink has fully covered.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::SinkConfig;
use crate::log::tail::{Tail, TailError};
use crate::log::{Entry, LogPos};
use crate::route::ShardId;

use super::cursor::{cursor_path, read_cursor, write_cursor, Cursor};
use super::{now_ms, Board, FlushError, ShardFeed};
use crate::limits::{
    SINK_BACKOFF_MAX_MS, SINK_BACKOFF_MIN_MS, SINK_BATCH_BYTES_MAX, SINK_STOP_POLL_MS,
};

/// What a sink did with an entry offered to its batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Push {
    /// Added to the batch.
    Taken,
    /// Not taken: the batch must be committed first (e.g. the entry starts a new audit file).
    /// Never returned for the first entry of a batch.
    CutBefore,
}

/// A destination of durable heartbeats. One instance serves every shard, on one thread.
pub(crate) trait Sink: Send {
    /// Connects to the sink and validates it (database: connect, create the schema; audit: the
    /// directory is writable), within a bounded time. Called when the sink thread starts, and
    /// again (with backoff) until it succeeds; no batch is attempted before.
    fn check(&mut self) -> Result<(), FlushError>;
    /// Brings the sink's state for `shard` in line with `cursor`, discarding any batch in hand:
    /// called before the first batch and after every failure (audit: cut the open file back to
    /// the cursor's byte count; database: drop the pending rows).
    fn resume(&mut self, shard: ShardId, cursor: &Cursor) -> Result<(), FlushError>;
    /// Offers one entry for the batch of `shard`.
    fn push(&mut self, shard: ShardId, e: &Entry<'_>) -> Result<Push, FlushError>;
    /// Drops the batch in hand, whatever its shard (after a failure; `resume` follows before the
    /// failed shard's next batch).
    fn discard(&mut self);
    /// Encoded bytes of the batch in hand (bounded by `SINK_BATCH_BYTES_MAX`).
    fn pending_bytes(&self) -> usize;
    /// Makes the batch of `shard` durable in the sink and records in `next` (already holding
    /// the new position) whatever else the cursor must remember. Only after this returns Ok is
    /// the cursor file replaced.
    fn commit(&mut self, shard: ShardId, next: &mut Cursor) -> Result<(), FlushError>;
    /// `shard` has nothing below its durable position left: housekeeping (audit: close an hour
    /// that is over). Must not change what the cursor describes.
    fn idle(&mut self, shard: ShardId, now_ms: i64) -> Result<(), FlushError>;
}

/// One shard as seen by one sink.
pub(crate) struct Lane {
    pub feed: ShardFeed,
    pub tail: Tail,
    /// The durable cursor (as on disk).
    pub cursor: Cursor,
    pub cursor_path: std::path::PathBuf,
    /// No cursor file existed: the sink starts at the oldest retained entry without complaint.
    pub fresh: bool,
    /// The sink must `resume` before the next batch.
    pub needs_resume: bool,
    /// A cursor the sink already covers but whose file could not be written: written first
    /// next time (the sink is not rolled back: it is consistent with this cursor, and the file
    /// on disk may already be this one).
    pub unsaved: Option<Cursor>,
    /// This shard's own backoff (failures that are not the whole sink's).
    pub backoff: Backoff,
}

impl Lane {
    /// Loads the cursor of sink `sink` for the shard of `feed`.
    pub fn load(feed: ShardFeed, sink: &str) -> Result<Lane, FlushError> {
        let cursor_path = cursor_path(&feed.dir, sink);
        let (cursor, fresh) = match read_cursor(&cursor_path)? {
            Some(c) => (c, false),
            None => (Cursor::start(), true),
        };
        let tail = Tail::new(feed.dir.clone(), feed.shard, cursor.log_pos(), cursor.seq);
        Ok(Lane {
            feed,
            tail,
            cursor,
            cursor_path,
            fresh,
            needs_resume: true,
            unsaved: None,
            backoff: Backoff::default(),
        })
    }
}

/// Bounded exponential backoff.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    failures: u32,
    until: Option<Instant>,
}

impl Backoff {
    fn fail(&mut self) {
        self.failures = self.failures.saturating_add(1);
        let ms = SINK_BACKOFF_MIN_MS
            .saturating_mul(1 << (self.failures - 1).min(16))
            .min(SINK_BACKOFF_MAX_MS);
        self.until = Some(Instant::now() + Duration::from_millis(ms));
    }

    fn reset(&mut self) {
        self.failures = 0;
        self.until = None;
    }
}

/// Sleeps up to `d`, waking early when `stop` is set.
fn nap(d: Duration, stop: &AtomicBool) {
    let end = Instant::now() + d;
    loop {
        let now = Instant::now();
        if now >= end || stop.load(Ordering::Acquire) {
            return;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(SINK_STOP_POLL_MS)));
    }
}

/// Outcome of one step on one lane.
enum Step {
    /// Nothing to do.
    Idle,
    /// A batch was committed (or a gap skipped).
    Progress,
}

/// The body of sink thread `index`. A failure backs off only its lane (the shard), except a
/// database failure, which backs off the whole sink: a dead database fails every shard alike, and
/// trying each shard in turn would only multiply connection timeouts.
pub(crate) fn run(
    index: usize,
    cfg: SinkConfig,
    mut sink: Box<dyn Sink>,
    mut lanes: Vec<Lane>,
    board: Arc<Board>,
    stop: Arc<AtomicBool>,
) {
    tracing::info!(sink = %cfg.name, kind = cfg.kind.name(), shards = lanes.len(), "sink started");
    let mut backoff = Backoff::default();
    let mut checked = false;
    while !stop.load(Ordering::Acquire) {
        if let Some(until) = backoff.until {
            let now = Instant::now();
            if now < until {
                nap(until - now, &stop);
                continue;
            }
        }
        if !checked {
            match sink.check() {
                Ok(()) => {
                    checked = true;
                    backoff.reset();
                    tracing::info!(sink = %cfg.name, kind = cfg.kind.name(), "sink reachable and valid");
                    for lane_index in 0..lanes.len() {
                        board.with_status(index, lane_index, |s| {
                            s.failures = 0;
                            s.last_error = None;
                        });
                    }
                }
                Err(e) => {
                    let failures = backoff.failures + 1;
                    if failures == 1 || failures.is_power_of_two() {
                        tracing::error!(sink = %cfg.name, kind = cfg.kind.name(), failures, error = %e, "sink cannot be reached; ingest goes on (the shard logs hold its backlog); retrying");
                    }
                    let msg = e.to_string();
                    let now = now_ms();
                    for lane_index in 0..lanes.len() {
                        board.with_status(index, lane_index, |s| {
                            s.failures = failures;
                            s.errors_total += 1;
                            s.last_error = Some(msg.clone());
                            s.last_error_ms = Some(now);
                        });
                    }
                    backoff.fail();
                    continue;
                }
            }
        }
        let mut busy = false;
        let mut sink_failed = false;
        for (lane_index, lane) in lanes.iter_mut().enumerate() {
            if stop.load(Ordering::Acquire) {
                break;
            }
            if lane.backoff.until.is_some_and(|t| Instant::now() < t) {
                continue;
            }
            match step(index, lane_index, &cfg, sink.as_mut(), lane, &board) {
                Ok(Step::Idle) => lane.backoff.reset(),
                Ok(Step::Progress) => {
                    lane.backoff.reset();
                    busy = true;
                }
                Err(e) => {
                    sink.discard();
                    lane.needs_resume = lane.unsaved.is_none();
                    let sink_wide = matches!(e, FlushError::Postgres { .. });
                    let failures = if sink_wide {
                        backoff.failures + 1
                    } else {
                        lane.backoff.failures + 1
                    };
                    if failures == 1 || failures.is_power_of_two() {
                        tracing::warn!(sink = %cfg.name, shard = %lane.feed.shard, failures, error = %e, "sink batch failed; retrying from the cursor");
                    }
                    let msg = e.to_string();
                    board.with_status(index, lane_index, |s| {
                        s.failures = failures;
                        s.errors_total += 1;
                        s.last_error = Some(msg);
                        s.last_error_ms = Some(now_ms());
                        s.durable = lane.feed.durable().0;
                        s.lag_bytes = s.durable.saturating_sub(s.cursor);
                    });
                    if sink_wide {
                        sink_failed = true;
                        break;
                    }
                    lane.backoff.fail();
                }
            }
        }
        if sink_failed {
            backoff.fail();
        } else {
            backoff.reset();
            if !busy {
                nap(cfg.poll_interval, &stop);
            }
        }
    }
    tracing::info!(sink = %cfg.name, "sink stopped");
}

fn step(
    sink_index: usize,
    lane_index: usize,
    cfg: &SinkConfig,
    sink: &mut dyn Sink,
    lane: &mut Lane,
    board: &Board,
) -> Result<Step, FlushError> {
    let shard = lane.feed.shard;
    if let Some(next) = lane.unsaved.take() {
        if let Err(e) = write_cursor(&lane.cursor_path, &next) {
            lane.unsaved = Some(next);
            return Err(e);
        }
        publish(
            sink_index,
            lane_index,
            lane,
            board,
            next,
            0,
            lane.feed.durable(),
        );
    }
    if lane.needs_resume {
        sink.resume(shard, &lane.cursor)?;
        lane.tail.seek(lane.cursor.log_pos(), lane.cursor.seq);
        lane.needs_resume = false;
    }
    let bound = lane.feed.durable();
    if bound.0 == 0 {
        // Not published yet (the shard is still recovering): an open log is never durable
        // below its first segment header.
        return Ok(Step::Idle);
    }
    if lane.cursor.pos > bound.0 {
        // The log's durable end is before the cursor: either the durable position was not
        // published yet, or recovery cut the log (damage quarantined) and will reuse positions
        // the sink already exported. Never rewind (an audit sink would write lines twice): wait
        // until the log passes the cursor, and say so.
        let msg = format!(
            "cursor {} is past the log's durable end {bound}; waiting for the log to pass it \
             (if recovery cut the log, entries before the cursor are not exported)",
            lane.cursor.pos
        );
        board.with_status(sink_index, lane_index, |s| {
            if s.last_error.is_none() {
                tracing::error!(sink = %cfg.name, shard = %shard, "{msg}");
            }
            s.last_error = Some(msg);
            s.last_error_ms = Some(now_ms());
            s.durable = bound.0;
            s.lag_bytes = 0;
        });
        return Ok(Step::Idle);
    }
    if lane.cursor.pos == bound.0 {
        sink.idle(shard, now_ms())?;
        let now = now_ms();
        board.with_status(sink_index, lane_index, |s| {
            s.failures = 0;
            s.last_error = None;
            s.last_ok_ms = Some(now);
            s.durable = bound.0;
            s.lag_bytes = 0;
        });
        return Ok(Step::Idle);
    }
    let mut rows = 0u64;
    loop {
        if rows as usize >= cfg.batch_rows || sink.pending_bytes() >= SINK_BATCH_BYTES_MAX {
            break;
        }
        let cut = match lane.tail.next(bound) {
            Ok(Some(e)) => match sink.push(shard, &e)? {
                Push::Taken => {
                    rows += 1;
                    None
                }
                Push::CutBefore => {
                    assert!(rows > 0, "a sink must take the first entry of a batch");
                    Some((e.pos, e.seq))
                }
            },
            Ok(None) => break,
            Err(TailError::Deleted { resume, .. }) if rows == 0 => {
                let from = lane.cursor.pos;
                let msg =
                    format!("log bytes {from}..{resume} were deleted before this sink read them");
                if lane.fresh {
                    tracing::info!(sink = %cfg.name, shard = %shard, start = %resume, "new sink starts at the oldest retained entry");
                } else {
                    tracing::error!(sink = %cfg.name, shard = %shard, "{msg}");
                }
                let quiet = lane.fresh;
                return skip_to(
                    sink_index, lane_index, sink, lane, board, resume, None, msg, quiet,
                );
            }
            Err(TailError::Sequence {
                pos,
                expected,
                found,
                ..
            }) if rows == 0 => {
                // The cursor's expected sequence number no longer matches: the log was rewritten
                // under the cursor (recovery). Accept the log as it is now.
                let msg = format!(
                    "entry at {pos} has seq {found}, the cursor expected {expected}: the log was \
                     rewritten by recovery; continuing"
                );
                tracing::error!(sink = %cfg.name, shard = %shard, "{msg}");
                lane.tail.seek(pos, None);
                lane.cursor.seq = None;
                board.with_status(sink_index, lane_index, |s| {
                    s.last_error = Some(msg);
                    s.last_error_ms = Some(now_ms());
                });
                continue;
            }
            // Commit what we have; the next step meets the error again with an empty batch.
            Err(TailError::Deleted { .. } | TailError::Sequence { .. }) => break,
            Err(e) => return Err(e.into()),
        };
        if let Some((pos, seq)) = cut {
            lane.tail.seek(pos, Some(seq));
            break;
        }
    }
    if rows == 0 {
        // The bound cuts an entry (not a durable position yet): nothing to do now.
        return Ok(Step::Idle);
    }
    let mut next = lane.cursor.clone();
    next.pos = lane.tail.pos().0;
    next.seq = lane.tail.next_seq();
    sink.commit(shard, &mut next)?;
    next.updated_ms = now_ms();
    if let Err(e) = write_cursor(&lane.cursor_path, &next) {
        lane.unsaved = Some(next);
        return Err(e);
    }
    publish(sink_index, lane_index, lane, board, next, rows, bound);
    Ok(Step::Progress)
}

/// Makes `next` (already on disk) the lane's cursor and publishes it.
fn publish(
    sink_index: usize,
    lane_index: usize,
    lane: &mut Lane,
    board: &Board,
    next: Cursor,
    rows: u64,
    bound: LogPos,
) {
    lane.cursor = next;
    lane.fresh = false;
    board.advance(sink_index, lane_index, lane.cursor.pos, &lane.feed);
    let now = now_ms();
    let cursor = lane.cursor.pos;
    board.with_status(sink_index, lane_index, |s| {
        s.cursor = cursor;
        s.durable = s.durable.max(bound.0);
        s.lag_bytes = s.durable.saturating_sub(cursor);
        s.rows_total += rows;
        s.failures = 0;
        s.last_error = None;
        s.last_ok_ms = Some(now);
    });
}

/// Moves the cursor over log bytes that cannot be read (deleted by retention, or cut by
/// recovery), persisting it, and records why.
#[allow(clippy::too_many_arguments)]
fn skip_to(
    sink_index: usize,
    lane_index: usize,
    sink: &mut dyn Sink,
    lane: &mut Lane,
    board: &Board,
    to: LogPos,
    seq: Option<u64>,
    msg: String,
    quiet: bool,
) -> Result<Step, FlushError> {
    let mut next = lane.cursor.clone();
    debug_assert!(to.0 >= next.pos, "skips only move forward");
    let skipped = to.0.saturating_sub(next.pos);
    next.pos = to.0;
    next.seq = seq;
    next.updated_ms = now_ms();
    sink.resume(lane.feed.shard, &next)?;
    write_cursor(&lane.cursor_path, &next)?;
    lane.cursor = next;
    lane.tail.seek(to, seq);
    lane.fresh = false;
    board.advance(sink_index, lane_index, to.0, &lane.feed);
    let now = now_ms();
    board.with_status(sink_index, lane_index, |s| {
        s.cursor = to.0;
        if !quiet {
            s.skipped_bytes += skipped;
            s.last_error = Some(msg);
            s.last_error_ms = Some(now);
        }
    });
    Ok(Step::Progress)
}
