//! Wrapping keys: one per scope and epoch, outside the event log (ADR 0013). A scope's key
//! versions and its children's wrapping keys are wrapped under its current epoch; an
//! organization's is wrapped by the master key. Re-keying a scope adds an epoch, re-wraps
//! what the old one wrapped, and destroys it; `destroy_at_rest` then removes the destroyed
//! bytes from the database's files.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use crate::db::Db;
use crate::error::StoreError;
use crate::time::now_micros;
use crate::{with_read_pool, with_write_pool};

/// One wrapped wrapping key.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappingKeyRow {
    pub scope_id: String,
    pub epoch: u32,
    pub fingerprint: String,
    pub wrapped: Vec<u8>,
    /// The wrapping key this one is wrapped under (none for organizations).
    pub parent: Option<(String, u32)>,
    /// What wraps an organization's wrapping key: the local master key's fingerprint, or the
    /// customer key's `provider:key_id`.
    pub master_fingerprint: Option<String>,
    /// The revoked scope whose re-key created this epoch.
    pub rekey_of: Option<String>,
}

impl std::fmt::Debug for WrappingKeyRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WrappingKeyRow")
            .field("scope_id", &self.scope_id)
            .field("epoch", &self.epoch)
            .field("fingerprint", &self.fingerprint)
            .field("parent", &self.parent)
            .finish_non_exhaustive()
    }
}

/// Something wrapped under a scope's wrapping key: one of the scope's key versions, or a
/// child's wrapping key.
#[derive(Clone, PartialEq, Eq)]
pub enum Wrapped {
    KeyVersion {
        scope_id: String,
        version: u32,
        fingerprint: String,
        wrapped: Vec<u8>,
        epoch: u32,
    },
    WrappingKey {
        scope_id: String,
        epoch: u32,
        wrapped: Vec<u8>,
        parent_epoch: u32,
    },
}

impl std::fmt::Debug for Wrapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Wrapped::KeyVersion {
                scope_id, version, ..
            } => write!(f, "KeyVersion({scope_id} v{version})"),
            Wrapped::WrappingKey {
                scope_id, epoch, ..
            } => write!(f, "WrappingKey({scope_id} e{epoch})"),
        }
    }
}

type WrappingTuple = (
    String,
    i64,
    String,
    String,
    Option<String>,
    Option<i64>,
    Option<String>,
    Option<String>,
);

/// A key version under a wrapping key: scope, version, fingerprint, wrapped, epoch.
type VersionUnder = (String, i64, String, String, i64);
/// A child's wrapping key: scope, epoch, wrapped, parent epoch.
type ChildUnder = (String, i64, String, i64);

const WRAPPING_COLUMNS: &str =
    "scope_id, epoch, fingerprint, wrapped, parent_id, parent_epoch, master_fingerprint, rekey_of";

fn wrapping_row(row: WrappingTuple) -> Option<WrappingKeyRow> {
    let (scope_id, epoch, fingerprint, wrapped, parent_id, parent_epoch, master, rekey_of) = row;
    Some(WrappingKeyRow {
        scope_id,
        epoch: u32::try_from(epoch).ok()?,
        fingerprint,
        wrapped: STANDARD.decode(wrapped).ok()?,
        parent: match (parent_id, parent_epoch) {
            (Some(id), Some(e)) => Some((id, u32::try_from(e).ok()?)),
            _ => None,
        },
        master_fingerprint: master,
        rekey_of,
    })
}

/// Stores a wrapping key epoch, unless it exists or the platform key named by `$10` (when
/// not empty) was rotated away; shared with `Db::append`.
pub(crate) const INSERT_WRAPPING: &str =
    "INSERT INTO wrapping_keys (scope_id, epoch, fingerprint, wrapped, parent_id, \
    parent_epoch, master_fingerprint, rekey_of, created_at) \
    SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9 WHERE $10 = '' OR EXISTS \
    (SELECT 1 FROM master_keys WHERE provider = 'local' AND fingerprint = $10) \
    ON CONFLICT DO NOTHING";

