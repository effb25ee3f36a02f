//! The gateway's durable state, through sqlx: a SQLite file by default, PostgreSQL when
//! `[database] url` says so (several replicas then share it). One portable schema
//! (`migrations/`), applied at start.
//!
//! Every change gets the next revision inside the same transaction that changes the
//! state tables, so the change log and the state never disagree. Revisions are dense:
//! a writer computes `max + 1`; a concurrent writer on another replica that took the
//! same number fails on the primary key and retries. A change is acknowledged to its
//! caller only after its transaction commits (SQLite: WAL with `synchronous = FULL`),
//! so a gateway killed with -9 loses nothing it acknowledged.

use std::borrow::Cow;
use std::time::Duration;

use nexus_proto::control::{
    Delta, Execution, ExecutionClosed, Plugin, PluginVersion, RegistryEvent, Reinstatement,
    ReplicaStatus, Revocation, delta::Change as DeltaChange,
};
use prost::Message;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, Row};
use tokio::sync::Mutex;

/// A store operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or answered with an error.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The schema could not be brought up to date.
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The change does not apply to the current state (the message says why).
    #[error("{0}")]
    Conflict(String),
    /// A stored row cannot be decoded (a damaged or foreign database).
    #[error("stored change at revision {revision} cannot be decoded: {reason}")]
    Corrupt {
        /// The revision.
        revision: i64,
        /// Why.
        reason: String,
    },
}

/// Which database is behind the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

/// A change to apply, before it has a revision.
#[derive(Clone, Debug)]
pub enum Change {
    /// Revoke a workload (or pattern).
    Revoke(Revocation),
    /// Lift a revocation.
    Reinstate(Reinstatement),
    /// Open an execution.
    Open(Execution),
    /// Close an open execution.
    Close(ExecutionClosed),
    /// Change the plugin registry (checked against the stored state in the same
    /// transaction: `crate::registry`).
    Registry(Box<RegistryOp>),
}

/// A plugin registry change, before it is checked against the store.
#[derive(Clone, Debug)]
pub enum RegistryOp {
    /// Add a version (and the plugin, when `plugin.uid` is not stored yet).
    Register {
        /// The plugin (its stored row wins when it exists).
        plugin: Box<Plugin>,
        /// The verified version, state `registered`.
        version: Box<PluginVersion>,
    },
    /// A reviewer certifies a registered version.
    Certify {
        /// Plugin UUID.
        uid: String,
        /// Version.
        version: String,
        /// The reviewer.
        by: String,
    },
    /// Retire a version (registered or certified).
    Retire {
        /// Plugin UUID.
        uid: String,
        /// Version.
        version: String,
        /// Who.
        by: String,
        /// Why.
        reason: String,
    },
    /// Add (`bind: true`) or remove a clause binding of a version.
    Bind {
        /// Plugin UUID.
        uid: String,
        /// Version.
        version: String,
        /// The clause.
        clause: String,
        /// Add or remove.
        bind: bool,
    },
    /// Add verified versions from a bundle, all or none.
    Import {
        /// Plugins (new ones are created; a stored one must have the same publisher).
        plugins: Vec<Plugin>,
        /// Versions, state `registered`.
        versions: Vec<PluginVersion>,
    },
}

impl RegistryOp {
    fn subject(&self) -> &str {
        match self {
            Self::Register { plugin, .. } => &plugin.uid,
            Self::Certify { uid, .. } | Self::Retire { uid, .. } | Self::Bind { uid, .. } => uid,
            Self::Import { .. } => "import",
        }
    }
}

impl Change {
    fn kind(&self) -> &'static str {
        match self {
            Self::Revoke(_) => "revoke",
            Self::Reinstate(_) => "reinstate",
            Self::Open(_) => "open",
            Self::Close(_) => "close",
            Self::Registry(_) => "registry",
        }
    }

    fn subject(&self) -> &str {
        match self {
            Self::Revoke(r) => &r.subject,
            Self::Reinstate(r) => &r.subject,
            Self::Open(e) => &e.id,
            Self::Close(c) => &c.id,
            Self::Registry(op) => op.subject(),
        }
    }

    fn into_delta(self, revision: u64, registry: Option<RegistryEvent>) -> Delta {
        let change = match self {
            Self::Revoke(r) => DeltaChange::Revoke(r),
            Self::Reinstate(r) => DeltaChange::Reinstate(r),
            Self::Open(e) => DeltaChange::Open(e),
            Self::Close(c) => DeltaChange::Close(c),
            Self::Registry(_) => DeltaChange::Registry(registry.unwrap_or_default()),
        };
        Delta {
            revision,
            change: Some(change),
        }
    }
}

