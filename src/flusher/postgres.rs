//! The PostgreSQL sink: every heartbeat as one row of `history` (primary key `(shard, pos)`), and
//! each device's newest heartbeat by device time in `last_location`. A batch is one transaction:
//! rows the table may already hold (a replay after a crash or a failed commit: positions up to the
//! shard's largest `pos` in `history`, looked up once per (re)start of the shard) go through a
//! session-local staging table and `INSERT ... ON CONFLICT (shard, pos) DO NOTHING`; the rest
//! (normally the whole batch) are `COPY`ed straight into `history`. Then the batch's position
//! range is read back from `history` to upsert each device's newest row into `last_location`.
//! It owns the schema (created if absent, under an advisory lock), the SQL and the connection
//! (dropped on any error and opened again on the next attempt; the driver backs off).
//!
//! Every `history` row carries a `digest` (issue 18 item 3): SHA-256 of the digest of the row
//! before it in the same shard, by `pos` (the sink's exactly-once order), followed by the row's
//! canonical bytes ([`super::rowdigest`]); a shard's first row, and the first row after rows an
//! older build wrote without digests (`NULL`, reported as "unchained" by `geobeat audit
//! verify`), chain from [`super::rowdigest::GENESIS`]. The predecessor is the row with the
//! largest `pos` below the batch's first one: kept in memory after each commit, and looked up in
//! the table (inside the batch's transaction) after every (re)start or failure, so the chain
//! holds across flusher restarts and PostgreSQL outages. A replayed batch recomputes the same
//! digests for the rows the table already holds (same predecessor, same bytes), and the rows past
//! them chain from the digest the table holds for the last of them (looked up after the
//! conflict-checked insert), so a re-sent batch never forks the chain. Tables made by an older
//! build get the column with `ALTER TABLE ... ADD COLUMN IF NOT EXISTS`.
//!
//! Invariants: replaying a batch changes nothing (history rows are keyed by their log position;
//! the upsert only replaces a row by a strictly newer `(ts, pos)`, which a replay never is), so
//! at-least-once delivery yields exactly-once content. Only positions above the largest one known
//! to be in `history` for the shard are copied without a conflict check; after any failure that
//! knowledge is dropped and looked up again. `last_location` follows the same rule as the server's
//! in-memory table: the newest device time wins, ties go to the later append.

use crate::limits::{PG_CONNECT_TIMEOUT, PG_TCP_USER_TIMEOUT};
use std::io::Write;

use crate::log::Entry;
use crate::route::ShardId;

use super::cursor::Cursor;
use super::driver::{Push, Sink};
use super::encode::{write_copy_row, COPY_COLUMNS};
use super::rowdigest::{row_digest, RowFields, GENESIS};
use super::FlushError;

/// Advisory lock key serialising schema creation between concurrent sinks.
const SCHEMA_LOCK_KEY: i64 = 0x0067_656f_6265_6174; // "geobeat" in ASCII

/// The heartbeat columns both `history` and `last_location` hold, with their types, in table
/// order; each table adds its own key columns around them (see [`Sql::new`]).
const FIX_COLUMNS: [(&str, &str); 9] = [
    ("lat", "double precision NOT NULL"),
    ("lon", "double precision NOT NULL"),
    ("ts", "bigint NOT NULL"),
    ("received_at", "bigint NOT NULL"),
    ("alt", "real"),
    ("speed", "real"),
    ("heading", "real"),
    ("acc", "real"),
    ("attrs", "jsonb"),
];

/// The names of [`FIX_COLUMNS`].
fn fix_column_names() -> Vec<&'static str> {
    FIX_COLUMNS.iter().map(|(name, _)| *name).collect()
}

/// `CREATE TABLE IF NOT EXISTS {table}` with the definitions `before`, then [`FIX_COLUMNS`], then
/// `after` (columns or constraints), one per line.
fn create_table(table: &str, before: &[&str], after: &[&str]) -> String {
    let fix = FIX_COLUMNS.iter().map(|(name, ty)| format!("{name} {ty}"));
    let defs: Vec<String> = before
        .iter()
        .map(|d| d.to_string())
        .chain(fix)
        .chain(after.iter().map(|d| d.to_string()))
        .collect();
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (\n{}\n);",
        defs.join(",\n")
    )
}

