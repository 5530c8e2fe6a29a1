//! Every hard bound geobeat enforces, in one place, with the relationships between them asserted at
//! compile time. Nothing here is tunable at run time: configuration may pick smaller values (see
//! `config`), never larger ones. Units and qualifiers come last in every name.

use std::time::Duration;

/// Longest device id, in UTF-8 bytes (ids are 1..=64 bytes).
pub const DEVICE_ID_BYTES_MAX: usize = 64;
/// Largest opaque attribute blob stored with one heartbeat (the compact JSON text of `attrs`).
pub const ATTRS_BYTES_MAX: usize = 256;
/// Largest encoded heartbeat payload (rkyv bytes) one log entry may carry. Generous: a heartbeat
/// with the longest id and the largest attribute blob is about 400 bytes.
pub const ENTRY_PAYLOAD_BYTES_MAX: usize = 1024;
/// Every log entry starts on this boundary (the rkyv root of a heartbeat needs 8-byte alignment).
pub const ENTRY_ALIGN_BYTES: usize = 8;
/// Size of the fixed header in front of every log entry (see `shards/README.md`).
pub const ENTRY_HEADER_BYTES: usize = 32;
/// Size of the fixed header at the start of every segment file.
pub const SEGMENT_HEADER_BYTES: usize = 4096;
/// Bytes of zeros written per `pwrite` when a new segment is zero-filled (one static buffer of
/// this size, shared by every preparation).
pub const SEGMENT_ZERO_FILL_CHUNK_BYTES: usize = 1 << 20;
/// Bytes of appended entries one shard log holds in memory (its stage) before it writes them to
/// the segment file with one `pwrite` (`log::WriteMode::Pwrite`); commits and rollovers write them
/// sooner, so in practice the stage holds one commit group. 256 KiB is about 1,800 entries of 140
/// bytes: more than a 2 ms commit interval's worth at the highest ingest rate one core has reached
/// here (~300,000 heartbeats/s), so a full stage is rare. Allocated once per log.
pub const LOG_STAGE_BYTES_MAX: usize = 256 << 10;
/// Smallest and largest segment file size accepted by configuration.
pub const SEGMENT_BYTES_MIN: u64 = 1 << 20;
/// See [`SEGMENT_BYTES_MIN`].
pub const SEGMENT_BYTES_MAX: u64 = 1 << 32;
/// Default segment file size.
pub const SEGMENT_BYTES_DEFAULT: u64 = 64 << 20;
/// Page size assumed for mapping and alignment of segment sizes.
pub const PAGE_BYTES: u64 = 4096;
/// Most logical shards a data directory may be created with.
pub const SHARDS_MAX: usize = 256;
/// Virtual shards: a device id's stable hash picks one of these (`crc32c(id) % VSHARDS`), and the
/// data directory's table maps each to a shard. Fixed forever: changing it re-routes every device
/// (a data directory records it and is refused by a build with another value). A power of two,
/// so a load balancer's `mod` and ours agree trivially, and at least `SHARDS_MAX`, so every shard
/// can own one.
pub const VSHARDS: usize = 4096;

/// Largest WebSocket message (frame payload) a device may send.
pub const FRAME_BYTES_MAX: usize = 64 << 10;
/// Most heartbeats one frame (JSON array or binary batch) may carry.
pub const FRAME_HEARTBEATS_MAX: usize = 1000;
/// Largest HTTP request head (request line plus headers).
pub const HTTP_HEAD_BYTES_MAX: usize = 8 << 10;
/// Longest request URI.
pub const HTTP_URI_BYTES_MAX: usize = 2048;
/// Largest HTTP request body geobeat reads.
pub const HTTP_BODY_BYTES_MAX: usize = 64 << 10;
/// Most headers in one HTTP request.
pub const HTTP_HEADERS_MAX: usize = 64;
/// Bytes of partial WebSocket frames (read, not yet a complete message) one executor holds
/// before it stops reading the connections holding [`PARTIAL_FRAME_SMALL_BYTES`] or more; they
/// resume once the total is under 7/8 of this. 16 MiB is 256 frames of 64 KiB in flight per
/// core. See: issue 20 §7 and the memory budget below.
pub const PARTIAL_FRAME_BYTES_EXEC_MAX: usize = 16 << 20;
/// A connection holding less than this of a partial frame is read even while the executor is
/// over [`PARTIAL_FRAME_BYTES_EXEC_MAX`]: an ordinary heartbeat frame (at most about 600 bytes)
/// always completes, so devices are not stalled by the holders of large frames.
pub const PARTIAL_FRAME_SMALL_BYTES: usize = 2 << 10;
/// Measured resident bytes per byte held in a partial frame (tungstenite's read buffer grows by
/// doubling; perf/RESULTS.md, "Partial frames"): 2.4, rounded up.
pub const PARTIAL_FRAME_RSS_FACTOR: usize = 3;
/// Memory budget of partial frames per executor, worst case: the bound, plus what each of
/// `connections` may hold below the small mark, times the measured overhead.
pub const fn partial_frame_rss_bytes_max(connections: usize) -> usize {
    (PARTIAL_FRAME_BYTES_EXEC_MAX + connections * PARTIAL_FRAME_SMALL_BYTES)
        * PARTIAL_FRAME_RSS_FACTOR
}
/// Slowest body upload a request is given time for: the whole request (head and body) must
/// arrive within the handshake timeout plus `content-length / HTTP_BODY_BYTES_PER_S_MIN` seconds
/// (64 KiB/s: a 64 KiB body gets 1 s more, a 64 MiB geofence import 17 minutes). See: issue 13 §7.
pub const HTTP_BODY_BYTES_PER_S_MIN: u64 = 64 << 10;
/// Share of `--connections-max` (1/N) kept for sockets that authenticate at once: once the
/// other sockets (plain HTTP, heads not yet read) fill the rest, a new socket must send an
/// authenticated WebSocket upgrade within [`CONN_RESERVED_HEAD_MS`] or get 503, so slow clients
/// cannot lock devices out. With a cap under 8 nothing is reserved. See: issue 13 §7.
pub const CONN_RESERVED_SHARE_DIVISOR: usize = 8;
/// How long a socket admitted into the reserved share has to send its upgrade request head.
pub const CONN_RESERVED_HEAD_MS: u64 = 1000;
/// Deepest JSON nesting accepted inside `attrs`.
pub const JSON_DEPTH_MAX: usize = 8;

/// Bytes of one CPU cache line: the unit of DAX (MAP_SYNC) flushes.
pub const CACHE_LINE_BYTES: usize = 64;
/// Most segments one shard log keeps mapped at once (each is one mapping; the newest also holds an
/// open file). Retention must keep a shard below this; appends fail cleanly beyond it.
pub const LOG_SEGMENTS_MAX: usize = 16_384;
/// Most "consumed up to" cursors one shard log tracks.
pub const LOG_CONSUMERS_MAX: usize = 16;
/// Longest consumer name, in bytes.
pub const LOG_CONSUMER_NAME_BYTES_MAX: usize = 64;
/// Submission queue size of a `log::sync::UringSyncer` ring (one entry per segment file synced).
pub const SYNC_RING_ENTRIES: u32 = 16;
/// Shortest group-commit interval accepted, in microseconds.
pub const GROUP_INTERVAL_US_MIN: u64 = 1_000;
/// Longest group-commit interval accepted, in microseconds.
pub const GROUP_INTERVAL_US_MAX: u64 = 5_000;
/// Default group-commit interval, in microseconds.
pub const GROUP_INTERVAL_US_DEFAULT: u64 = 2_000;
/// Default number of pending entries that makes a group commit due regardless of the interval.
pub const GROUP_ENTRIES_DEFAULT: usize = 1_000;
/// Largest group size accepted by configuration (`--commit-entries-max`, 1..=this).
pub const GROUP_ENTRIES_MAX: usize = 100_000;
/// Bounds of the group-commit interval as configured (`--commit-interval-ms`), ms: the log's own
/// [`GROUP_INTERVAL_US_MIN`]..=[`GROUP_INTERVAL_US_MAX`] in whole milliseconds.
pub const COMMIT_INTERVAL_MS_MIN: u64 = GROUP_INTERVAL_US_MIN / 1000;
/// See [`COMMIT_INTERVAL_MS_MIN`].
pub const COMMIT_INTERVAL_MS_MAX: u64 = GROUP_INTERVAL_US_MAX / 1000;
/// Default `--commit-interval-ms`: the log's [`GROUP_INTERVAL_US_DEFAULT`].
pub const COMMIT_INTERVAL_MS_DEFAULT: u64 = GROUP_INTERVAL_US_DEFAULT / 1000;
/// Default `--commit-entries-max`: the log's [`GROUP_ENTRIES_DEFAULT`].
pub const COMMIT_ENTRIES_MAX_DEFAULT: usize = GROUP_ENTRIES_DEFAULT;
/// Largest log position the last-location table stores (positions are packed into 48 bits; at
/// 1 GB/s of log per shard that is nearly 9 years).
pub const TABLE_POS_MAX: u64 = (1 << 48) - 1;
/// Most devices one shard's last-location table holds.
pub const TABLE_DEVICES_MAX: usize = 1 << 31;
/// Size of one chunk of the table's record arena (records never straddle chunks).
pub const TABLE_CHUNK_BYTES: usize = 1 << 20;
/// Most record-arena chunks per table (16 GiB: a record reference is chunk << 18 | offset / 4, a u32).
pub const TABLE_CHUNKS_MAX: usize = 1 << 14;
/// Most records one last-location checkpoint file holds (one per device of the shard's table).
pub const CHECKPOINT_RECORDS_MAX: usize = TABLE_DEVICES_MAX;