/// A stored execution with its lifecycle.
#[derive(Clone, Debug)]
pub struct StoredExecution {
    /// The execution.
    pub execution: Execution,
    /// The revision that opened it.
    pub opened_revision: u64,
    /// The revision that closed it (0 while open).
    pub closed_revision: u64,
    /// Why it closed.
    pub close_reason: String,
}

/// A signal as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredSignal {
    /// Gateway-assigned id.
    pub id: String,
    /// The SPIFFE ID of the sidecar that sent it (from its certificate).
    pub reporter: String,
    /// The workload it is about.
    pub workload: String,
    /// Its kind.
    pub kind: String,
    /// `peer` or `self`.
    pub observed_as: String,
    /// Detector score.
    pub score: f64,
    /// JSON evidence.
    pub evidence: String,
    /// When the detector fired (unix ms).
    pub time_ms: i64,
    /// When the gateway stored it (unix ms).
    pub received_ms: i64,
    /// The revocation policy's action (`revoke`, `alert`, `ignore`), or empty.
    pub action: String,
    /// The policy's reasons, as a JSON array.
    pub reasons: String,
    /// The decision ids the signal cites, as a JSON array.
    pub decision_ids: String,
    /// What the gateway verified, as a JSON object (`{}` until judged).
    pub verification: String,
}

/// What a stored execution record says about who talked to whom, and when: the facts a
/// signal's evidence is checked against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordFacts {
    /// The record's decision id.
    pub decision_id: String,
    /// The client's SPIFFE ID.
    pub source: String,
    /// The server's SPIFFE ID.
    pub destination: String,
    /// When the request arrived (unix ms).
    pub time_ms: i64,
}

/// What a batch of records did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecordsStored {
    /// Lines newly stored or already present (idempotent re-sends).
    pub stored: u64,
    /// Lines refused.
    pub refused: u64,
    /// The first refusal's reason.
    pub refusal: String,
    /// Lines newly stored (not already present), by the minute of their record's own
    /// time (unix ms of the minute's start): the console's request rates.
    pub new_by_minute: std::collections::BTreeMap<u64, u64>,
}

/// A workload's fleet baseline as stored (per second while active).
#[derive(Clone, Debug, PartialEq)]
pub struct StoredBaseline {
    /// The workload's SPIFFE ID.
    pub workload: String,
    /// Requests per second (short window).
    pub rate_per_s: f64,
    /// Egress bytes per second (short window).
    pub bytes_per_s: f64,
    /// Requests per second (long window).
    pub long_rate_per_s: f64,
    /// Egress bytes per second (long window).
    pub long_bytes_per_s: f64,
    /// Reports merged into it.
    pub reports: i64,
    /// When it last changed (gateway clock, unix ms).
    pub updated_ms: i64,
}

/// The database.
#[derive(Debug)]
pub struct Store {
    pub(crate) pool: AnyPool,
    backend: Backend,
    /// One writer per process: SQLite allows one anyway, and it keeps this replica's
    /// own changes from racing each other for a revision.
    writer: Mutex<()>,
}

/// The PostgreSQL channel every commit notifies, so replicas catch up at once.
pub const NOTIFY_CHANNEL: &str = "nexus_changes";

/// Largest number of changes read in one catch-up query.
pub const CATCH_UP_BATCH: i64 = 1000;

fn migrator() -> Migrator {
    Migrator {
        migrations: Cow::Owned(vec![
            Migration::new(
                1,
                Cow::Borrowed("state"),
                MigrationType::Simple,
                Cow::Borrowed(include_str!("../migrations/0001_state.sql")),
                false,
            ),
            Migration::new(
                2,
                Cow::Borrowed("replicas"),
                MigrationType::Simple,
                Cow::Borrowed(include_str!("../migrations/0002_replicas.sql")),
                false,
            ),
            Migration::new(
                3,
                Cow::Borrowed("evidence"),
                MigrationType::Simple,
                Cow::Borrowed(include_str!("../migrations/0003_evidence.sql")),
                false,
            ),
            Migration::new(
                4,
                Cow::Borrowed("baselines"),
                MigrationType::Simple,
                Cow::Borrowed(include_str!("../migrations/0004_baselines.sql")),
                false,
            ),
            Migration::new(
                5,
                Cow::Borrowed("registry"),
                MigrationType::Simple,
                Cow::Borrowed(include_str!("../migrations/0005_registry.sql")),
                false,
            ),
        ]),
        ignore_missing: false,
        locking: true,
        no_tx: false,
    }
}