/// The SQL statements of one schema.
#[derive(Debug)]
struct Sql {
    ddl: String,
    stage: String,
    copy_stage: String,
    copy_direct: String,
    max_pos: String,
    prev_digest: String,
    insert_staged: String,
    upsert_last: String,
}

impl Sql {
    fn new(schema: &str) -> Sql {
        let create_schema = if schema == "public" {
            String::new()
        } else {
            format!("CREATE SCHEMA IF NOT EXISTS {schema};\n")
        };
        let ddl = format!(
            "{create_schema}{}\n{}",
            create_table(
                &format!("{schema}.history"),
                &[
                    "shard integer NOT NULL",
                    "pos bigint NOT NULL",
                    "seq bigint NOT NULL",
                    "id text NOT NULL",
                ],
                &["digest bytea", "PRIMARY KEY (shard, pos)"],
            ),
            create_table(
                &format!("{schema}.last_location"),
                &["id text PRIMARY KEY"],
                &["shard integer NOT NULL", "pos bigint NOT NULL"],
            ),
        );
        // A table made by a build without digests: its rows stay NULL ("unchained").
        let ddl =
            format!("{ddl}\nALTER TABLE {schema}.history ADD COLUMN IF NOT EXISTS digest bytea;");
        let stage = format!(
            "CREATE TEMP TABLE IF NOT EXISTS geobeat_stage (LIKE {schema}.history) \
             ON COMMIT DELETE ROWS"
        );
        let cols = format!("{COPY_COLUMNS}, digest");
        let copy_stage = format!("COPY pg_temp.geobeat_stage ({cols}) FROM STDIN");
        let copy_direct = format!("COPY {schema}.history ({cols}) FROM STDIN");
        let max_pos = format!("SELECT max(pos) FROM {schema}.history WHERE shard = $1");
        let prev_digest = format!(
            "SELECT digest FROM {schema}.history WHERE shard = $1 AND pos < $2 \
             ORDER BY pos DESC LIMIT 1"
        );
        let last_cols = format!("id, {}, shard, pos", fix_column_names().join(", "));
        let insert_staged = format!(
            "INSERT INTO {schema}.history ({cols})\n\
               SELECT {cols} FROM pg_temp.geobeat_stage\n\
               ON CONFLICT (shard, pos) DO NOTHING"
        );
        let upsert_last = format!(
            "INSERT INTO {schema}.last_location AS l ({last_cols})\n\
               SELECT DISTINCT ON (id) {last_cols} FROM {schema}.history\n\
               WHERE shard = $1 AND pos BETWEEN $2 AND $3\n\
               ORDER BY id, ts DESC, pos DESC\n\
               ON CONFLICT (id) DO UPDATE SET\n\
                 lat = EXCLUDED.lat, lon = EXCLUDED.lon, ts = EXCLUDED.ts,\n\
                 received_at = EXCLUDED.received_at, alt = EXCLUDED.alt,\n\
                 speed = EXCLUDED.speed, heading = EXCLUDED.heading, acc = EXCLUDED.acc,\n\
                 attrs = EXCLUDED.attrs, shard = EXCLUDED.shard, pos = EXCLUDED.pos\n\
               WHERE (l.ts, l.pos) < (EXCLUDED.ts, EXCLUDED.pos)"
        );
        Sql {
            ddl,
            stage,
            copy_stage,
            copy_direct,
            max_pos,
            prev_digest,
            insert_staged,
            upsert_last,
        }
    }
}

/// The position and digest of the last row of a shard's chain.
type ChainHead = (u64, [u8; 32]);

/// Writes batches into PostgreSQL (see the module docs).
pub struct PgSink {
    name: String,
    config: postgres::Config,
    sql: Sql,
    client: Option<postgres::Client>,
    /// COPY text of the batch in hand, rows without their digest column and newline.
    pending: Vec<u8>,
    /// Canonical bytes ([`RowFields::canonical`]) of the batch in hand's rows.
    canon: Vec<u8>,
    /// COPY text with digests of the part of the batch being sent (reused).
    out: Vec<u8>,
    /// Reused attrs buffer.
    scratch: Vec<u8>,
    /// Shard of the batch in hand.
    pending_shard: Option<ShardId>,
    /// Position, end offset in `pending` and end offset in `canon` of each row of the batch in
    /// hand (reused).
    rows: Vec<(u64, usize, usize)>,
    /// Per shard: the largest `pos` known to be in `history` (`None`: none), once looked up.
    /// Dropped when the shard resumes (after a start or a failure).
    known_max: std::collections::HashMap<u32, Option<u64>>,
    /// Per shard: the position and digest of the last row this sink wrote (the chain's head),
    /// once known. Dropped when the shard resumes; looked up in the table then.
    head: std::collections::HashMap<u32, ChainHead>,
}