const _: () = assert!(ENTRY_HEADER_BYTES % ENTRY_ALIGN_BYTES == 0);
// The stage holds at least one entry of the largest size (an append never waits for room twice).
const _: () = assert!(
    LOG_STAGE_BYTES_MAX >= ENTRY_HEADER_BYTES + ENTRY_PAYLOAD_BYTES_MAX + ENTRY_ALIGN_BYTES
);
const _: () = assert!(SEGMENT_HEADER_BYTES as u64 % PAGE_BYTES == 0);
const _: () = assert!(VSHARDS.is_power_of_two() && VSHARDS >= SHARDS_MAX && VSHARDS <= 1 << 16);
const _: () = assert!(SEGMENT_BYTES_MIN % PAGE_BYTES == 0);
const _: () = assert!(SEGMENT_BYTES_DEFAULT % PAGE_BYTES == 0);
const _: () =
    assert!(SEGMENT_BYTES_MIN as usize > SEGMENT_HEADER_BYTES + 64 * ENTRY_PAYLOAD_BYTES_MAX);
const _: () = assert!(ENTRY_PAYLOAD_BYTES_MAX > DEVICE_ID_BYTES_MAX + ATTRS_BYTES_MAX + 128);
const _: () = assert!(FRAME_BYTES_MAX <= 1 << 20);
const _: () = assert!(DEVICE_ID_BYTES_MAX <= u8::MAX as usize);
const _: () = assert!(SEGMENT_BYTES_MAX <= TABLE_POS_MAX);
const _: () = assert!(SEGMENT_HEADER_BYTES % CACHE_LINE_BYTES == 0);
const _: () = assert!(GROUP_INTERVAL_US_MIN <= GROUP_INTERVAL_US_DEFAULT);
const _: () = assert!(GROUP_INTERVAL_US_DEFAULT <= GROUP_INTERVAL_US_MAX);
const _: () = assert!(GROUP_ENTRIES_DEFAULT <= GROUP_ENTRIES_MAX);
// The configured interval is whole milliseconds: each log bound is one exactly.
const _: () = assert!(GROUP_INTERVAL_US_MIN % 1000 == 0 && GROUP_INTERVAL_US_MAX % 1000 == 0);
const _: () = assert!(GROUP_INTERVAL_US_DEFAULT % 1000 == 0 && COMMIT_INTERVAL_MS_MIN >= 1);
const _: () = assert!(TABLE_CHUNK_BYTES / 4 <= 1 << 18);
const _: () = assert!((TABLE_CHUNKS_MAX as u64) << 18 <= 1 << 32);
const _: () = assert!(TABLE_CHUNK_BYTES >= 64 * (48 + DEVICE_ID_BYTES_MAX));

/// Largest heartbeat sequence number: 2^53 - 1, the largest integer every JSON implementation
/// (JavaScript's `Number` included) represents exactly, so a client can never send a seq it
/// cannot read back from an ack.
pub const SEQ_MAX: u64 = (1 << 53) - 1;
/// How far before its receive time a heartbeat's device time (`ts`) may lie: 30 days. Older
/// heartbeats are refused with `ts_out_of_range` (a device clock that far off is broken, and the
/// log is not a back-fill archive).
pub const TS_PAST_MS_MAX: i64 = 30 * 24 * 3600 * 1000;
/// How far after its receive time a heartbeat's device time may lie: 10 minutes (clock skew).
pub const TS_FUTURE_MS_MAX: i64 = 10 * 60 * 1000;
/// Error frames one connection may provoke within [`CONN_ERRORS_WINDOW_MS`] (after a burst of
/// this many, one more per `window / max`) before it is closed with 1008.
pub const CONN_ERRORS_PER_WINDOW_MAX: u32 = 100;
/// See [`CONN_ERRORS_PER_WINDOW_MAX`].
pub const CONN_ERRORS_WINDOW_MS: u64 = 60_000;
/// Nesting depth beyond which a device frame is refused outright (`too_deep`): the JSON walker
/// keeps its container stack in one `u64` bit set, so it needs no allocation and no recursion.
pub const FRAME_JSON_DEPTH_MAX: usize = 64;
/// Longest access token accepted, in bytes (longer input is refused before any parsing).
pub const TOKEN_BYTES_MAX: usize = 512;
/// File descriptors kept free for everything that is not a client connection (segment files,
/// listeners, metrics, logs) when `connections_max` is checked against `RLIMIT_NOFILE`.
pub const OPEN_FILES_RESERVE: u64 = 512;
/// Largest capacity of one cross-executor mesh channel.
pub const MESH_CAPACITY_MAX: usize = 65_536;
/// Capacity of one channel of the control mesh (store queries, jobs on a peer's core: metrics
/// snapshots, subscription broadcasts). Apart from the data mesh (`mesh_capacity`), so control
/// never waits behind appends; a full channel makes the sender wait (backpressure).
pub const CONTROL_MESH_CAPACITY: usize = 256;
/// Capacity of one channel of the hand-off mesh (device sockets moved to the executor that owns
/// their shard); a full channel makes the accepting executor wait.
pub const HANDOFF_MESH_CAPACITY: usize = 256;
const _: () = assert!(CONTROL_MESH_CAPACITY <= MESH_CAPACITY_MAX);
const _: () = assert!(HANDOFF_MESH_CAPACITY <= MESH_CAPACITY_MAX);
/// Smallest frame size limit configuration may choose (a heartbeat with the longest id and
/// attribute blob must always fit).
pub const FRAME_BYTES_MIN: usize = 1024;

const _: () = assert!(JSON_DEPTH_MAX < FRAME_JSON_DEPTH_MAX && FRAME_JSON_DEPTH_MAX <= 64);
const _: () = assert!(TS_PAST_MS_MAX > 0 && TS_FUTURE_MS_MAX > 0);
const _: () = assert!(FRAME_BYTES_MIN <= FRAME_BYTES_MAX);
// A complete heartbeat frame (id, attrs and the fields) always fits under the small mark, and
// the bound holds many of the largest frames.
const _: () = assert!(PARTIAL_FRAME_SMALL_BYTES >= DEVICE_ID_BYTES_MAX + ATTRS_BYTES_MAX + 256);
const _: () = assert!(PARTIAL_FRAME_BYTES_EXEC_MAX >= 64 * FRAME_BYTES_MAX);
const _: () = assert!(FRAME_HEARTBEATS_MAX <= u16::MAX as usize);
const _: () =
    assert!(DEVICE_ID_BYTES_MAX <= u8::MAX as usize && ATTRS_BYTES_MAX <= u16::MAX as usize);

/// Default number of results of a history or area query.
pub const QUERY_LIMIT_DEFAULT: usize = 1000;
/// Largest `limit` a history or area query accepts (a larger one is a 400).
pub const QUERY_LIMIT_MAX: usize = 10_000;
const _: () = assert!(QUERY_LIMIT_DEFAULT <= QUERY_LIMIT_MAX);
/// Longest `cursor` parameter of a history page (a cursor is 71 characters; longer text is
/// refused before decoding). A page holds at most [`QUERY_LIMIT_MAX`] heartbeats in memory,
/// whatever its format; exports larger than a page are paged, never held whole.
pub const HISTORY_CURSOR_BYTES_MAX: usize = 128;