fn signal_row(row: &sqlx::any::AnyRow) -> Result<StoredSignal, StoreError> {
    Ok(StoredSignal {
        id: row.try_get(0)?,
        reporter: row.try_get(1)?,
        workload: row.try_get(2)?,
        kind: row.try_get(3)?,
        observed_as: row.try_get(4)?,
        score: row.try_get(5)?,
        evidence: row.try_get(6)?,
        time_ms: row.try_get(7)?,
        received_ms: row.try_get(8)?,
        action: row.try_get(9)?,
        reasons: row.try_get(10)?,
        decision_ids: row.try_get(11)?,
        verification: row.try_get(12)?,
    })
}

fn baseline_row(row: &sqlx::any::AnyRow) -> Result<StoredBaseline, StoreError> {
    Ok(StoredBaseline {
        workload: row.try_get(0)?,
        rate_per_s: row.try_get(1)?,
        bytes_per_s: row.try_get(2)?,
        long_rate_per_s: row.try_get(3)?,
        long_bytes_per_s: row.try_get(4)?,
        reports: row.try_get(5)?,
        updated_ms: row.try_get(6)?,
    })
}

fn now_ms() -> i64 {
    to_i64(crate::changes::unix_ms())
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Whether an error is a primary-key clash (another replica took the revision), or
/// SQLite's SQLITE_BUSY / SQLITE_BUSY_SNAPSHOT (a deferred transaction that read before
/// another connection, e.g. a record batch, wrote): both are retried.
fn is_unique_violation(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => {
            db.is_unique_violation() || matches!(db.code().as_deref(), Some("5" | "517"))
        }
        _ => false,
    }
}