impl std::fmt::Debug for PgSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSink")
            .field("name", &self.name)
            .field("connected", &self.client.is_some())
            .finish()
    }
}

impl PgSink {
    /// A sink for the database at `url` (not connected until the first batch), tables in
    /// `schema` (a validated identifier).
    pub fn new(name: &str, url: &str, schema: &str) -> Result<PgSink, FlushError> {
        let mut config: postgres::Config = url.parse().map_err(|e| FlushError::Postgres {
            sink: name.to_owned(),
            op: "parse url",
            source: e,
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(PG_CONNECT_TIMEOUT);
        }
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(PG_TCP_USER_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("geobeat");
        }
        Ok(PgSink {
            name: name.to_owned(),
            config,
            sql: Sql::new(schema),
            client: None,
            pending: Vec::new(),
            canon: Vec::new(),
            out: Vec::new(),
            scratch: Vec::new(),
            pending_shard: None,
            rows: Vec::new(),
            known_max: std::collections::HashMap::new(),
            head: std::collections::HashMap::new(),
        })
    }

    fn err(&self, op: &'static str) -> impl Fn(postgres::Error) -> FlushError + '_ {
        move |source| FlushError::Postgres {
            sink: self.name.clone(),
            op,
            source,
        }
    }

    /// Connects and prepares the schema and the staging table.
    fn connect(&self) -> Result<postgres::Client, FlushError> {
        let mut client = self
            .config
            .connect(postgres::NoTls)
            .map_err(self.err("connect"))?;
        let mut tx = client.transaction().map_err(self.err("begin"))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK_KEY])
            .map_err(self.err("lock schema"))?;
        tx.batch_execute(&self.sql.ddl)
            .map_err(self.err("create tables"))?;
        tx.commit().map_err(self.err("commit schema"))?;
        client
            .batch_execute(&self.sql.stage)
            .map_err(self.err("create staging table"))?;
        tracing::info!(sink = %self.name, "connected to postgres");
        Ok(client)
    }

    /// Copies `data` (COPY text rows) with the statement `sql` inside `tx`.
    fn copy(
        &self,
        tx: &mut postgres::Transaction<'_>,
        sql: &str,
        data: &[u8],
    ) -> Result<(), FlushError> {
        let mut w = tx.copy_in(sql).map_err(self.err("copy"))?;
        // The writer's io::Error wraps the client's; `finish` reports the cause when it can.
        let wrote = w.write_all(data);
        let finished = w.finish().map_err(self.err("copy"));
        if let Err(e) = wrote {
            finished?;
            return Err(FlushError::Io {
                op: "copy to postgres",
                path: std::path::PathBuf::new(),
                source: e,
            });
        }
        finished.map(|_| ())
    }

    /// The digest of the row of `shard` with the largest position below `pos` in `tx`
    /// ([`GENESIS`] when there is none, or it has no digest).
    fn prev_digest(
        &self,
        tx: &mut postgres::Transaction<'_>,
        shard: ShardId,
        pos: u64,
    ) -> Result<Vec<u8>, FlushError> {
        let row = tx
            .query_opt(&self.sql.prev_digest, &[&(shard.0 as i32), &(pos as i64)])
            .map_err(self.err("look up the previous digest"))?;
        Ok(row
            .and_then(|r| r.get::<_, Option<Vec<u8>>>(0))
            .unwrap_or_else(|| GENESIS.to_vec()))
    }

    /// Fills `out` with the COPY text of rows `range` of the batch in hand, each followed by
    /// its digest chained from `prev`; returns the last digest.
    fn chain_rows(
        &self,
        out: &mut Vec<u8>,
        range: std::ops::Range<usize>,
        prev: &[u8],
    ) -> [u8; 32] {
        assert!(!range.is_empty());
        out.clear();
        let mut digest = [0u8; 32];
        let mut prev = prev;
        for k in range {
            let (text_from, canon_from) = match k {
                0 => (0, 0),
                _ => (self.rows[k - 1].1, self.rows[k - 1].2),
            };
            let (_, text_to, canon_to) = self.rows[k];
            digest = row_digest(prev, &self.canon[canon_from..canon_to]);
            prev = &digest;
            out.extend_from_slice(&self.pending[text_from..text_to]);
            // A bytea in COPY text: `\x` and hex, its backslash escaped.
            out.extend_from_slice(b"\t\\\\x");
            for b in digest {
                out.extend_from_slice(&HEX[b as usize * 2..b as usize * 2 + 2]);
            }
            out.push(b'\n');
        }
        digest
    }