impl Db {
    /// Stores a wrapping key. Returns false when the scope already has that epoch (another
    /// instance made it first).
    ///
    /// With `platform_key` (the fingerprint of the platform master key that wraps or seals
    /// the row), the row is stored only while that key is still the database's (not rotated
    /// away meanwhile by `ekm master-key rotate`, which would leave it unopenable).
    pub async fn insert_wrapping_key(
        &self,
        row: &WrappingKeyRow,
        platform_key: Option<&str>,
    ) -> Result<bool, StoreError> {
        let sql = INSERT_WRAPPING;
        let done = with_write_pool!(self, pool => {
            sqlx::query(sql)
                .bind(&row.scope_id)
                .bind(i64::from(row.epoch))
                .bind(&row.fingerprint)
                .bind(STANDARD.encode(&row.wrapped))
                .bind(row.parent.as_ref().map(|(id, _)| id.clone()))
                .bind(row.parent.as_ref().map(|(_, e)| i64::from(*e)))
                .bind(&row.master_fingerprint)
                .bind(&row.rekey_of)
                .bind(now_micros())
                .bind(platform_key.unwrap_or(""))
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(done == 1)
    }

    /// Every epoch of a scope's wrapping key still stored, oldest first.
    pub async fn wrapping_keys(&self, scope_id: &str) -> Result<Vec<WrappingKeyRow>, StoreError> {
        let sql = format!(
            "SELECT {WRAPPING_COLUMNS} FROM wrapping_keys WHERE scope_id = $1 ORDER BY epoch"
        );
        let rows: Vec<WrappingTuple> = with_write_pool!(self, pool => {
            sqlx::query_as(&sql).bind(scope_id).fetch_all(pool).await?
        });
        Ok(rows.into_iter().filter_map(wrapping_row).collect())
    }

    /// One epoch of a scope's wrapping key, if it still exists.
    pub async fn wrapping_key(
        &self,
        scope_id: &str,
        epoch: u32,
    ) -> Result<Option<WrappingKeyRow>, StoreError> {
        let sql = format!(
            "SELECT {WRAPPING_COLUMNS} FROM wrapping_keys WHERE scope_id = $1 AND epoch = $2"
        );
        let row: Option<WrappingTuple> = with_read_pool!(self, pool => {
            sqlx::query_as(&sql).bind(scope_id).bind(i64::from(epoch)).fetch_optional(pool).await?
        });
        Ok(row.and_then(wrapping_row))
    }

    /// Up to `limit` things wrapped under `scope_id`'s wrapping keys older than `keep`
    /// (the epochs a re-key is retiring): the scope's key versions and its children's
    /// wrapping keys. Rows already moved to `keep` are not read again (the index on
    /// `(parent_id, parent_epoch)` is read as a range), so a re-key stays linear.
    pub async fn wrapped_under_other_epochs(
        &self,
        scope_id: &str,
        keep: u32,
        limit: i64,
    ) -> Result<Vec<Wrapped>, StoreError> {
        let versions = "SELECT scope_id, version, fingerprint, wrapped, node_epoch FROM key_material \
                        WHERE scope_id = $1 AND node_epoch IS NOT NULL AND node_epoch < $2 LIMIT $3";
        let children = "SELECT scope_id, epoch, wrapped, parent_epoch FROM wrapping_keys \
                        WHERE parent_id = $1 AND parent_epoch < $2 LIMIT $3";
        let (versions, children): (Vec<VersionUnder>, Vec<ChildUnder>) = with_write_pool!(self, pool => {
            (
                sqlx::query_as(versions).bind(scope_id).bind(i64::from(keep)).bind(limit).fetch_all(pool).await?,
                sqlx::query_as(children).bind(scope_id).bind(i64::from(keep)).bind(limit).fetch_all(pool).await?,
            )
        });
        let mut out = Vec::with_capacity(versions.len() + children.len());
        for (scope_id, version, fingerprint, wrapped, epoch) in versions {
            let (Ok(version), Ok(epoch), Ok(wrapped)) = (
                u32::try_from(version),
                u32::try_from(epoch),
                STANDARD.decode(wrapped),
            ) else {
                return Err(StoreError::MalformedKey { scope_id });
            };
            out.push(Wrapped::KeyVersion {
                scope_id,
                version,
                fingerprint,
                wrapped,
                epoch,
            });
        }
        for (scope_id, epoch, wrapped, parent_epoch) in children {
            let (Ok(epoch), Ok(parent_epoch), Ok(wrapped)) = (
                u32::try_from(epoch),
                u32::try_from(parent_epoch),
                STANDARD.decode(wrapped),
            ) else {
                return Err(StoreError::MalformedKey { scope_id });
            };
            out.push(Wrapped::WrappingKey {
                scope_id,
                epoch,
                wrapped,
                parent_epoch,
            });
        }
        Ok(out)
    }

    /// Replaces the wrapping of re-wrapped items, in one transaction: each is now wrapped
    /// under epoch `to` of its wrapping scope. An item whose wrapping changed meanwhile (or
    /// that was destroyed) is left alone.
    pub async fn apply_rewraps(
        &self,
        items: &[(Wrapped, Vec<u8>)],
        to: u32,
    ) -> Result<(), StoreError> {
        let version_sql = "UPDATE key_material SET wrapped = $1, node_epoch = $2 \
                           WHERE scope_id = $3 AND version = $4 AND fingerprint = $5 AND node_epoch = $6";
        if let Db::Postgres(db) = self {
            // One statement for the children's wrapping keys (the bulk of a re-key).
            let mut ids = vec![];
            let mut epochs = vec![];
            let mut texts = vec![];
            let mut parents = vec![];
            let mut tx = db.pool.begin().await?;
            for (item, wrapped) in items {
                match item {
                    Wrapped::WrappingKey {
                        scope_id,
                        epoch,
                        parent_epoch,
                        ..
                    } => {
                        ids.push(scope_id.clone());
                        epochs.push(i64::from(*epoch));
                        texts.push(STANDARD.encode(wrapped));
                        parents.push(i64::from(*parent_epoch));
                    }
                    Wrapped::KeyVersion {
                        scope_id,
                        version,
                        fingerprint,
                        epoch,
                        ..
                    } => {
                        sqlx::query(version_sql)
                            .bind(STANDARD.encode(wrapped))
                            .bind(i64::from(to))
                            .bind(scope_id)
                            .bind(i64::from(*version))
                            .bind(fingerprint)
                            .bind(i64::from(*epoch))
                            .execute(&mut *tx)
                            .await?;
                    }
                }
            }
            if !ids.is_empty() {
                sqlx::query(
                    "UPDATE wrapping_keys w SET wrapped = v.wrapped, parent_epoch = $5 \
                     FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::bigint[]) \
                     AS v(scope_id, epoch, wrapped, parent_epoch) \
                     WHERE w.scope_id = v.scope_id AND w.epoch = v.epoch \
                     AND w.parent_epoch = v.parent_epoch",
                )
                .bind(&ids)
                .bind(&epochs)
                .bind(&texts)
                .bind(&parents)
                .bind(i64::from(to))
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            return Ok(());
        }
        if let Db::Sqlite(db) = self {
            // SQLite: one UPDATE … FROM (VALUES …) per 500 children (4 parameters a row).
            let mut tx = db.write.begin().await?;
            let children: Vec<(&String, i64, String, i64)> = items
                .iter()
                .filter_map(|(item, wrapped)| match item {
                    Wrapped::WrappingKey {
                        scope_id,
                        epoch,
                        parent_epoch,
                        ..
                    } => Some((
                        scope_id,
                        i64::from(*epoch),
                        STANDARD.encode(wrapped),
                        i64::from(*parent_epoch),
                    )),
                    Wrapped::KeyVersion { .. } => None,
                })
                .collect();
            for chunk in children.chunks(500) {
                let rows: Vec<String> = (0..chunk.len())
                    .map(|i| {
                        format!(
                            "(${}, ${}, ${}, ${})",
                            4 * i + 2,
                            4 * i + 3,
                            4 * i + 4,
                            4 * i + 5
                        )
                    })
                    .collect();
                let sql = format!(
                    "UPDATE wrapping_keys SET wrapped = v.column3, parent_epoch = $1 \
                     FROM (VALUES {}) AS v WHERE wrapping_keys.scope_id = v.column1 \
                     AND wrapping_keys.epoch = v.column2 AND wrapping_keys.parent_epoch = v.column4",
                    rows.join(", ")
                );
                let mut query = sqlx::query(&sql).bind(i64::from(to));
                for (scope_id, epoch, wrapped, parent_epoch) in chunk {
                    query = query
                        .bind(*scope_id)
                        .bind(*epoch)
                        .bind(wrapped)
                        .bind(*parent_epoch);
                }
                query.execute(&mut *tx).await?;
            }
            for (item, wrapped) in items {
                if let Wrapped::KeyVersion {
                    scope_id,
                    version,
                    fingerprint,
                    epoch,
                    ..
                } = item
                {
                    sqlx::query(version_sql)
                        .bind(STANDARD.encode(wrapped))
                        .bind(i64::from(to))
                        .bind(scope_id)
                        .bind(i64::from(*version))
                        .bind(fingerprint)
                        .bind(i64::from(*epoch))
                        .execute(&mut *tx)
                        .await?;
                }
            }
            tx.commit().await?;
        }
        Ok(())
    }

    /// Destroys every epoch of a scope's wrapping key older than `keep`. Refused (returns
    /// false) while anything is still wrapped under one of them.
    pub async fn destroy_other_epochs(
        &self,
        scope_id: &str,
        keep: u32,
    ) -> Result<bool, StoreError> {
        // Check and delete in one transaction: on SQLite the single writer makes it atomic
        // (key versions have no foreign key there); on PostgreSQL the deferred foreign keys
        // refuse the commit if something was wrapped under an old epoch meanwhile.
        let versions = "SELECT 1 FROM key_material WHERE scope_id = $1 AND node_epoch IS NOT NULL \
                        AND node_epoch < $2 LIMIT 1";
        let children =
            "SELECT 1 FROM wrapping_keys WHERE parent_id = $1 AND parent_epoch < $2 LIMIT 1";
        with_write_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            for sql in [versions, children] {
                let found: Option<i32> = sqlx::query_scalar(sql)
                    .bind(scope_id)
                    .bind(i64::from(keep))
                    .fetch_optional(&mut *tx)
                    .await?;
                if found.is_some() {
                    return Ok(false);
                }
            }
            sqlx::query("DELETE FROM wrapping_keys WHERE scope_id = $1 AND epoch < $2")
                .bind(scope_id)
                .bind(i64::from(keep))
                .execute(&mut *tx)
                .await?;
            // Staged re-wraps of the destroyed epochs (a master-key switch that did not
            // commit) would keep them alive in another table.
            sqlx::query("DELETE FROM master_key_rewraps WHERE scope_id = $1 \
                         AND fingerprint LIKE 'wrap:%' AND version < $2")
                .bind(scope_id)
                .bind(i64::from(keep))
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(true)
        })
    }

    /// Deletes every wrapped key of the given scopes (a revoked subtree).
    pub async fn delete_scope_keys(&self, scope_ids: &[String]) -> Result<u64, StoreError> {
        let mut deleted = 0;
        with_write_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            for id in scope_ids {
                for sql in [
                    "DELETE FROM key_material WHERE scope_id = $1",
                    "DELETE FROM wrapping_keys WHERE scope_id = $1",
                    "DELETE FROM master_key_rewraps WHERE scope_id = $1",
                ] {
                    deleted += sqlx::query(sql).bind(id).execute(&mut *tx).await?.rows_affected();
                }
            }
            tx.commit().await?;
        });
        Ok(deleted)
    }

    /// Removes destroyed key bytes from the database's files, beyond deleting rows.
    ///
    /// SQLite: the writer runs with `secure_delete`, which zeroes freed cells in the main
    /// file; the WAL still holds page images with the old bytes until a checkpoint that
    /// truncates it, which this runs (retrying while readers hold old snapshots).
    /// PostgreSQL: a deleted or updated row stays in its page until the page is rewritten,
    /// and plain VACUUM only marks the space free; `VACUUM FULL` rewrites the key tables
    /// into new files (the old files are truncated at commit). WAL segments, replicas and
    /// backups keep old bytes: only a master-key rotation makes those useless (ADR 0013).
    pub async fn destroy_at_rest(&self) -> Result<(), StoreError> {
        match self {
            Db::Sqlite(db) => {
                for attempt in 0..50u32 {
                    let (busy, _, _): (i64, i64, i64) =
                        sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
                            .fetch_one(&db.write)
                            .await?;
                    if busy == 0 {
                        return Ok(());
                    }
                    // A reader holds a snapshot that still needs the WAL: it ends with its
                    // statement (readers never hold transactions open).
                    tokio::time::sleep(std::time::Duration::from_millis(
                        5 * u64::from(attempt + 1),
                    ))
                    .await;
                }
                Err(StoreError::WalBusy)
            }
            Db::Postgres(db) => {
                // VACUUM keeps a deleted row while an older transaction may still see it. That
                // is not only this database's (a snapshot, or a transaction's own id between
                // statements): measured under the test suite's load, transactions of other
                // databases of the cluster (creating and dropping databases, starting
                // backends) kept rows too. So: wait until every transaction of the cluster
                // started after the deletes (all committed before this call), rewrite, and do
                // it twice, since a transaction can start in between. A transaction open for
                // long makes this fail; the caller retries (the re-key job) or logs it.
                let marker: i64 =
                    sqlx::query_scalar("SELECT (txid_current() % 4294967296)::bigint")
                        .fetch_one(&db.pool)
                        .await?;
                for _ in 0..2 {
                    let mut clear = false;
                    for attempt in 0..100u64 {
                        let older: bool = sqlx::query_scalar(
                            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity \
                             WHERE pid <> pg_backend_pid() \
                             AND GREATEST(age(backend_xmin), age(backend_xid)) > age($1::text::xid))",
                        )
                        .bind(marker)
                        .fetch_one(&db.pool)
                        .await?;
                        if !older {
                            clear = true;
                            break;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(10 + 5 * attempt))
                            .await;
                    }
                    if !clear {
                        return Err(StoreError::SnapshotsHeld);
                    }
                    for table in ["key_material", "wrapping_keys", "master_key_rewraps"] {
                        sqlx::query(&format!("VACUUM (FULL) {table}"))
                            .execute(&db.pool)
                            .await?;
                    }
                }
                Ok(())
            }
        }
    }
}