impl Store {
    /// Connects, applies migrations and returns the store. `url` is `sqlite://PATH`
    /// (created if missing) or `postgres://…`.
    pub async fn open(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            Backend::Sqlite
        };
        let url = match backend {
            Backend::Sqlite if !url.contains('?') => format!("{url}?mode=rwc"),
            _ => url.to_string(),
        };
        let mut options = AnyPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(Duration::from_secs(10));
        if backend == Backend::Sqlite {
            options = options.after_connect(|conn, _meta| {
                Box::pin(async move {
                    use sqlx::Executor;
                    conn.execute("PRAGMA journal_mode = WAL").await?;
                    conn.execute("PRAGMA synchronous = FULL").await?;
                    conn.execute("PRAGMA busy_timeout = 5000").await?;
                    Ok(())
                })
            });
        }
        let pool = options.connect(&url).await?;
        migrator().run(&pool).await?;
        Ok(Self {
            pool,
            backend,
            writer: Mutex::new(()),
        })
    }

    /// Begins a transaction that will write. On SQLite it takes the write lock at once
    /// (`BEGIN IMMEDIATE`), waiting up to the busy timeout for another writer: a deferred
    /// transaction that reads first and writes later fails at once with "database is
    /// locked" (SQLITE_BUSY_SNAPSHOT, which no busy timeout waits out) when another
    /// connection wrote in between, e.g. records being stored while an operator revokes.
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => self.pool.begin().await,
        }
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The highest stored revision (0 when empty).
    pub async fn revision(&self) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT COALESCE(MAX(revision), 0) FROM changes")
            .fetch_one(&self.pool)
            .await?;
        Ok(to_u64(row.try_get::<i64, _>(0)?))
    }

    /// Applies `change` and gives it the next revision, atomically. Returns the delta
    /// as sidecars will receive it. Refuses a change that does not apply (reinstating
    /// what is not revoked, closing what is not open, reusing an execution id).
    pub async fn commit(&self, change: Change, actor: &str) -> Result<Delta, StoreError> {
        let _writer = self.writer.lock().await;
        // Bounded retries against other replicas taking the same revision.
        let mut last = None;
        for _ in 0..20 {
            match self.try_commit(&change, actor).await {
                Ok(delta) => return Ok(delta),
                Err(StoreError::Database(e)) if is_unique_violation(&e) => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Database(
            last.unwrap_or(sqlx::Error::PoolTimedOut),
        ))
    }

    async fn try_commit(&self, change: &Change, actor: &str) -> Result<Delta, StoreError> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query("SELECT COALESCE(MAX(revision), 0) FROM changes")
            .fetch_one(&mut *tx)
            .await?;
        let revision = row.try_get::<i64, _>(0)? + 1;
        let at = now_ms();
        let mut closed_plugin: Option<String> = None;
        let mut registry_event = None;
        match change {
            Change::Revoke(r) => {
                sqlx::query(
                    "INSERT INTO revocations (subject, reason, actor, at_ms, expires_ms, revision) \
                     VALUES ($1, $2, $3, $4, $5, $6) \
                     ON CONFLICT (subject) DO UPDATE SET reason = excluded.reason, actor = excluded.actor, \
                     at_ms = excluded.at_ms, expires_ms = excluded.expires_ms, revision = excluded.revision",
                )
                .bind(&r.subject)
                .bind(&r.reason)
                .bind(&r.by)
                .bind(to_i64(r.at_unix_ms))
                .bind(to_i64(r.expires_unix_ms))
                .bind(revision)
                .execute(&mut *tx)
                .await?;
            }
            Change::Reinstate(r) => {
                let done = sqlx::query("DELETE FROM revocations WHERE subject = $1")
                    .bind(&r.subject)
                    .execute(&mut *tx)
                    .await?;
                if done.rows_affected() == 0 {
                    return Err(StoreError::Conflict(format!(
                        "{} is not revoked",
                        r.subject
                    )));
                }
            }
            Change::Open(e) => {
                let exists = sqlx::query("SELECT COUNT(*) FROM executions WHERE id = $1")
                    .bind(&e.id)
                    .fetch_one(&mut *tx)
                    .await?
                    .try_get::<i64, _>(0)?;
                if exists > 0 {
                    return Err(StoreError::Conflict(format!(
                        "execution {} already exists",
                        e.id
                    )));
                }
                if !e.plugin_uid.is_empty() {
                    // Checked in the transaction that opens it: a retire committed
                    // first wins, and no execution opens for a version it retired.
                    crate::registry::check_runnable(&mut tx, e).await?;
                }
                sqlx::query(
                    "INSERT INTO executions (id, plugin, clause, not_after_ms, opened_by, opened_revision, closed_revision, close_reason, plugin_uid, plugin_version, image_digest) \
                     VALUES ($1, $2, $3, $4, $5, $6, 0, '', $7, $8, $9)",
                )
                .bind(&e.id)
                .bind(&e.plugin)
                .bind(&e.clause)
                .bind(to_i64(e.not_after_unix_ms))
                .bind(&e.opened_by)
                .bind(revision)
                .bind(&e.plugin_uid)
                .bind(&e.plugin_version)
                .bind(&e.image_digest)
                .execute(&mut *tx)
                .await?;
            }
            Change::Close(c) => {
                // The plugin goes into the delta, so the gateway can send the close only
                // to the streams that were sent the open (control::Scope).
                let plugin = sqlx::query(
                    "SELECT plugin FROM executions WHERE id = $1 AND closed_revision = 0",
                )
                .bind(&c.id)
                .fetch_optional(&mut *tx)
                .await?
                .map(|row| row.try_get::<String, _>(0))
                .transpose()?;
                closed_plugin = plugin;
                let done = sqlx::query(
                    "UPDATE executions SET closed_revision = $1, close_reason = $2 \
                     WHERE id = $3 AND closed_revision = 0",
                )
                .bind(revision)
                .bind(&c.reason)
                .bind(&c.id)
                .execute(&mut *tx)
                .await?;
                if done.rows_affected() == 0 {
                    return Err(StoreError::Conflict(format!(
                        "execution {} is not open",
                        c.id
                    )));
                }
            }
            Change::Registry(op) => {
                registry_event = Some(crate::registry::apply(&mut tx, op, revision, at).await?);
            }
        }
        let mut change = change.clone();
        if let (Change::Close(c), Some(plugin)) = (&mut change, closed_plugin) {
            c.plugin = plugin;
        }
        let delta = change.clone().into_delta(to_u64(revision), registry_event);
        sqlx::query(
            "INSERT INTO changes (revision, kind, subject, actor, at_ms, body) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(revision)
        .bind(change.kind())
        .bind(change.subject())
        .bind(actor)
        .bind(at)
        .bind(data_encoding::BASE64.encode(&delta.encode_to_vec()))
        .execute(&mut *tx)
        .await?;
        if self.backend == Backend::Postgres {
            // Other replicas LISTEN: delivered when (and only if) this commits.
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(NOTIFY_CHANNEL)
                .bind(revision.to_string())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(delta)
    }

    /// Changes after `revision`, in order (at most [`CATCH_UP_BATCH`]).
    pub async fn changes_after(&self, revision: u64) -> Result<Vec<Delta>, StoreError> {
        let rows = sqlx::query(
            "SELECT revision, body FROM changes WHERE revision > $1 ORDER BY revision LIMIT $2",
        )
        .bind(to_i64(revision))
        .bind(CATCH_UP_BATCH)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode_change).collect()
    }

    /// Every reinstatement in the change log, oldest first.
    pub async fn reinstatements(&self) -> Result<Vec<Reinstatement>, StoreError> {
        let rows = sqlx::query(
            "SELECT revision, body FROM changes WHERE kind = 'reinstate' ORDER BY revision",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            if let Some(DeltaChange::Reinstate(r)) = decode_change(row)?.change {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// The current revocations.
    pub async fn revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        let rows = sqlx::query(
            "SELECT subject, reason, actor, at_ms, expires_ms FROM revocations ORDER BY subject",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Revocation {
                    subject: row.try_get(0)?,
                    reason: row.try_get(1)?,
                    by: row.try_get(2)?,
                    at_unix_ms: to_u64(row.try_get(3)?),
                    expires_unix_ms: to_u64(row.try_get(4)?),
                })
            })
            .collect()
    }

    /// Executions, open ones only unless `include_closed`.
    pub async fn executions(
        &self,
        include_closed: bool,
    ) -> Result<Vec<StoredExecution>, StoreError> {
        let sql = if include_closed {
            "SELECT id, plugin, clause, not_after_ms, opened_by, opened_revision, closed_revision, close_reason, plugin_uid, plugin_version, image_digest FROM executions ORDER BY opened_revision"
        } else {
            "SELECT id, plugin, clause, not_after_ms, opened_by, opened_revision, closed_revision, close_reason, plugin_uid, plugin_version, image_digest FROM executions WHERE closed_revision = 0 ORDER BY opened_revision"
        };
        let rows = sqlx::query(sql).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| {
                Ok(StoredExecution {
                    execution: Execution {
                        id: row.try_get(0)?,
                        plugin: row.try_get(1)?,
                        clause: row.try_get(2)?,
                        not_after_unix_ms: to_u64(row.try_get(3)?),
                        opened_by: row.try_get(4)?,
                        plugin_uid: row.try_get(8)?,
                        plugin_version: row.try_get(9)?,
                        image_digest: row.try_get(10)?,
                    },
                    opened_revision: to_u64(row.try_get(5)?),
                    closed_revision: to_u64(row.try_get(6)?),
                    close_reason: row.try_get(7)?,
                })
            })
            .collect()
    }

    /// Stores a signal.
    pub async fn insert_signal(&self, s: &StoredSignal) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO signals (id, reporter, workload, kind, observed_as, score, evidence, time_ms, received_ms, action, reasons, decision_ids, verification) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&s.id)
        .bind(&s.reporter)
        .bind(&s.workload)
        .bind(&s.kind)
        .bind(&s.observed_as)
        .bind(s.score)
        .bind(&s.evidence)
        .bind(s.time_ms)
        .bind(s.received_ms)
        .bind(&s.action)
        .bind(&s.reasons)
        .bind(&s.decision_ids)
        .bind(&s.verification)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records what was verified about a stored signal and the revocation policy's
    /// decision on it.
    pub async fn set_signal_decision(
        &self,
        id: &str,
        action: &str,
        reasons: &str,
        verification: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE signals SET action = $1, reasons = $2, verification = $3 WHERE id = $4",
        )
        .bind(action)
        .bind(reasons)
        .bind(verification)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The records `sidecar` shipped whose decision id is among `ids` (what a signal
    /// from that sidecar cites).
    pub async fn evidence(
        &self,
        sidecar: &str,
        ids: &[String],
    ) -> Result<Vec<RecordFacts>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let placeholders: Vec<String> = (0..ids.len()).map(|i| format!("${}", i + 2)).collect();
        let sql = format!(
            "SELECT decision_id, source, destination, time_ms FROM records \
             WHERE sidecar = $1 AND decision_id IN ({})",
            placeholders.join(", ")
        );
        let mut query = sqlx::query(&sql).bind(sidecar);
        for id in ids {
            query = query.bind(id.as_str());
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| {
                Ok(RecordFacts {
                    decision_id: row.try_get(0)?,
                    source: row.try_get(1)?,
                    destination: row.try_get(2)?,
                    time_ms: row.try_get(3)?,
                })
            })
            .collect()
    }

    /// Signals received since `since_ms`, newest first, optionally about one workload.
    pub async fn signals(
        &self,
        workload: Option<&str>,
        since_ms: i64,
        limit: i64,
    ) -> Result<Vec<StoredSignal>, StoreError> {
        let base = "SELECT id, reporter, workload, kind, observed_as, score, evidence, time_ms, received_ms, action, reasons, decision_ids, verification FROM signals";
        let rows = match workload {
            Some(w) => {
                sqlx::query(&format!(
                    "{base} WHERE workload = $1 AND received_ms >= $2 ORDER BY received_ms DESC, id DESC LIMIT $3"
                ))
                .bind(w)
                .bind(since_ms)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!(
                    "{base} WHERE received_ms >= $1 ORDER BY received_ms DESC, id DESC LIMIT $2"
                ))
                .bind(since_ms)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter().map(signal_row).collect()
    }

    /// The fleet baseline of `workload`, if there is one.
    pub async fn baseline(&self, workload: &str) -> Result<Option<StoredBaseline>, StoreError> {
        let row = sqlx::query(
            "SELECT workload, rate_per_s, bytes_per_s, long_rate_per_s, long_bytes_per_s, reports, updated_ms \
             FROM baselines WHERE workload = $1",
        )
        .bind(workload)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(baseline_row).transpose()
    }

    /// Up to `limit` fleet baselines, the most recently updated first.
    pub async fn baselines(&self, limit: i64) -> Result<Vec<StoredBaseline>, StoreError> {
        let rows = sqlx::query(
            "SELECT workload, rate_per_s, bytes_per_s, long_rate_per_s, long_bytes_per_s, reports, updated_ms \
             FROM baselines ORDER BY updated_ms DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(baseline_row).collect()
    }

    /// Writes a fleet baseline (insert or replace).
    pub async fn put_baseline(&self, b: &StoredBaseline) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO baselines (workload, rate_per_s, bytes_per_s, long_rate_per_s, long_bytes_per_s, reports, updated_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (workload) DO UPDATE SET \
             rate_per_s = excluded.rate_per_s, bytes_per_s = excluded.bytes_per_s, \
             long_rate_per_s = excluded.long_rate_per_s, long_bytes_per_s = excluded.long_bytes_per_s, \
             reports = excluded.reports, updated_ms = excluded.updated_ms",
        )
        .bind(&b.workload)
        .bind(b.rate_per_s)
        .bind(b.bytes_per_s)
        .bind(b.long_rate_per_s)
        .bind(b.long_bytes_per_s)
        .bind(b.reports)
        .bind(b.updated_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The stored records of `sidecar` with these decision ids, as (decision id, line).
    pub async fn record_lines(
        &self,
        sidecar: &str,
        ids: &[String],
    ) -> Result<Vec<(String, String)>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let placeholders: Vec<String> = (0..ids.len()).map(|i| format!("${}", i + 2)).collect();
        let sql = format!(
            "SELECT decision_id, line FROM records WHERE sidecar = $1 AND decision_id IN ({})",
            placeholders.join(", ")
        );
        let mut query = sqlx::query(&sql).bind(sidecar);
        for id in ids {
            query = query.bind(id.as_str());
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect()
    }

    /// One stored signal by id.
    pub async fn signal(&self, id: &str) -> Result<Option<StoredSignal>, StoreError> {
        let row = sqlx::query(
            "SELECT id, reporter, workload, kind, observed_as, score, evidence, time_ms, received_ms, action, reasons, decision_ids, verification FROM signals WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(signal_row).transpose()
    }

    /// Stores a batch of execution-record lines from `sidecar` in one transaction.
    /// Each line must parse and carry a valid hash; a line already stored counts as
    /// stored (a sidecar re-sends after a lost acknowledgement).
    pub async fn insert_records(
        &self,
        sidecar: &str,
        lines: &[String],
    ) -> Result<RecordsStored, StoreError> {
        let mut out = RecordsStored::default();
        let mut tx = self.begin_write().await?;
        let at = now_ms();
        for line in lines {
            let record = match nexus_audit::ExecutionRecord::from_line(line.as_bytes()) {
                Ok(record) if record.hash_is_valid() => record,
                Ok(_) => {
                    out.refused += 1;
                    if out.refusal.is_empty() {
                        out.refusal = "a record's hash does not match its content".into();
                    }
                    continue;
                }
                Err(e) => {
                    out.refused += 1;
                    if out.refusal.is_empty() {
                        out.refusal = format!("not an execution record: {e}");
                    }
                    continue;
                }
            };
            let time_ms = time::OffsetDateTime::parse(
                &record.time,
                &time::format_description::well_known::Rfc3339,
            )
            .map(|t| i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0))
            .unwrap_or(0);
            let inserted = sqlx::query(
                "INSERT INTO records (hash, sidecar, line, stored_ms, decision_id, source, destination, time_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (hash) DO NOTHING",
            )
            .bind(&record.hash)
            .bind(sidecar)
            .bind(line.as_str())
            .bind(at)
            .bind(&record.decision_id)
            .bind(&record.source)
            .bind(&record.destination)
            .bind(time_ms)
            .execute(&mut *tx)
            .await?;
            out.stored += 1;
            if inserted.rows_affected() > 0 && time_ms > 0 {
                let minute = u64::try_from(time_ms).unwrap_or(0) / 60_000 * 60_000;
                *out.new_by_minute.entry(minute).or_default() += 1;
            }
        }
        tx.commit().await?;
        Ok(out)
    }

    /// The stored records of execution `id` (the raw lines), at most `limit` + 1.
    /// `id` holds only `[A-Za-z0-9._:-]` (checked by the caller), so the pattern needs no
    /// escaping beyond LIKE's own wildcards, which such an id cannot hold but `_`.
    pub async fn records_of_execution(
        &self,
        id: &str,
        limit: i64,
    ) -> Result<Vec<String>, StoreError> {
        let pattern = format!(
            "%\"execution_id\":\"{}\"%",
            id.replace('\\', "\\\\")
                .replace('_', "\\_")
                .replace('%', "\\%")
        );
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT line FROM records WHERE line LIKE $1 ESCAPE '\\' ORDER BY sidecar, time_ms LIMIT $2",
        )
        .bind(pattern)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(l,)| l).collect())
    }

    /// Writes this replica's status row (`instance` is unique per process) and deletes
    /// the rows of replicas silent since before `prune_before_ms` (killed ones).
    pub async fn report_replica(
        &self,
        instance: &str,
        status: &ReplicaStatus,
        prune_before_ms: u64,
    ) -> Result<(), StoreError> {
        let body = data_encoding::BASE64.encode(&status.encode_to_vec());
        sqlx::query(
            "INSERT INTO replicas (instance, name, reported_ms, body) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (instance) DO UPDATE SET name = excluded.name, \
             reported_ms = excluded.reported_ms, body = excluded.body",
        )
        .bind(instance)
        .bind(status.gateway.as_str())
        .bind(to_i64(status.reported_unix_ms))
        .bind(body)
        .execute(&self.pool)
        .await?;
        sqlx::query("DELETE FROM replicas WHERE reported_ms < $1")
            .bind(to_i64(prune_before_ms))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Deletes this replica's status row (a clean stop).
    pub async fn remove_replica(&self, instance: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM replicas WHERE instance = $1")
            .bind(instance)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The status rows reported at or after `since_ms`, other than `except` (this
    /// replica, whose live view the caller has), by instance. A row that does not
    /// decode (another version's) is skipped with a warning.
    pub async fn replicas(
        &self,
        since_ms: u64,
        except: &str,
    ) -> Result<Vec<ReplicaStatus>, StoreError> {
        let rows = sqlx::query(
            "SELECT instance, body FROM replicas WHERE reported_ms >= $1 AND instance <> $2 \
             ORDER BY name, instance",
        )
        .bind(to_i64(since_ms))
        .bind(except)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let instance: String = row.try_get(0)?;
            let body: String = row.try_get(1)?;
            let decoded = data_encoding::BASE64
                .decode(body.as_bytes())
                .map_err(|e| e.to_string())
                .and_then(|b| ReplicaStatus::decode(b.as_slice()).map_err(|e| e.to_string()));
            match decoded {
                Ok(status) => out.push(status),
                Err(error) => {
                    tracing::warn!(%instance, %error, "skipping a replica status row that does not decode")
                }
            }
        }
        Ok(out)
    }

    /// Number of stored records (for status and tests).
    pub async fn record_count(&self) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) FROM records")
            .fetch_one(&self.pool)
            .await?;
        Ok(to_u64(row.try_get::<i64, _>(0)?))
    }
}