    /// Writes the batch in hand of `shard` in one transaction; returns the largest position now
    /// known to be in `history` for the shard, and the chain's new head if known.
    fn write_batch(
        &self,
        client: &mut postgres::Client,
        shard: ShardId,
        out: &mut Vec<u8>,
    ) -> Result<(u64, Option<ChainHead>), FlushError> {
        let (first, last) = match (self.rows.first(), self.rows.last()) {
            (Some(f), Some(l)) => (f.0, l.0),
            _ => unreachable!("a batch has rows"),
        };
        let shard_sql = shard.0 as i32;
        let mut tx = client.transaction().map_err(self.err("begin"))?;
        let known = match self.known_max.get(&shard.0) {
            Some(k) => *k,
            None => tx
                .query_one(&self.sql.max_pos, &[&shard_sql])
                .map_err(self.err("look up largest position"))?
                .get::<_, Option<i64>>(0)
                .map(|p| p as u64),
        };
        // Rows at or below `known` may be in the table already (a replay): stage them and insert
        // without conflicts; copy the rest straight in.
        let replayed = known.map_or(0, |k| self.rows.partition_point(|r| r.0 <= k));
        if replayed > 0 {
            let prev = self.prev_digest(&mut tx, shard, first)?;
            self.chain_rows(out, 0..replayed, &prev);
            self.copy(&mut tx, &self.sql.copy_stage, out)?;
            tx.execute(&self.sql.insert_staged, &[])
                .map_err(self.err("insert replayed rows"))?;
        }
        let mut head = None;
        if replayed < self.rows.len() {
            let from = self.rows[replayed].0;
            let prev = match self.head.get(&shard.0) {
                Some((pos, digest)) if replayed == 0 && *pos < first => digest.to_vec(),
                // After a (re)start or a replay: what the table holds now.
                _ => self.prev_digest(&mut tx, shard, from)?,
            };
            let digest = self.chain_rows(out, replayed..self.rows.len(), &prev);
            self.copy(&mut tx, &self.sql.copy_direct, out)?;
            head = Some((last, digest));
        }
        tx.execute(
            &self.sql.upsert_last,
            &[&shard_sql, &(first as i64), &(last as i64)],
        )
        .map_err(self.err("upsert last_location"))?;
        tx.commit().map_err(self.err("commit"))?;
        Ok((known.map_or(last, |k| k.max(last)), head))
    }
}

/// Lower-case hex digits of every byte value, two per byte.
const HEX: &[u8; 512] = &{
    let digits = b"0123456789abcdef";
    let mut t = [0u8; 512];
    let mut b = 0;
    while b < 256 {
        t[b * 2] = digits[b >> 4];
        t[b * 2 + 1] = digits[b & 15];
        b += 1;
    }
    t
};