/// Most storage sinks (`[[sinks]]`) one server drains its shard logs to.
pub const SINKS_MAX: usize = 8;
/// Longest sink name, in bytes (it names cursor files).
pub const SINK_NAME_BYTES_MAX: usize = 32;
/// Most heartbeats in one sink batch (one database transaction or one audit-file fsync).
pub const SINK_BATCH_ROWS_MAX: usize = 100_000;
/// Most encoded bytes one sink batch may buffer before it is committed, whatever its row count.
pub const SINK_BATCH_BYTES_MAX: usize = 32 << 20;
/// Largest cursor file read (they are a few hundred bytes).
pub const SINK_CURSOR_BYTES_MAX: u64 = 4096;

/// Bounds of an audit sink's rotation window (`rotate`), seconds: at least a second (file names
/// have one-second resolution), at most an hour (the longest window before windows existed).
pub const AUDIT_ROTATE_SECS_RANGE: (u64, u64) = (1, 3600);
/// Bounds of an audit sink's rotation size (`rotate_bytes`): at least 1 MiB (smaller files only
/// multiply fsyncs and directory entries), at most 16 GiB.
pub const AUDIT_ROTATE_BYTES_RANGE: (u64, u64) = (1 << 20, 16 << 30);

const _: () = assert!(SINKS_MAX <= LOG_CONSUMERS_MAX);
const _: () = assert!(AUDIT_ROTATE_SECS_RANGE.0 >= 1 && AUDIT_ROTATE_SECS_RANGE.1 <= 3600);
const _: () = assert!(SINK_NAME_BYTES_MAX <= LOG_CONSUMER_NAME_BYTES_MAX);
const _: () = assert!(SINK_BATCH_BYTES_MAX >= 64 * ENTRY_PAYLOAD_BYTES_MAX);

/// Most subscriber WebSocket connections (`/v1/subscribe`) one server holds; beyond it the
/// upgrade is answered 503.
pub const SUBSCRIBERS_MAX: usize = 4096;
/// Most subscriptions one subscriber connection may hold at once (`too_many_subs`).
pub const SUBS_PER_CONN_MAX: usize = 32;
/// Most device ids one `devices` subscription may name (`too_many_devices`).
pub const SUB_DEVICES_MAX: usize = 1000;
/// Most device ids all `devices` subscriptions of the server name together (every executor holds
/// a replica of the interest index, so this bounds its memory; `too_many_devices`).
pub const SUB_DEVICES_TOTAL_MAX: usize = 1_000_000;
/// Longest subscription name, in bytes (names are 1..=64 bytes of `[A-Za-z0-9._-]`).
pub const SUB_NAME_BYTES_MAX: usize = 64;
/// Most events queued for one subscriber connection; beyond it events are counted as missed.
pub const SUB_QUEUE_EVENTS_MAX: usize = 2048;
/// Most event bytes queued for one subscriber connection; beyond it events are counted as missed.
pub const SUB_QUEUE_BYTES_MAX: usize = 256 << 10;
/// Kernel send buffer requested for a subscriber socket (the kernel doubles it): what a stalled
/// subscriber can pin in the kernel beside its queue.
pub const SUB_SOCKET_SEND_BYTES: usize = 128 << 10;
/// Answers (`ok`/`error`) queued for one subscriber connection before its reader pauses.
pub const SUB_CONTROL_QUEUED_MAX: usize = 64;
/// Capacity, in batches, of one channel of the event mesh (owner executor to subscriber
/// executor). A full channel drops the batch; its events are counted as missed.
pub const FANOUT_MESH_CAPACITY: usize = 64;
/// Most events in one batch on the event mesh.
pub const FANOUT_BATCH_EVENTS_MAX: usize = 1024;
/// Most matched events one shard keeps while their heartbeats are not yet durable; beyond it
/// events are counted as missed. Pending events are released by the commit group that makes
/// their heartbeats durable, so the queue holds at most the matches of the groups in flight.
pub const FANOUT_PENDING_EVENTS_MAX: usize = 65_536;

const _: () = assert!(SUB_NAME_BYTES_MAX <= DEVICE_ID_BYTES_MAX);
const _: () = assert!(SUB_DEVICES_MAX <= SUB_DEVICES_TOTAL_MAX);
const _: () = assert!(SUB_QUEUE_BYTES_MAX >= 4 * ENTRY_PAYLOAD_BYTES_MAX);
const _: () = assert!(FANOUT_MESH_CAPACITY <= MESH_CAPACITY_MAX);
const _: () = assert!(FANOUT_BATCH_EVENTS_MAX <= FANOUT_PENDING_EVENTS_MAX);

/// Most geofences one server holds (fence ids are `u32`; the registry refuses more).
pub const FENCES_MAX: usize = 100_000;
/// Most positions one fence polygon may have, over all its rings (closing positions included).
pub const FENCE_VERTICES_MAX: usize = 10_000;
/// Most polygon positions over all fences of one server (a PUT or bulk import that would exceed it
/// is refused with `too_many_vertices_total`; a fences file over it stops the server at start).
/// It bounds what every heartbeat can cost when polygons overlap, the index memory and the time
/// to rebuild the index on every change. Measured in perf/RESULTS.md (issue 20 §5): 100 fences
/// of 10,000 positions index in 0.1–0.3 s on the 2-core VM, and `containing` at the worst point
/// (all 100 overlapping, the point in a boundary cell of each) takes 25–50 µs.
pub const FENCE_VERTICES_TOTAL_MAX: usize = 1_000_000;
/// Grid of one polygon fence (see `fence::index`): most positions strictly inside one row of its
/// grid. A point in a boundary cell tests at most twice this many edges besides the cell's own.
pub const FENCE_GRID_ROW_VERTICES_MAX: usize = 16;
/// Grid of one polygon fence: fewest columns (cells) per row, so that most of a row's area is
/// classified inside or outside and needs no edge test.
pub const FENCE_GRID_COLUMNS_MIN: usize = 16;
/// Grid of one polygon fence: a row gets a column per this many edges spanning it or touching its
/// bottom (more columns when many edges cross the row, e.g. the teeth of a comb).
pub const FENCE_GRID_CELL_EDGES_TARGET: usize = 2;
/// Grid of one polygon fence: most columns per row.
pub const FENCE_GRID_COLUMNS_MAX: usize = 1024;
/// Grid of one polygon fence: most cells per polygon position over all its rows (8 bytes each):
/// the grids of [`FENCE_VERTICES_TOTAL_MAX`] positions take at most 32 MiB of cells.
pub const FENCE_GRID_CELLS_PER_VERTEX: usize = 4;
/// Polygons of at most this many positions get no grid: testing all their edges costs no more
/// than a boundary cell of a grid.
pub const FENCE_GRID_VERTICES_MIN: usize = 2 * FENCE_GRID_ROW_VERTICES_MAX;
/// Largest fence body (`PUT /v1/geofences/{name}`) accepted; larger is refused before parsing.
pub const FENCE_BODY_BYTES_MAX: usize = 1 << 20;
/// Longest fence name, in bytes (names are 1..=64 bytes of `[A-Za-z0-9._-]`).
pub const FENCE_NAME_BYTES_MAX: usize = 64;
/// Largest circle fence radius, in metres (20,000 km: about half the Earth's circumference, so a
/// circle never wraps past the antipode of its centre).
pub const FENCE_RADIUS_M_MAX: f64 = 20_000_000.0;

const _: () = assert!(FENCES_MAX <= u32::MAX as usize);
const _: () = assert!(FENCE_VERTICES_MAX >= 4 && FENCE_VERTICES_MAX <= u32::MAX as usize);
const _: () = assert!(FENCE_VERTICES_TOTAL_MAX >= FENCE_VERTICES_MAX);
// Positions of all fences are indexed with u32 offsets; a cell's edge count fits a u16.
const _: () = assert!(FENCE_VERTICES_TOTAL_MAX <= u32::MAX as usize / 2);
const _: () = assert!(FENCE_VERTICES_MAX <= u16::MAX as usize);
const _: () = assert!(FENCE_GRID_ROW_VERTICES_MAX >= 1 && FENCE_GRID_CELL_EDGES_TARGET >= 1);
const _: () =
    assert!(FENCE_GRID_COLUMNS_MIN >= 1 && FENCE_GRID_COLUMNS_MIN <= FENCE_GRID_COLUMNS_MAX);