fn decode_change(row: &AnyRow) -> Result<Delta, StoreError> {
    let revision: i64 = row.try_get(0)?;
    let body: String = row.try_get(1)?;
    let corrupt = |reason: String| StoreError::Corrupt { revision, reason };
    let bytes = data_encoding::BASE64
        .decode(body.as_bytes())
        .map_err(|e| corrupt(e.to_string()))?;
    let delta = Delta::decode(bytes.as_slice()).map_err(|e| corrupt(e.to_string()))?;
    if delta.revision != to_u64(revision) {
        return Err(corrupt(format!("body says revision {}", delta.revision)));
    }
    Ok(delta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn changes_get_dense_revisions_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("g.db").display());
        let store = Store::open(&url, 2).await.unwrap();
        assert_eq!(store.revision().await.unwrap(), 0);
        let revoke = Revocation {
            subject: "spiffe://td/a".into(),
            reason: "test".into(),
            by: "spiffe://td/op".into(),
            at_unix_ms: 1,
            expires_unix_ms: 0,
        };
        let d1 = store.commit(Change::Revoke(revoke), "op").await.unwrap();
        assert_eq!(d1.revision, 1);
        let err = store
            .commit(
                Change::Reinstate(Reinstatement {
                    subject: "spiffe://td/b".into(),
                    by: "op".into(),
                    at_unix_ms: 2,
                }),
                "op",
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("is not revoked"), "{err}");
        let ex = Execution {
            id: "ex-1".into(),
            plugin: "spiffe://td/p".into(),
            clause: "c1".into(),
            not_after_unix_ms: 5,
            opened_by: "op".into(),
            ..Execution::default()
        };
        assert_eq!(
            store
                .commit(Change::Open(ex.clone()), "op")
                .await
                .unwrap()
                .revision,
            2
        );
        assert!(store.commit(Change::Open(ex), "op").await.is_err());
        drop(store);
        let store = Store::open(&url, 2).await.unwrap();
        assert_eq!(store.revision().await.unwrap(), 2);
        let changes = store.changes_after(0).await.unwrap();
        assert_eq!(changes.len(), 2);
        assert!(matches!(changes[0].change, Some(DeltaChange::Revoke(_))));
        assert_eq!(store.revocations().await.unwrap().len(), 1);
        assert_eq!(store.executions(false).await.unwrap().len(), 1);
    }

    /// Two writers on one SQLite file, each committing while the other does: every
    /// commit lands (none fails with "database is locked") and revisions stay dense.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_on_sqlite_wait_instead_of_failing() {
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("g.db").display());
        let a = Arc::new(Store::open(&url, 4).await.unwrap());
        let b = Arc::new(Store::open(&url, 4).await.unwrap());
        let writer = |store: Arc<Store>, name: &'static str| {
            tokio::spawn(async move {
                for i in 0..40 {
                    let revoke = Revocation {
                        subject: format!("spiffe://td/{name}-{i}"),
                        reason: "test".into(),
                        by: "spiffe://td/op".into(),
                        at_unix_ms: 1,
                        expires_unix_ms: 0,
                    };
                    store
                        .commit(Change::Revoke(revoke), "op")
                        .await
                        .unwrap_or_else(|e| panic!("{name} commit {i}: {e}"));
                }
            })
        };
        let (ra, rb) = tokio::join!(writer(a.clone(), "a"), writer(b, "b"));
        ra.unwrap();
        rb.unwrap();
        assert_eq!(a.revision().await.unwrap(), 80);
        assert_eq!(a.changes_after(0).await.unwrap().len(), 80);
    }

    #[tokio::test]
    async fn replica_rows_are_upserted_listed_and_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("g.db").display());
        let store = Store::open(&url, 2).await.unwrap();
        let row = |name: &str, revision: u64, at: u64| ReplicaStatus {
            gateway: name.into(),
            revision,
            reported_unix_ms: at,
            ..Default::default()
        };
        store
            .report_replica("a-1", &row("a", 1, 1000), 0)
            .await
            .unwrap();
        store
            .report_replica("b-1", &row("b", 1, 1000), 0)
            .await
            .unwrap();
        // The same instance again: one row, updated.
        store
            .report_replica("b-1", &row("b", 2, 2000), 0)
            .await
            .unwrap();
        let others = store.replicas(0, "a-1").await.unwrap();
        assert_eq!(others.len(), 1);
        assert_eq!((others[0].gateway.as_str(), others[0].revision), ("b", 2));
        // Fresh only: a-1 reported at 1000 is older than 1500.
        assert!(store.replicas(1500, "b-1").await.unwrap().is_empty());
        // A report prunes rows silent since before the bound; removal deletes one.
        store
            .report_replica("c-1", &row("c", 2, 3000), 1500)
            .await
            .unwrap();
        let all = store.replicas(0, "").await.unwrap();
        let names: Vec<_> = all.iter().map(|r| r.gateway.as_str()).collect();
        assert_eq!(names, ["b", "c"]);
        store.remove_replica("c-1").await.unwrap();
        assert_eq!(store.replicas(0, "").await.unwrap().len(), 1);
    }
}