impl Sink for PgSink {
    fn check(&mut self) -> Result<(), FlushError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = Some(self.connect()?);
        }
        Ok(())
    }

    fn resume(&mut self, shard: ShardId, _cursor: &Cursor) -> Result<(), FlushError> {
        self.discard();
        // Whatever a failed or interrupted commit left behind is unknown: look it up again.
        self.known_max.remove(&shard.0);
        self.head.remove(&shard.0);
        Ok(())
    }

    fn push(&mut self, shard: ShardId, e: &Entry<'_>) -> Result<Push, FlushError> {
        match self.pending_shard {
            Some(s) => assert_eq!(s, shard, "one shard per batch"),
            None => self.pending_shard = Some(shard),
        }
        write_copy_row(&mut self.pending, &mut self.scratch, shard, e);
        // The digest column goes before the newline once the predecessor is known (commit).
        assert_eq!(self.pending.pop(), Some(b'\n'));
        RowFields::from_entry(shard, e).canonical(&mut self.canon);
        self.rows
            .push((e.pos.0, self.pending.len(), self.canon.len()));
        Ok(Push::Taken)
    }

    fn discard(&mut self) {
        self.pending.clear();
        self.canon.clear();
        self.rows.clear();
        self.pending_shard = None;
    }

    fn pending_bytes(&self) -> usize {
        self.pending.len() + self.canon.len()
    }

    fn commit(&mut self, shard: ShardId, _next: &mut Cursor) -> Result<(), FlushError> {
        assert_eq!(
            self.pending_shard,
            Some(shard),
            "commit of the shard pushed"
        );
        let mut client = match self.client.take() {
            Some(c) if !c.is_closed() => c,
            _ => self.connect()?,
        };
        // On error the connection is dropped: its state (an aborted transaction, a half-done
        // COPY) is unknown, and a fresh one costs little next to the backoff.
        let mut out = std::mem::take(&mut self.out);
        let written = self.write_batch(&mut client, shard, &mut out);
        self.out = out;
        let (known, head) = written?;
        self.known_max.insert(shard.0, Some(known));
        match head {
            Some(h) => self.head.insert(shard.0, h),
            None => self.head.remove(&shard.0),
        };
        self.client = Some(client);
        self.discard();
        Ok(())
    }

    fn idle(&mut self, _shard: ShardId, _now_ms: i64) -> Result<(), FlushError> {
        Ok(())
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    /// Column names of the `CREATE TABLE` of `table` in `ddl` (constraint lines skipped).
    fn table_columns<'a>(ddl: &'a str, table: &str) -> Vec<&'a str> {
        let head = format!("CREATE TABLE IF NOT EXISTS {table} (\n");
        let start = ddl
            .find(&head)
            .unwrap_or_else(|| panic!("no {table} in {ddl}"))
            + head.len();
        let body = &ddl[start..start + ddl[start..].find("\n);").unwrap()];
        body.split(",\n")
            .filter(|d| !d.starts_with("PRIMARY KEY"))
            .map(|d| d.split(' ').next().unwrap())
            .collect()
    }

    #[test]
    fn the_ddl_matches_the_statements_that_use_it() {
        // Parses the generated DDL (for the default and a named schema) and checks it against
        // the other statements: `history` has exactly the COPY columns in COPY order (the
        // staging table is `LIKE history`), `last_location` exactly the columns the upsert
        // inserts, the shared columns have one type in both tables, the upsert updates every
        // non-key column, and the keys are the documented ones.
        for (schema, prefix) in [
            ("public", ""),
            ("geo", "CREATE SCHEMA IF NOT EXISTS geo;\n"),
        ] {
            let sql = Sql::new(schema);
            assert!(
                sql.ddl.starts_with(&format!("{prefix}CREATE TABLE")),
                "{}",
                sql.ddl
            );
            let history = table_columns(&sql.ddl, &format!("{schema}.history"));
            let mut copy: Vec<&str> = COPY_COLUMNS.split(", ").collect();
            copy.push("digest");
            assert_eq!(history, copy);
            assert!(sql
                .ddl
                .contains("attrs jsonb,\ndigest bytea,\nPRIMARY KEY (shard, pos)\n);"));
            assert!(sql.ddl.ends_with(&format!(
                "\nALTER TABLE {schema}.history ADD COLUMN IF NOT EXISTS digest bytea;"
            )));
            assert!(sql.copy_direct.contains(", attrs, digest) FROM STDIN"));
            let last = table_columns(&sql.ddl, &format!("{schema}.last_location"));
            let upsert_head = format!("INSERT INTO {schema}.last_location AS l (");
            let cols = sql.upsert_last.strip_prefix(&upsert_head).unwrap();
            let inserted: Vec<&str> = cols[..cols.find(')').unwrap()].split(", ").collect();
            assert_eq!(last, inserted);
            assert!(sql.ddl.contains("last_location (\nid text PRIMARY KEY,\n"));
            for (name, ty) in FIX_COLUMNS {
                let def = format!("\n{name} {ty},\n");
                assert_eq!(sql.ddl.matches(&def).count(), 2, "{def:?} in {}", sql.ddl);
            }
            for c in last.iter().filter(|c| **c != "id") {
                let set = format!("{c} = EXCLUDED.{c}");
                assert!(
                    sql.upsert_last.contains(&set),
                    "{set} in {}",
                    sql.upsert_last
                );
            }
        }
    }
}