const _: () = assert!(FENCE_GRID_CELLS_PER_VERTEX >= 1);
// A polygon with the most vertices, written with full f64 precision (~45 bytes a position), fits.
const _: () = assert!(FENCE_BODY_BYTES_MAX >= 64 * FENCE_VERTICES_MAX);
const _: () = assert!(FENCE_BODY_BYTES_MAX >= HTTP_BODY_BYTES_MAX);
const _: () = assert!(FENCE_NAME_BYTES_MAX <= DEVICE_ID_BYTES_MAX);
const _: () = assert!(FENCE_RADIUS_M_MAX > 0.0 && FENCE_RADIUS_M_MAX < 20_015_000.0);

/// Largest body of a bulk fence import (`POST /v1/geofences`); larger is refused (413) from the
/// request head, before any body byte is read, and only ops tokens may send more than
/// [`HTTP_BODY_BYTES_MAX`]. 64 MiB holds 10,000 polygons of about 6 KiB each, or any number of
/// circles up to [`FENCE_BULK_ENTRIES_MAX`].
pub const FENCE_BULK_BODY_BYTES_MAX: usize = 64 << 20;
/// Most fences one bulk import may carry (`too_many_entries` beyond).
pub const FENCE_BULK_ENTRIES_MAX: usize = 10_000;

const _: () = assert!(FENCE_BULK_BODY_BYTES_MAX >= FENCE_BODY_BYTES_MAX);
const _: () = assert!(FENCE_BULK_BODY_BYTES_MAX <= 1 << 30);
const _: () = assert!(FENCE_BULK_ENTRIES_MAX >= 1 && FENCE_BULK_ENTRIES_MAX <= FENCES_MAX);

/// How long `geobeat demo`, when stopping, waits for the answers (acks, error frames) to the
/// heartbeats its fleet sent before it prints its tally; the server's shutdown sends each
/// connection its final ack well within it.
pub const DEMO_DRAIN_TIMEOUT_MS: u64 = 2_000;

/// Least time between two log lines of one repeating event per executor (a failing `accept`
/// under EMFILE, refused tokens, protocol closes) or per shard (appends refused); the next line
/// carries the number suppressed.
pub const REPEAT_LOG_INTERVAL_MS: u64 = 10_000;

const _: () = assert!(REPEAT_LOG_INTERVAL_MS >= 1000);

/// How long the start-up check waits for a connection to the configured listen address: a
/// listener that answers means another process serves that address (SO_REUSEPORT would
/// otherwise let a second geobeat of the same user share the port silently).
pub const LISTEN_PROBE_CONNECT_TIMEOUT_MS: u64 = 200;
/// How long the start-up check keeps trying while a listener answers before it calls the address
/// in use: the listening socket of a geobeat killed a moment ago lives on until the kernel has
/// torn down its io_uring rings (their pending accepts hold it), which takes a moment after the
/// process is gone.
pub const LISTEN_PROBE_WAIT_MS: u64 = 3000;

// Connections and executors (`shard`, `net::router`, `net::ws`, `net::subscribe`).

/// Most frames one connection may have waiting for durability before its reader pauses.
pub const CONN_FRAMES_IN_FLIGHT_MAX: usize = 64;
/// Most error frames queued for one connection before its reader pauses.
pub const CONN_ERRORS_QUEUED_MAX: usize = 256;
/// Recycled forwarding buffers kept per executor.
pub const BATCH_POOL_MAX: usize = 256;
/// Segment files kept open for io_uring fdatasync per shard (older ones are reopened on demand).
pub const SYNC_FILES_MAX: usize = 4;
/// Longest a graceful shutdown waits for connections to drain before exiting anyway (whatever
/// is not yet durable then was never acked, so nothing acked is lost).
pub const SHUTDOWN_DRAIN_MAX: Duration = Duration::from_secs(10);
/// How often consumed positions, retention and sink backlogs are looked at.
pub const RETENTION_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// How often executors look at the process-wide stop flag.
pub const STOP_POLL_INTERVAL: Duration = Duration::from_millis(20);
/// How long a shard's commit waits before trying again after its log could not write staged
/// entries for lack of space (`log::Error::NoSpace` from a commit): the entries stay staged and
/// their waiters un-acked until a later try writes them.
pub const COMMIT_NO_SPACE_RETRY_INTERVAL: Duration = Duration::from_millis(100);
/// Connections over the cap that are still answered with a 503 (beyond that they are closed
/// at once, so a flood cannot exhaust descriptors).
pub const REFUSALS_IN_FLIGHT_MAX: usize = 256;
/// Most bytes read and dropped from a client after its final answer.
pub const DRAIN_BYTES_MAX: usize = 1 << 20;
/// How long a refused connection is read from and written to.
pub const REFUSAL_READ_MAX: Duration = Duration::from_millis(500);
/// Most HTTP requests served on one keep-alive connection.
pub const HTTP_REQUESTS_PER_CONN_MAX: usize = 1000;
/// How long the accept loop backs off after EMFILE/ENFILE before trying again.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
/// How long each step of the close sequence (close frame, socket close) may take.
pub const CLOSE_STEP_BOUND: Duration = Duration::from_secs(1);
/// How long a subscriber's writes may still take once shutdown began (the 1001 close frame to a
/// stalled client must not hold up the drain).
pub const STOP_WRITE_GRACE: Duration = Duration::from_secs(1);
/// Longest token expiry a connection arms a deadline for (about 100 years): a later expiry
/// cannot come while the connection lives (and a far-future instant would overflow).
pub const TOKEN_EXPIRY_WAIT_MAX: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// Idle intervals without a frame from the client after which it is closed (the first one earns
/// a ping, which a live client answers).
pub const IDLE_STRIKES_MAX: u32 = 2;

// WebSocket buffers of device (`net::ingest`) and subscriber (`net::subscribe`) connections.

/// tungstenite's read buffer per device and subscriber connection (subscribers send few, small
/// frames). Its default (128 KiB) alone would blow the 8 KiB
/// per idle connection budget, and an idle connection also pins an io_uring receive buffer of
/// the same size in glommio; frames larger than this are still read (the buffer grows for the
/// frame). 1 KiB holds the 8 frames a closed-loop device keeps in flight. Measured: 4 KiB gave
/// 10.6 KB of user memory per idle connection, 2 KiB 8.3 KB (perf/RESULTS.md).
pub const WS_READ_BUFFER_BYTES: usize = 1 << 10;
/// Frames queued before tungstenite writes to the socket: the writer feeds every pending error
/// frame and ack, then flushes once, so one syscall carries them all.
pub const INGEST_WS_WRITE_BUFFER_BYTES: usize = 8 << 10;
/// Hard cap of tungstenite's write buffer, device and subscriber connections alike: most bytes
/// queued for a slow reader of our acks before writes wait (subscriber writers flush as they go,
/// so they never reach it).
pub const WS_WRITE_BUFFER_BYTES_MAX: usize = 256 << 10;
/// Bytes tungstenite gathers before writing to a subscriber's socket.
pub const SUB_WS_WRITE_BUFFER_BYTES: usize = 16 << 10;
/// Queue items the writer takes per round (one flush per round).
pub const SUB_WRITE_BATCH_MAX: usize = 64;

// Event fan-out (`subscribe::fanout`) and queries (`query`, `net::http`).

/// A bbox covering more cells than this is kept in the short "wide" list instead (a world-wide
/// box would otherwise sit in every cell).
pub const FANOUT_GRID_CELLS_PER_BOX_MAX: usize = 36;
/// How often unreported drop counts are retried when no commit sends them.
pub const FANOUT_MISSED_FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// How long opening a shard directory waits for its lock (`LOCK`) before answering that another
/// process holds it: a just-released lock can stay held for a moment by a child process forked
/// from another thread that has not yet exec'd (close-on-exec drops it there). Short, because a
/// real conflict (a second server on the same data directory) should be reported at once.
pub const DIR_LOCK_WAIT_MS: u64 = 500;