/// What the platform master key wraps directly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MasterWrappedKind {
    /// An epoch of an organization's wrapping key.
    WrappingKey,
    /// An organization key version written before wrapping keys existed.
    KeyVersion,
}

/// One row a master-key rotation re-wraps: table, key columns, the bytes, and what
/// `master_fingerprint` (or `wrapped_by`) said.
struct RotatedRow {
    by: String,
    table: &'static str,
    scope_id: String,
    number: i64,
    fingerprint: String,
    target: Option<String>,
    kind: MasterWrappedKind,
    wrapped: Vec<u8>,
}

impl Db {
    /// Re-wraps everything the local master key `old` wraps with `rewrap(kind, org, number,
    /// wrapped)` and makes `new` the database's master key, in one transaction that keeps
    /// out concurrent writers of key rows (PostgreSQL: table locks; SQLite: the server is
    /// stopped). A writer that wrapped with `old` meanwhile is refused afterwards
    /// (`insert_wrapping_key`) and wraps again with the new key. Returns the rows re-wrapped.
    /// `held_by_kms`: the new key as a KMS wraps it (`--master-key`), stored in its place;
    /// `None` for a key kept in a file. Either way the old key's row goes.
    pub async fn rotate_local_master<F>(
        &self,
        old: &str,
        new: &str,
        held_by_kms: Option<&PlatformKeyRow>,
        mut rewrap: F,
    ) -> Result<usize, StoreError>
    where
        F: FnMut(MasterWrappedKind, bool, &str, u32, &[u8]) -> Option<Vec<u8>> + Send,
    {
        // Rows the platform key wraps, and (BYOK) rows where it seals the customer's
        // ciphertext: `<customer key>+local:<fingerprint>`.
        let sealed = format!("%+local:{old}");
        let select = [
            (
                "wrapping_keys",
                "SELECT scope_id, epoch, fingerprint, wrapped, NULL, master_fingerprint FROM wrapping_keys \
                 WHERE parent_id IS NULL AND (master_fingerprint = $1 OR master_fingerprint LIKE $2)",
            ),
            (
                "key_material",
                "SELECT scope_id, version, fingerprint, wrapped, NULL, COALESCE(master_fingerprint, $1) \
                 FROM key_material WHERE parent_id IS NULL AND node_epoch IS NULL \
                 AND (master_fingerprint = $1 OR master_fingerprint IS NULL OR master_fingerprint LIKE $2)",
            ),
            (
                "master_key_rewraps",
                "SELECT scope_id, version, fingerprint, wrapped, target, wrapped_by FROM master_key_rewraps \
                 WHERE wrapped_by = $1 OR wrapped_by LIKE $2",
            ),
        ];
        let now = now_micros();
        with_write_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            if self.is_postgres() {
                sqlx::query("LOCK TABLE master_keys, wrapping_keys, key_material, master_key_rewraps, \
                             platform_keys IN SHARE ROW EXCLUSIVE MODE")
                    .execute(&mut *tx)
                    .await?;
            }
            let current: Vec<String> = sqlx::query_scalar(
                "SELECT fingerprint FROM master_keys WHERE provider = 'local'")
                .fetch_all(&mut *tx)
                .await?;
            if current != [old.to_owned()] {
                return Err(StoreError::MasterKeyChanged);
            }
            let mut rows = vec![];
            for (table, sql) in select {
                let found: Vec<(String, i64, String, String, Option<String>, String)> =
                    sqlx::query_as(sql).bind(old).bind(&sealed).fetch_all(&mut *tx).await?;
                for (scope_id, number, fingerprint, wrapped, target, by) in found {
                    let kind = if table == "wrapping_keys" || fingerprint.starts_with("wrap:") {
                        MasterWrappedKind::WrappingKey
                    } else {
                        MasterWrappedKind::KeyVersion
                    };
                    let wrapped = STANDARD
                        .decode(wrapped)
                        .map_err(|_| StoreError::MalformedKey { scope_id: scope_id.clone() })?;
                    rows.push(RotatedRow { by, table, scope_id, number, fingerprint, target, kind, wrapped });
                }
            }
            for row in &rows {
                let number = u32::try_from(row.number)
                    .map_err(|_| StoreError::MalformedKey { scope_id: row.scope_id.clone() })?;
                let customer = row.by.strip_suffix(&format!("+local:{old}"));
                let wrapped = rewrap(row.kind, customer.is_some(), &row.scope_id, number, &row.wrapped)
                    .ok_or_else(|| StoreError::MalformedKey { scope_id: row.scope_id.clone() })?;
                let by = match customer {
                    Some(customer) => format!("{customer}+local:{new}"),
                    None => new.to_owned(),
                };
                let wrapped = STANDARD.encode(wrapped);
                let query = match row.table {
                    "wrapping_keys" => sqlx::query(
                        "UPDATE wrapping_keys SET wrapped = $1, master_fingerprint = $2 \
                         WHERE scope_id = $3 AND epoch = $4 AND fingerprint = $5 AND $6 = ''"),
                    "key_material" => sqlx::query(
                        "UPDATE key_material SET wrapped = $1, master_fingerprint = $2 \
                         WHERE scope_id = $3 AND version = $4 AND fingerprint = $5 AND $6 = ''"),
                    _ => sqlx::query(
                        "UPDATE master_key_rewraps SET wrapped = $1, wrapped_by = $2 \
                         WHERE scope_id = $3 AND version = $4 AND fingerprint = $5 AND target = $6"),
                };
                query
                    .bind(&wrapped)
                    .bind(&by)
                    .bind(&row.scope_id)
                    .bind(row.number)
                    .bind(&row.fingerprint)
                    .bind(row.target.clone().unwrap_or_default())
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query("DELETE FROM platform_keys").execute(&mut *tx).await?;
            if let Some(row) = held_by_kms {
                sqlx::query("INSERT INTO platform_keys (fingerprint, wrapped_by, wrapped, created_at) \
                             VALUES ($1, $2, $3, $4)")
                    .bind(&row.fingerprint)
                    .bind(&row.wrapped_by)
                    .bind(STANDARD.encode(&row.wrapped))
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query("UPDATE master_keys SET fingerprint = $1, created_at = $2, \
                         activated_position = (SELECT COALESCE(MAX(position), 0) FROM events) \
                         WHERE provider = 'local' AND fingerprint = $3")
                .bind(new)
                .bind(now)
                .bind(old)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(rows.len())
        })
    }
}