/// Slack for wall-clock steps backwards between two receive stamps of one device.
pub const CLOCK_STEP_SLACK_MS: i64 = 60_000;
/// Largest `radius` of a near query (`GET /v1/devices/near`), in metres: half the equatorial
/// circumference of the WGS 84 ellipsoid (pi * 6,378,137 m, rounded up), so one query can cover
/// the whole Earth. Not [`FENCE_RADIUS_M_MAX`]: a query circle is only a filter, while a fence
/// circle is stored and must stay short of its centre's antipode (20,000 km is below the half
/// circumference on every meridian). Both values are public (docs/openapi.json,
/// docs/PROTOCOL.md), hence two constants.
pub const QUERY_RADIUS_M_MAX: f64 = 20_037_509.0;

const _: () = assert!(QUERY_RADIUS_M_MAX >= 20_037_508.35 && QUERY_RADIUS_M_MAX < 20_037_510.0);
// Every fence circle is also a valid query circle.
const _: () = assert!(FENCE_RADIUS_M_MAX <= QUERY_RADIUS_M_MAX);

// Fence index (`fence::index`).

/// Most cells a fence may occupy on its level (else it goes one level coarser).
pub const FENCE_CELLS_MAX: u64 = 16;

// Runtime (`rt`) and its start-up probe (`preflight`).

/// io_uring registered-buffer memory per executor. geobeat does no DMA file I/O, so the minimum
/// that glommio accepts is plenty; it counts against the 8 MiB locked-memory limit.
pub const IO_MEMORY_BYTES: usize = 512 << 10;
/// Locked memory (`RLIMIT_MEMLOCK`, bytes) the executors need: glommio refuses to start an
/// executor below 512 KiB (`MemLockLimit`), and the registered buffers are `IO_MEMORY_BYTES`.
/// Checked at start by [`crate::preflight`], with a message that says how to raise it.
pub const MEMLOCK_BYTES_MIN: u64 = {
    const GLOMMIO_MEMLOCK_BYTES_MIN: u64 = 512 << 10;
    if (IO_MEMORY_BYTES as u64) > GLOMMIO_MEMLOCK_BYTES_MIN {
        IO_MEMORY_BYTES as u64
    } else {
        GLOMMIO_MEMLOCK_BYTES_MIN
    }
};
/// How often [`crate::rt::Nudge`] wakes its executor.
pub const NUDGE_INTERVAL: Duration = Duration::from_millis(2);
/// Submission queue depth per executor ring. Sockets and fdatasyncs are the only users.
pub const IO_RING_DEPTH: usize = 512;
/// Entries of the io_uring probe ring `preflight` opens at start (the smallest useful ring).
pub const PROBE_RING_ENTRIES: u32 = 4;

// Storage sinks (`flusher`).

/// Shortest pause after a failed batch; doubles per consecutive failure.
pub const SINK_BACKOFF_MIN_MS: u64 = 100;
/// Longest pause after failed batches.
pub const SINK_BACKOFF_MAX_MS: u64 = 5_000;
/// Longest a sink thread sleeps before looking at the stop flag again, ms.
pub const SINK_STOP_POLL_MS: u64 = 20;
/// How long after its window ends an open file of a caught-up shard is sealed, ms: room for
/// heartbeats stamped just before the window ended but made durable just after (a group commit
/// takes milliseconds; a later one only lands in the next file, so this is about tidiness).
pub const AUDIT_SEAL_GRACE_MS: i64 = 5_000;
/// Connect timeout used when the connection string gives none.
pub const PG_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// TCP user timeout used when the connection string gives none: a silent server (network
/// partition, stopped host) fails a batch after this long instead of hanging the sink.
pub const PG_TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

// Device frame decoding (`proto::json`).

/// Longest object key decoded when it contains escapes; longer keys are unknown anyway.
pub const JSON_KEY_BYTES_MAX: usize = 16;

// Tokens and secrets (`auth`), data directory files (`datadir`).

/// Longest TTL `parse_ttl` accepts: 10 years.
pub const TOKEN_TTL_MAX: Duration = Duration::from_secs(10 * 366 * 86_400);
/// Largest secret file read (a hex secret is 65 bytes; anything much larger is not a secret file).
pub const SECRET_FILE_BYTES_MAX: u64 = 1024;
/// Most entries in the revocation list (`<data-dir>/revocations`, `crate::revoke`): one per
/// revoked subject (a device, a gateway prefix, ops, a subscriber prefix). Every connect looks
/// the token's subject up in a hash map, so the size costs memory (about 150 bytes an entry),
/// not time; 10,000 covers a fleet's lost and stolen devices for years. Full, `geobeat token
/// revoke` refuses and says to lift old entries (or rotate the secret).
pub const REVOCATIONS_MAX: usize = 10_000;
/// Largest revocation file read: `REVOCATIONS_MAX` entries of the longest form (a 64-byte
/// subject JSON-escaped, two 13-digit times) fit with room to spare.
pub const REVOCATIONS_FILE_BYTES_MAX: u64 = 8 << 20;
/// How often each executor checks the revocation file for a change (one `stat`); a revocation
/// reaches live connections within about this long.
pub const REVOCATIONS_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Largest meta file read (a table of 4096 ranges is about 50 KiB).
pub const META_BYTES_MAX: u64 = 256 << 10;
/// Deepest level below the data directory [`crate::datadir::check_private`] looks at (the
/// deepest geobeat creates is `shard-NNNN/quarantine/<file>`, or a sink's cursor directory).
pub const PRIVATE_CHECK_DEPTH_MAX: usize = 6;

// Configuration bounds (`config`): a flag or setting outside them is refused at start.

/// Bounds of the handshake timeout, ms.
pub const HANDSHAKE_TIMEOUT_MS_RANGE: (u64, u64) = (100, 60_000);
/// Bounds of the idle timeout, s.
pub const IDLE_TIMEOUT_S_RANGE: (u64, u64) = (2, 3600);
/// Most simulated devices for `demo`.
pub const DEMO_DEVICES_MAX: u32 = 1_000_000;
/// Most heartbeats per second per simulated device for `demo`.
pub const DEMO_RATE_HZ_MAX: f64 = 100.0;
/// Bounds of a sink's poll interval, ms.
pub const SINK_POLL_INTERVAL_MS_RANGE: (u64, u64) = (1, 10_000);
/// Bounds of the zstd level.
pub const ZSTD_LEVEL_RANGE: (i32, i32) = (1, 19);
/// Attempts `geobeat backup` makes at one shard when retention changes it meanwhile.
pub const BACKUP_ATTEMPTS_MAX: u32 = 8;
/// Buffer of `geobeat backup` / `restore` file copies and CRCs.
pub const BACKUP_COPY_CHUNK_BYTES: usize = 1 << 20;
/// Largest backup manifest `geobeat restore` reads (a line per file; 16,384 segments × 256 shards fit).
pub const BACKUP_MANIFEST_BYTES_MAX: u64 = 1 << 30;

// Relationships between the bounds above.
const _: () = assert!(SHUTDOWN_DRAIN_MAX.as_millis() > STOP_POLL_INTERVAL.as_millis());
const _: () = assert!(REFUSAL_READ_MAX.as_millis() < SHUTDOWN_DRAIN_MAX.as_millis());
// A stalled client's close steps and last writes end well within the shutdown drain.
const _: () = assert!(2 * CLOSE_STEP_BOUND.as_millis() < SHUTDOWN_DRAIN_MAX.as_millis());
const _: () = assert!(STOP_WRITE_GRACE.as_millis() < SHUTDOWN_DRAIN_MAX.as_millis());
const _: () = assert!(PROBE_RING_ENTRIES as usize <= IO_RING_DEPTH);
// tungstenite wants its write-buffer cap above the buffer it gathers (by at least one message).
const _: () = assert!(WS_WRITE_BUFFER_BYTES_MAX > INGEST_WS_WRITE_BUFFER_BYTES);
const _: () = assert!(WS_WRITE_BUFFER_BYTES_MAX > SUB_WS_WRITE_BUFFER_BYTES);
const _: () = assert!(WS_READ_BUFFER_BYTES <= FRAME_BYTES_MAX);
const _: () = assert!(SUB_WRITE_BATCH_MAX <= SUB_QUEUE_EVENTS_MAX);
const _: () = assert!(MEMLOCK_BYTES_MIN >= IO_MEMORY_BYTES as u64);
const _: () = assert!(SINK_BACKOFF_MIN_MS >= 1 && SINK_BACKOFF_MIN_MS <= SINK_BACKOFF_MAX_MS);
// The meta file holds the vshard table: a generous 32 bytes per range fits.
const _: () = assert!(META_BYTES_MAX >= 32 * VSHARDS as u64);
const _: () = assert!(HANDSHAKE_TIMEOUT_MS_RANGE.0 <= HANDSHAKE_TIMEOUT_MS_RANGE.1);
const _: () =
    assert!(IDLE_TIMEOUT_S_RANGE.0 >= 1 && IDLE_TIMEOUT_S_RANGE.0 <= IDLE_TIMEOUT_S_RANGE.1);
const _: () = assert!(SINK_POLL_INTERVAL_MS_RANGE.0 >= 1);
const _: () = assert!(SINK_POLL_INTERVAL_MS_RANGE.0 <= SINK_POLL_INTERVAL_MS_RANGE.1);
const _: () = assert!(ZSTD_LEVEL_RANGE.0 >= 1 && ZSTD_LEVEL_RANGE.1 <= 22);

// MQTT ingest (src/proto/mqtt) and the HTTP device endpoints (src/proto/devices).
/// Largest MQTT packet accepted (fixed header included); advertised to MQTT 5 clients as
/// Maximum Packet Size. A JSON batch frame's bound plus room for topic and properties.
pub const MQTT_PACKET_BYTES_MAX: usize = FRAME_BYTES_MAX + 1024;
/// Longest PUBLISH topic or SUBSCRIBE filter, bytes (`owntracks/<user>/<device>` with 64-byte ids).
pub const MQTT_TOPIC_BYTES_MAX: usize = 256;
/// Longest MQTT client identifier, bytes (the spec's minimum is 23; 3.1.1 brokers commonly allow more).
pub const MQTT_CLIENT_ID_BYTES_MAX: usize = 128;
/// QoS 1/2 PUBLISHes one connection may have unacknowledged (waiting to be durable, or a QoS 2
/// waiting for PUBREL); advertised to MQTT 5 clients as Receive Maximum.
pub const MQTT_INFLIGHT_MAX: usize = 64;
/// QoS 2 packet ids an MQTT 3.1.1 connection may leave waiting for their PUBREL (3.1.1 has no
/// Receive Maximum, and a connection must keep reading to see PUBRELs, so this is enforced by
/// closing the connection, not by backpressure).
pub const MQTT_AWAITING_REL_MAX: usize = 1024;
/// Most topic filters in one SUBSCRIBE or UNSUBSCRIBE.
pub const MQTT_FILTERS_MAX: usize = 16;
/// Longest MQTT 5 reason string the server sends, bytes.
pub const MQTT_REASON_STRING_BYTES_MAX: usize = 128;
/// Bytes an MQTT connection reads from its socket at a time inside a packet (its read buffer
/// grows to at most one packet, [`MQTT_PACKET_BYTES_MAX`], plus one of these).
pub const MQTT_READ_CHUNK_BYTES: usize = 4096;
/// Bytes an MQTT connection reads at a time between packets, and the buffer an idle connection
/// keeps: a heartbeat PUBLISH is about 100 bytes.
pub const MQTT_IDLE_READ_BYTES: usize = 512;
/// A connection that sends no packet for this many thousandths of its keep alive is closed
/// (MQTT 3.1.1 §3.1.2.10 and 5 §3.1.2.10: one and a half times).
pub const MQTT_KEEP_ALIVE_GRACE_PERMILLE: u64 = 1500;
/// Longest OsmAnd / Traccar query or form body the device parsers read, bytes.
pub const DEVICE_PARAMS_BYTES_MAX: usize = HTTP_URI_BYTES_MAX + HTTP_BODY_BYTES_MAX;
const _: () = assert!(MQTT_PACKET_BYTES_MAX > FRAME_BYTES_MAX + MQTT_TOPIC_BYTES_MAX);
// Packet ids are u16 and 0 is reserved: the inflight bound must fit Receive Maximum's u16.
const _: () = assert!(MQTT_INFLIGHT_MAX >= 1 && MQTT_INFLIGHT_MAX <= u16::MAX as usize);
const _: () = assert!(MQTT_AWAITING_REL_MAX >= MQTT_INFLIGHT_MAX);
const _: () = assert!(MQTT_IDLE_READ_BYTES <= MQTT_READ_CHUNK_BYTES);
// Remaining Length is a 4-byte varint: at most 268,435,455 bytes.
const _: () = assert!(MQTT_PACKET_BYTES_MAX <= 268_435_455);
const _: () = assert!(MQTT_TOPIC_BYTES_MAX <= u16::MAX as usize);

// HTTP device endpoints for the phone apps (src/net/http/osmand.rs, src/net/http/owntracks.rs).
/// Largest request body a device app's request may carry (Traccar Client's JSON location is about
/// 600 bytes, an OwnTracks location with region lists a few KiB). Checked, after the token, before
/// a byte of the body is read.
pub const DEVICE_HTTP_BODY_BYTES_MAX: usize = 16 << 10;
/// Longest `Authorization: Basic` value decoded (base64 of `user:password`: a device id and a
/// token with room to spare).
pub const BASIC_CREDENTIALS_BYTES_MAX: usize =
    4 * (DEVICE_ID_BYTES_MAX + TOKEN_BYTES_MAX + 2) / 3 + 4;
/// How long a device app's request waits for its heartbeat to become durable before it is
/// answered 503 (the app resends; the heartbeat may still be stored, so a resend can duplicate
/// it). Below the apps' own request timeouts (Traccar Client 8: 15 s).
pub const DEVICE_HTTP_DURABLE_WAIT_MS: u64 = 10_000;
const _: () = assert!(DEVICE_HTTP_BODY_BYTES_MAX <= HTTP_BODY_BYTES_MAX);
const _: () = assert!(DEVICE_HTTP_BODY_BYTES_MAX + HTTP_URI_BYTES_MAX <= DEVICE_PARAMS_BYTES_MAX);
const _: () = assert!(BASIC_CREDENTIALS_BYTES_MAX < HTTP_HEAD_BYTES_MAX);
// An entry's JSON is at most about 6 times a 64-byte subject (\u escapes) plus 120 bytes.
const _: () = assert!(
    REVOCATIONS_FILE_BYTES_MAX >= (REVOCATIONS_MAX * (6 * DEVICE_ID_BYTES_MAX + 120)) as u64
);

// TLS (src/net/tls.rs: wss:// and https on `--tls-listen`, mqtts:// on `--mqtts-listen`).
/// Time from TCP accept to a completed TLS handshake; a client that has not finished by then is
/// closed (a stalled handshake holds a connection slot and a rustls session of a few KiB).
pub const TLS_HANDSHAKE_TIMEOUT_MS: u64 = 5_000;
/// TLS handshakes each executor starts per second, sustained. A reconnect storm (a whole fleet
/// after a network outage) would otherwise spend every core on public-key operations (about
/// 170 µs per ECDSA P-256 handshake here, 280 µs for RSA-2048) while live devices wait. Sockets
/// beyond the rate are closed before a byte of TLS is read (cheap: no key operation) and counted
/// (`geobeat_tls_events{event="rate_refused"}`); their clients retry with their own backoff.
/// 2,000/s is at most about a third of a core for ECDSA P-256.
pub const TLS_HANDSHAKES_PER_S_MAX: u32 = 2_000;
/// Handshakes an executor may start at once above the rate (the token bucket's depth), so a
/// brief burst after a quiet spell is not refused.
pub const TLS_HANDSHAKE_BURST_MAX: u32 = 500;
/// Most bytes one read of a TLS connection's socket asks for (glommio pins a buffer of the
/// requested size while the read is pending, i.e. for as long as the connection is idle). A
/// heartbeat's TLS record is a few hundred bytes.
pub const TLS_READ_BYTES: usize = 1024;
/// Most TLS bytes a session buffers before they make a whole record (src/net/tls/session.rs):
/// one handshake message of up to 64 KiB (a client certificate chain; rustls's own bound) plus
/// one record of ciphertext (16 KiB of data and TLS 1.2's expansion, with its header). Held only
/// while a record is arriving; an idle session holds none.
pub const TLS_INCOMING_BYTES_MAX: usize = 0xFFFF + 18_437;
/// Most plaintext bytes one write encrypts (one TLS record's worth); the session accepts the next
/// write only once these are on the socket, so this bounds its write buffer.
pub const TLS_WRITE_PLAINTEXT_BYTES: usize = 16 * 1024;
/// Largest certificate chain, private key or client-CA PEM file read, bytes.
pub const TLS_PEM_BYTES_MAX: u64 = 1 << 20;
const _: () = assert!(TLS_HANDSHAKE_TIMEOUT_MS >= 100);
// At least one TLS record header and a small record per read.
const _: () = assert!(TLS_READ_BYTES >= 512);
const _: () = assert!(TLS_INCOMING_BYTES_MAX > TLS_READ_BYTES && TLS_WRITE_PLAINTEXT_BYTES >= 1024);
const _: () = assert!(TLS_HANDSHAKE_BURST_MAX >= 1 && TLS_HANDSHAKES_PER_S_MAX >= 1);