/// The platform master key as a KMS wraps it (`--master-key aws-kms:ARN`).
#[derive(Clone, PartialEq, Eq)]
pub struct PlatformKeyRow {
    pub fingerprint: String,
    /// `provider:key_id` of the KMS key that wraps it.
    pub wrapped_by: String,
    pub wrapped: Vec<u8>,
}

impl std::fmt::Debug for PlatformKeyRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlatformKeyRow")
            .field("fingerprint", &self.fingerprint)
            .field("wrapped_by", &self.wrapped_by)
            .finish_non_exhaustive()
    }
}

impl Db {
    /// The KMS-wrapped platform key with this fingerprint, if the database holds it.
    pub async fn platform_key(
        &self,
        fingerprint: &str,
    ) -> Result<Option<PlatformKeyRow>, StoreError> {
        let row: Option<(String, String, String)> = with_write_pool!(self, pool => {
            sqlx::query_as("SELECT fingerprint, wrapped_by, wrapped FROM platform_keys WHERE fingerprint = $1")
                .bind(fingerprint)
                .fetch_optional(pool)
                .await?
        });
        row.map(|(fingerprint, wrapped_by, wrapped)| {
            let wrapped = STANDARD
                .decode(wrapped)
                .map_err(|_| StoreError::MalformedKey {
                    scope_id: "platform".into(),
                })?;
            Ok(PlatformKeyRow {
                fingerprint,
                wrapped_by,
                wrapped,
            })
        })
        .transpose()
    }