// Replication to NATS JetStream (`--durability replicated`: src/replicate, src/shard/replicate.rs).
/// Consecutive vshards of one shard that share a subject (a *unit*): 64 units for the 4096
/// vshards, so a batch carries the heartbeats of many devices even at low per-device rates
/// (a subject per vshard would make batches of one heartbeat at fleet rates), while a unit
/// still moves between nodes as a block (issue 17 item 2).
pub const REPLICATE_VSHARDS_PER_SUBJECT: usize = 64;
/// Most heartbeats one executor publishes in one round (all its units together): bounds the
/// batches in flight and the memory they hold (entries are about 100-300 bytes).
pub const REPLICATE_ROUND_ENTRIES_MAX: usize = 20_000;
/// Largest batch payload, bytes: below NATS's default `max_payload` (1 MiB).
pub const REPLICATE_BATCH_BYTES_MAX: usize = 512 << 10;
/// How long a round waits for its PubAcks before resending what got no answer (same message
/// ids): above one fsynced R3 publish (~3 ms) by far, below a stream leader election (~4.5 s)
/// so a lost publish is resent soon after the new leader is up.
pub const REPLICATE_PUBACK_TIMEOUT: Duration = Duration::from_millis(2000);
/// Pause before resending after "no responders" (no stream leader) or a failed connect.
pub const REPLICATE_RETRY_BACKOFF: Duration = Duration::from_millis(250);
/// An idle replication connection is PINGed this often (a dead server shows before the next
/// round needs it).
pub const REPLICATE_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// `/readyz` answers 503 `replication_unavailable` once a shard's replication loop has had no
/// working NATS connection for this long (acks wait meanwhile: a load balancer should send
/// devices to a node that can reach the streams). Above one reconnect backoff, so a single
/// dropped connection that reconnects at once does not flap readiness.
pub const REPLICATE_UNREADY_AFTER: Duration = Duration::from_secs(2);
/// Time allowed for one JetStream API request (stream info, create, message get) and a connect.
pub const REPLICATE_REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// How long `serve` waits at start-up for a NATS server and a JetStream meta leader before it
/// refuses to start (replicated durability needs the streams).
pub const REPLICATE_STARTUP_WAIT: Duration = Duration::from_secs(10);
/// The streams' duplicate window (`Nats-Msg-Id` dedupe): covers every resend of a batch (they
/// follow within seconds; a restarted node finds the tail in the stream instead).
pub const REPLICATE_DEDUPE_WINDOW: Duration = Duration::from_secs(120);
const _: () = assert!(REPLICATE_UNREADY_AFTER.as_millis() > REPLICATE_RETRY_BACKOFF.as_millis());
/// Most servers in `--nats-url`.
pub const NATS_URLS_MAX: usize = 16;
/// Most streams (`--nats-streams`).
pub const NATS_STREAMS_MAX: u32 = 64;
/// Longest NATS protocol line (INFO of a large cluster included), bytes.
pub const PROTO_LINE_BYTES_MAX: usize = 64 << 10;
/// Largest NATS message geobeat accepts (a reply carrying a batch, base64 in JSON), bytes.
pub const NATS_MSG_BYTES_MAX: usize = 4 << 20;
/// Bytes a NATS client reads from its socket at a time.
pub const NATS_READ_CHUNK_BYTES: usize = 16 << 10;
const _: () = assert!(VSHARDS % REPLICATE_VSHARDS_PER_SUBJECT == 0);
const _: () = assert!(REPLICATE_BATCH_BYTES_MAX * 2 <= NATS_MSG_BYTES_MAX);
const _: () = assert!(NATS_STREAMS_MAX as usize <= VSHARDS / REPLICATE_VSHARDS_PER_SUBJECT);

// The cluster-wide view (issue 17 item 3: src/replicate/follow.rs, src/shard/follow.rs,
// src/table/view.rs). Every executor of a cluster node follows the subjects of its own shards'
// units with one JetStream pull consumer per stream; what is in flight is bounded per pull.
/// Most messages (batches) one pull asks for: with at most one pull in flight per stream per
/// executor, at most this many batches are between the stream and the view at a time.
pub const VIEW_PULL_BATCH_MAX: usize = 16;
/// Most payload bytes one pull asks for (JetStream's `max_bytes`): a few full batches
/// ([`REPLICATE_BATCH_BYTES_MAX`]), so a pull never holds more than this per stream and executor.
pub const VIEW_PULL_BYTES_MAX: usize = 2 << 20;
/// How long a pull waits on the server for new messages before it expires (the follower then
/// pulls again): an idle follower costs one request per stream this often.
pub const VIEW_PULL_EXPIRES: Duration = Duration::from_secs(2);
/// Extra time the follower waits past a pull's expiry for the server's 408 before it treats the
/// connection as dead and reconnects.
pub const VIEW_PULL_GRACE: Duration = Duration::from_secs(3);
/// A follower's consumer unused this long is deleted by the server (a node that died leaves no
/// consumer behind for long; a live follower pulls far more often).
pub const VIEW_CONSUMER_INACTIVE: Duration = Duration::from_secs(60);
/// Devices one shard's view may hold (the devices of that shard written by other nodes): the
/// same bound as the local table; a device past it is refused, logged and counted
/// (`geobeat_view_refused_total`), never dropped silently.
pub const VIEW_DEVICES_MAX: usize = TABLE_DEVICES_MAX;
const _: () = assert!(VIEW_PULL_BYTES_MAX >= 2 * REPLICATE_BATCH_BYTES_MAX);
const _: () = assert!(VIEW_PULL_BYTES_MAX < NATS_MSG_BYTES_MAX);
const _: () = assert!(VIEW_PULL_BATCH_MAX >= 1);

// Exactly once from the device (issue 18: src/table/device_seq.rs, src/store.rs, src/shard/core.rs).
/// Reordering tolerated below a device's high-water mark: a heartbeat whose device sequence is at
/// most this far below the highest stored one is still stored if it never was (a buffered send
/// overtaken by a later one); further below, it is acknowledged as a duplicate and counted.
pub const DEVICE_SEQ_WINDOW: u64 = 64;
/// Devices without sequence numbers (HTTP apps: OsmAnd, OwnTracks) are deduplicated on
/// (device, device timestamp) against this many of the device's most recently stored entries
/// (a walk back its chain in the log; nothing kept in memory).
pub const DEDUPE_DEVICE_TIME_ENTRIES_MAX: usize = 16;
/// How long a resume frame (or CONNACK) waits for the device's mark to become durable before
/// the connection is closed instead (only a failing log makes it wait more than a commit).
pub const RESUME_DURABLE_WAIT_MS: u64 = 10_000;
const _: () = assert!(DEVICE_SEQ_WINDOW <= 64 && DEDUPE_DEVICE_TIME_ENTRIES_MAX >= 1);

// The connection engine (`net::engine`, `--engine ring`): one io_uring per executor.