    /// Registers a new database's platform key, held by a KMS: the key row and its
    /// fingerprint in `master_keys`, in one transaction. Returns false if the database
    /// already has a platform key (another instance registered one first).
    pub async fn register_platform_key(&self, row: &PlatformKeyRow) -> Result<bool, StoreError> {
        let now = now_micros();
        with_write_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let known: Option<String> = sqlx::query_scalar(
                "SELECT fingerprint FROM master_keys WHERE provider = 'local'")
                .fetch_optional(&mut *tx)
                .await?;
            if known.is_some() {
                return Ok(false);
            }
            sqlx::query("INSERT INTO master_keys (fingerprint, provider, created_at) \
                         VALUES ($1, 'local', $2)")
                .bind(&row.fingerprint)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            sqlx::query("INSERT INTO platform_keys (fingerprint, wrapped_by, wrapped, created_at) \
                         VALUES ($1, $2, $3, $4)")
                .bind(&row.fingerprint)
                .bind(&row.wrapped_by)
                .bind(STANDARD.encode(&row.wrapped))
                .bind(now)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(true)
        })
    }
}

/// Serializes, per organization, what changes which master key wraps its wrapping keys: a
/// master-key switch (from staging to projection) and a new epoch of the organization's
/// wrapping key (a re-key, or a first epoch). Released when dropped.
pub struct OrgKeysLock {
    _sqlite: Option<tokio::sync::OwnedMutexGuard<()>>,
    postgres: Option<(sqlx::pool::PoolConnection<sqlx::Postgres>, String)>,
}