/// Submission queue entries of an executor's engine ring. A full queue is submitted and reused,
/// so this bounds only the requests per `io_uring_enter`, not the connections.
pub const ENGINE_SQ_ENTRIES: u32 = 1024;
/// Completion queue entries of the engine ring: multishot receives post many completions per
/// submission; an overflow is kept by the kernel (no loss), this only sizes the fast path.
pub const ENGINE_CQ_ENTRIES: u32 = 8192;
/// Provided receive buffers per executor (a power of two). Buffers are held only while their
/// completion is processed (what a frame leaves unfinished is copied to its connection), so no
/// buffer is pinned by an idle connection; 512 × 4 KiB = 2 MiB per executor.
pub const ENGINE_BUF_COUNT: u16 = 512;
/// Bytes per provided receive buffer: a few whole heartbeat frames.
pub const ENGINE_BUF_BYTES: usize = 4096;
/// Bytes an engine connection may receive while its parsing is paused (too many frames in
/// flight, errors queued, a forward under way) before its receive is cancelled: backpressure
/// by not reading, with one frame's worth of slack so a short pause costs no cancel/re-arm.
pub const ENGINE_PAUSED_BYTES_MAX: usize = FRAME_BYTES_MAX;
/// Granularity of the engine's timing wheel (idle, token-expiry, write-stall and close-step
/// deadlines): a deadline fires at most this late.
pub const ENGINE_WHEEL_TICK: Duration = Duration::from_millis(10);
/// Slots of the timing wheel (a power of two): one turn is 40.96 s at 10 ms; later deadlines
/// wait in their slot for their turn.
pub const ENGINE_WHEEL_SLOTS: usize = 4096;
/// Subscriber queue items (events, answers) one engine turn renders, over all its subscribers:
/// past it, subscribers wait for the next turn, so a deep fan-out backlog cannot hold the
/// ingest acks of the same turn back for long (about 4 ms of rendering here).
pub const ENGINE_SUB_ITEMS_PER_TURN_MAX: usize = 4096;
const _: () = assert!(ENGINE_SUB_ITEMS_PER_TURN_MAX >= SUB_WRITE_BATCH_MAX);
const _: () = assert!(ENGINE_BUF_COUNT.is_power_of_two());
const _: () = assert!(ENGINE_WHEEL_SLOTS.is_power_of_two());
const _: () = assert!(ENGINE_BUF_BYTES >= 2 * 14);

// The log's hash chain (`log::chain`, issue 18 item 3).
/// Log entries one hash-chain group covers: one SHA-256 digest and one 72-byte sidecar record
/// per group (about 0.7% of a segment's bytes for 150-byte entries). A smaller group names a
/// tampered entry more closely; a larger one writes less. Groups also close early, at a segment's
/// seal and when the chain has waited [`CHAIN_GROUP_IDLE_MS`] with nothing more to add.
pub const CHAIN_GROUP_ENTRIES: u32 = 64;
/// How often a shard's chain thread looks for newly durable entries, ms: the chain's lag behind
/// the durable position when it keeps up (the ack path only stores one atomic per commit).
pub const CHAIN_POLL_INTERVAL_MS: u64 = 10;
/// A partial group is closed (its record written) once the chain is caught up and the group's
/// first entry has waited this long, ms: what a verify of a quiet live shard leaves unchained.
pub const CHAIN_GROUP_IDLE_MS: u64 = 1000;
/// Entries the chain thread hashes before it looks at its stop flag again.
pub const CHAIN_STEP_ENTRIES_MAX: usize = 16_384;
/// Longest `ShardStore::retention_begin` (tools and tests) blocks waiting for the chain to seal
/// the segments it would delete, ms; it then deletes only what the chain has sealed and leaves
/// the rest to its next run. A server's executors never wait (`retention_begin_within` with no
/// wait): expired segments were normally sealed long before (the chain lags by milliseconds),
/// and after an open over a long unchained log the rest is deleted at a later run.
pub const CHAIN_RETENTION_WAIT_MS: u64 = 2_000;
/// Longest a stopping chain thread keeps hashing to catch up with the durable position before
/// it closes its group and exits, ms (the next open extends the rest).
pub const CHAIN_STOP_CATCH_UP_MS: u64 = 1000;
const _: () = assert!(CHAIN_GROUP_ENTRIES >= 1 && CHAIN_GROUP_ENTRIES <= 1 << 16);
const _: () = assert!(CHAIN_STEP_ENTRIES_MAX >= CHAIN_GROUP_ENTRIES as usize);

// The commit path of issue 15 §3 (`--write-mode dsync`, `--commit-linger-adaptive-us`).

/// Largest `--commit-linger-adaptive-us`: the longest, in µs, a small group may wait for company
/// before its durable write starts (0 = never wait). A few hundred µs is about one sync of a
/// consumer SSD; past 1 ms the wait would cost more ack latency than one more sync.
pub const COMMIT_LINGER_ADAPTIVE_US_MAX: u64 = 1000;
/// The adaptive linger waits only while the running average of recent group sizes (heartbeats
/// per group commit, per executor) is below this: small groups mean each sync carries few
/// heartbeats, so waiting a little shares one sync among more of them; large groups already
/// share it (they grew while the previous sync was in flight) and never wait.
pub const COMMIT_ADAPTIVE_SMALL_GROUP_ENTRIES: u64 = 8;
/// Weight of the newest group in that running average: `avg += (group - avg) / this` (an
/// exponentially weighted average over roughly the last this-many groups).
pub const COMMIT_ADAPTIVE_AVERAGE_WEIGHT: u64 = 8;
const _: () = assert!(COMMIT_LINGER_ADAPTIVE_US_MAX <= GROUP_INTERVAL_US_MAX);
const _: () = assert!(COMMIT_ADAPTIVE_SMALL_GROUP_ENTRIES >= 2);
const _: () = assert!(COMMIT_ADAPTIVE_AVERAGE_WEIGHT >= 1);

// Ownership of replication units (issue 17 item 2: src/replicate/placement.rs, docs/cluster.md).
/// How often a node re-puts its lease in the placement bucket and re-reads placement.
pub const PLACEMENT_LEASE_INTERVAL: Duration = Duration::from_secs(1);
/// A node whose lease revision has not moved for this long (as seen by the observer's own
/// clock: no clock is compared across machines) is dead and its units are taken over.
pub const PLACEMENT_DEAD_AFTER: Duration = Duration::from_secs(5);
/// Most nodes in one cluster (lease keys read per tick).
pub const PLACEMENT_NODES_MAX: usize = 64;
/// Longest `--node-id`, bytes (it is a KV key token and appears in every claim).
pub const NODE_ID_BYTES_MAX: usize = 64;
/// Skipped positions (entries of units this node does not own) one shard remembers until the
/// ack waiters covering them are passed: at most one round of entries.
pub const PLACEMENT_SKIPPED_MAX: usize = REPLICATE_ROUND_ENTRIES_MAX;
// A live node re-puts its lease several times before anyone may call it dead.
const _: () = assert!(PLACEMENT_DEAD_AFTER.as_millis() >= 3 * PLACEMENT_LEASE_INTERVAL.as_millis());
const _: () = assert!(PLACEMENT_NODES_MAX >= 1);

// `geobeat cluster status` (src/cluster.rs, docs/cluster.md "Cluster status").
/// Time between the two reads of the leases: a live node re-puts its lease every
/// [`PLACEMENT_LEASE_INTERVAL`], so a lease whose revision did not move in this window belongs
/// to a node that is not running its placement loop now.
pub const CLUSTER_STATUS_WINDOW: Duration = Duration::from_millis(2_000);
/// How long `cluster status` tries the NATS servers before saying they are unreachable.
pub const CLUSTER_STATUS_CONNECT_WAIT: Duration = Duration::from_secs(3);
/// Connect and read timeout of the best-effort `/metrics` read of each node.
pub const CLUSTER_STATUS_HTTP_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest `/metrics` answer read from a node.
pub const CLUSTER_STATUS_METRICS_BYTES_MAX: usize = 4 << 20;
/// Connect and read timeout of one HAProxy runtime API command.
pub const CLUSTER_HAPROXY_SOCKET_TIMEOUT: Duration = Duration::from_secs(2);
/// Units `cluster status` reads claims for (one claim per unit; units are vshard runs).
pub const CLUSTER_STATUS_UNITS_MAX: usize = VSHARDS;
const _: () =
    assert!(CLUSTER_STATUS_WINDOW.as_millis() >= 2 * PLACEMENT_LEASE_INTERVAL.as_millis());
const _: () = assert!(CLUSTER_STATUS_WINDOW.as_millis() < PLACEMENT_DEAD_AFTER.as_millis());