impl Drop for OrgKeysLock {
    fn drop(&mut self) {
        if let Some((mut connection, key)) = self.postgres.take() {
            tokio::spawn(async move {
                let unlocked = sqlx::query("SELECT pg_advisory_unlock(hashtextextended($1, 0))")
                    .bind(&key)
                    .execute(&mut *connection)
                    .await;
                if unlocked.is_err() {
                    // Never hand a connection that may still hold the lock back to the pool:
                    // closing it ends the session, and the lock with it.
                    let _ = connection.detach();
                }
            });
        }
    }
}

fn sqlite_org_locks() -> &'static std::sync::Mutex<
    std::collections::HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>,
> {
    static LOCKS: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
    > = std::sync::OnceLock::new();
    LOCKS.get_or_init(Default::default)
}

impl Db {
    /// Takes the organization's key lock (PostgreSQL: an advisory lock, across instances;
    /// SQLite: in this process, the only one that writes the database).
    pub async fn lock_org_keys(&self, org_id: &str) -> Result<OrgKeysLock, StoreError> {
        match self {
            Db::Sqlite(_) => {
                let lock = match sqlite_org_locks().lock() {
                    Ok(mut locks) => locks.entry(org_id.to_owned()).or_default().clone(),
                    Err(poisoned) => poisoned
                        .into_inner()
                        .entry(org_id.to_owned())
                        .or_default()
                        .clone(),
                };
                Ok(OrgKeysLock {
                    _sqlite: Some(lock.lock_owned().await),
                    postgres: None,
                })
            }
            Db::Postgres(db) => {
                let key = format!("ekm-org-keys:{org_id}");
                // The guard holds the connection before the lock is asked for: if this future
                // is dropped while PostgreSQL is still granting it (a client that hangs up, a
                // job cancelled), the guard's drop unlocks once the grant has arrived, instead
                // of the connection going back to the pool holding the lock for ever.
                let mut lock = OrgKeysLock {
                    _sqlite: None,
                    postgres: Some((db.pool.acquire().await?, key)),
                };
                if let Some((connection, key)) = lock.postgres.as_mut() {
                    sqlx::query("SELECT pg_advisory_lock(hashtextextended($1, 0))")
                        .bind(&*key)
                        .execute(&mut **connection)
                        .await?;
                }
                Ok(lock)
            }
        }
    }
}
