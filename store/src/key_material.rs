//! Wrapped key material, stored outside the event log.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use sqlx::Row;

use crate::db::Db;
use crate::error::StoreError;
use crate::time::now_micros;
use crate::{with_read_pool, with_write_pool};

/// One wrapped key version.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyRow {
    pub scope_id: String,
    pub version: u32,
    pub fingerprint: String,
    pub wrapped: Vec<u8>,
    /// The key version this one is wrapped under (none for organizations).
    pub parent: Option<(String, u32)>,
    /// What wraps an organization key: the local master key's fingerprint, or the customer
    /// key's `provider:key_id`.
    pub master_fingerprint: Option<String>,
    /// The epoch of the scope's own wrapping key this version is wrapped under (ADR 0013);
    /// `None` for rows written before wrapping keys, wrapped under `parent` (or the master
    /// key for organizations).
    pub node_epoch: Option<u32>,
}

/// The latest health check of an organization's customer key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyCheck {
    pub checked_at: i64,
    pub ok: bool,
    pub detail: String,
}

impl std::fmt::Debug for KeyRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRow")
            .field("scope_id", &self.scope_id)
            .field("version", &self.version)
            .field("fingerprint", &self.fingerprint)
            .field("parent", &self.parent)
            .finish_non_exhaustive()
    }
}

/// What the database says about a master key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MasterKeyCheck {
    /// Known (or now registered): use it.
    Registered,
    /// The database's organization keys are wrapped by other master keys.
    Unknown { known: Vec<String> },
}

/// Stores a key version, unless the epoch of the wrapping key it names is gone; shared with
/// `Db::append`.
pub(crate) const INSERT_KEY: &str =
    "INSERT INTO key_material (scope_id, version, fingerprint, wrapped, parent_id, \
    parent_version, master_fingerprint, created_at, node_epoch) \
    SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9 WHERE $9 IS NULL OR EXISTS \
    (SELECT 1 FROM wrapping_keys WHERE scope_id = $1 AND epoch = $9)";

impl Db {
    /// Stores a key version. Returns false if the wrapping-key epoch it is wrapped under was
    /// destroyed meanwhile (a re-key): the caller wraps it again under the newest epoch.
    pub async fn insert_key(&self, row: &KeyRow) -> Result<bool, StoreError> {
        let sql = INSERT_KEY;
        let inserted = with_write_pool!(self, pool => {
            sqlx::query(sql)
                .bind(&row.scope_id)
                .bind(i64::from(row.version))
                .bind(&row.fingerprint)
                .bind(STANDARD.encode(&row.wrapped))
                .bind(row.parent.as_ref().map(|(id, _)| id.clone()))
                .bind(row.parent.as_ref().map(|(_, v)| i64::from(*v)))
                .bind(&row.master_fingerprint)
                .bind(now_micros())
                .bind(row.node_epoch.map(i64::from))
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(inserted == 1)
    }

    /// The wrapped key of `scope_id` at `version` with this fingerprint, if it still exists.
    pub async fn key(
        &self,
        scope_id: &str,
        version: u32,
        fingerprint: &str,
    ) -> Result<Option<KeyRow>, StoreError> {
        let sql =
            "SELECT wrapped, parent_id, parent_version, master_fingerprint, node_epoch FROM key_material \
                   WHERE scope_id = $1 AND version = $2 AND fingerprint = $3";
        let row = with_read_pool!(self, pool => {
            sqlx::query(sql)
                .bind(scope_id)
                .bind(i64::from(version))
                .bind(fingerprint)
                .fetch_optional(pool)
                .await?
                .map(|row| -> Result<_, sqlx::Error> {
                    Ok((
                        row.try_get::<String, _>("wrapped")?,
                        row.try_get::<Option<String>, _>("parent_id")?,
                        row.try_get::<Option<i64>, _>("parent_version")?,
                        row.try_get::<Option<String>, _>("master_fingerprint")?,
                        row.try_get::<Option<i64>, _>("node_epoch")?,
                    ))
                })
                .transpose()?
        });
        Ok(row.and_then(
            |(wrapped, parent_id, parent_version, master_fingerprint, node_epoch)| {
                Some(KeyRow {
                    scope_id: scope_id.to_owned(),
                    version,
                    fingerprint: fingerprint.to_owned(),
                    wrapped: STANDARD.decode(wrapped).ok()?,
                    parent: match (parent_id, parent_version) {
                        (Some(id), Some(v)) => Some((id, u32::try_from(v).ok()?)),
                        _ => None,
                    },
                    master_fingerprint,
                    node_epoch: match node_epoch {
                        Some(e) => Some(u32::try_from(e).ok()?),
                        None => None,
                    },
                })
            },
        ))
    }

    /// Keys wrapped under a version of `parent` below `below` (the children a retirement
    /// must re-wrap first).
    pub async fn keys_wrapped_under(
        &self,
        parent: &str,
        below: u32,
    ) -> Result<Vec<KeyRow>, StoreError> {
        let sql =
            "SELECT scope_id, version, fingerprint, wrapped, parent_version FROM key_material \
                   WHERE parent_id = $1 AND parent_version < $2 ORDER BY scope_id, version";
        let rows: Vec<(String, i64, String, String, i64)> = with_read_pool!(self, pool => {
            sqlx::query_as(sql).bind(parent).bind(i64::from(below)).fetch_all(pool).await?
        });
        Ok(rows
            .into_iter()
            .filter_map(
                |(scope_id, version, fingerprint, wrapped, parent_version)| {
                    Some(KeyRow {
                        scope_id,
                        version: u32::try_from(version).ok()?,
                        fingerprint,
                        wrapped: STANDARD.decode(wrapped).ok()?,
                        parent: Some((parent.to_owned(), u32::try_from(parent_version).ok()?)),
                        master_fingerprint: None,
                        node_epoch: None,
                    })
                },
            )
            .collect())
    }

    /// Replaces a key's wrapping (same key, wrapped under another parent version).
    pub async fn rewrap_key(
        &self,
        row: &KeyRow,
        wrapped: &[u8],
        parent_version: u32,
    ) -> Result<(), StoreError> {
        let sql = "UPDATE key_material SET wrapped = $4, parent_version = $5 \
                   WHERE scope_id = $1 AND version = $2 AND fingerprint = $3";
        with_write_pool!(self, pool => {
            sqlx::query(sql)
                .bind(&row.scope_id)
                .bind(i64::from(row.version))
                .bind(&row.fingerprint)
                .bind(STANDARD.encode(wrapped))
                .bind(i64::from(parent_version))
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// How many wrapped keys a scope still has (0 once shredded).
    pub async fn key_count(&self, scope_id: &str) -> Result<i64, StoreError> {
        let count: i64 = with_read_pool!(self, pool => {
            sqlx::query_scalar("SELECT COUNT(*) FROM key_material WHERE scope_id = $1")
                .bind(scope_id)
                .fetch_one(pool)
                .await?
        });
        Ok(count)
    }

    /// The master keys registered for a provider.
    pub async fn master_keys(&self, provider: &str) -> Result<Vec<String>, StoreError> {
        let known: Vec<String> = with_read_pool!(self, pool => {
            sqlx::query_scalar("SELECT fingerprint FROM master_keys WHERE provider = $1 ORDER BY created_at")
                .bind(provider)
                .fetch_all(pool)
                .await?
        });
        Ok(known)
    }

    /// Registers the local master key on a database that has none, or checks it is known.
    pub async fn check_master_key(
        &self,
        fingerprint: &str,
        provider: &str,
    ) -> Result<MasterKeyCheck, StoreError> {
        let known: Vec<String> = with_write_pool!(self, pool => {
            sqlx::query_scalar("SELECT fingerprint FROM master_keys WHERE provider = $1 ORDER BY created_at")
                .bind(provider)
                .fetch_all(pool)
                .await?
        });
        if known.iter().any(|k| k == fingerprint) {
            return Ok(MasterKeyCheck::Registered);
        }
        if !known.is_empty() {
            return Ok(MasterKeyCheck::Unknown { known });
        }
        with_write_pool!(self, pool => {
            sqlx::query("INSERT INTO master_keys (fingerprint, provider, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
                .bind(fingerprint)
                .bind(provider)
                .bind(now_micros())
                .execute(pool)
                .await?;
        });
        // Two instances may have raced with different fresh keys: the unique index lets one
        // win, and the other is told which key to use.
        let known: Vec<String> = with_write_pool!(self, pool => {
            sqlx::query_scalar("SELECT fingerprint FROM master_keys WHERE provider = $1")
                .bind(provider)
                .fetch_all(pool)
                .await?
        });
        if known.iter().all(|k| k == fingerprint) {
            Ok(MasterKeyCheck::Registered)
        } else {
            Ok(MasterKeyCheck::Unknown { known })
        }
    }

    /// Every wrapped version of an organization key (rows without a parent).
    pub async fn org_keys(&self, org_id: &str) -> Result<Vec<KeyRow>, StoreError> {
        let sql = "SELECT version, fingerprint, wrapped, master_fingerprint FROM key_material \
                   WHERE scope_id = $1 AND parent_id IS NULL AND node_epoch IS NULL ORDER BY version";
        let rows: Vec<(i64, String, String, Option<String>)> = with_read_pool!(self, pool => {
            sqlx::query_as(sql).bind(org_id).fetch_all(pool).await?
        });
        Ok(rows
            .into_iter()
            .filter_map(|(version, fingerprint, wrapped, master_fingerprint)| {
                Some(KeyRow {
                    scope_id: org_id.to_owned(),
                    version: u32::try_from(version).ok()?,
                    fingerprint,
                    wrapped: STANDARD.decode(wrapped).ok()?,
                    parent: None,
                    master_fingerprint,
                    node_epoch: None,
                })
            })
            .collect())
    }

    /// Stores an organization key version re-wrapped under another master key, to be
    /// applied when the event that switches to `target` is projected.
    pub async fn stage_rewrap(
        &self,
        row: &KeyRow,
        target: &str,
        wrapped_by: &str,
        wrapped: &[u8],
        platform_key: Option<&str>,
    ) -> Result<bool, StoreError> {
        // Refused when the platform key that wraps or seals it was rotated away meanwhile.
        let sql = "INSERT INTO master_key_rewraps (scope_id, version, fingerprint, target, \
                   wrapped_by, wrapped, created_at) SELECT $1, $2, $3, $4, $5, $6, $7 \
                   WHERE $8 = '' OR EXISTS (SELECT 1 FROM master_keys WHERE provider = 'local' \
                   AND fingerprint = $8) \
                   ON CONFLICT (scope_id, version, fingerprint, target) DO UPDATE \
                   SET wrapped_by = excluded.wrapped_by, wrapped = excluded.wrapped, \
                   created_at = excluded.created_at";
        let staged = with_write_pool!(self, pool => {
            sqlx::query(sql)
                .bind(&row.scope_id)
                .bind(i64::from(row.version))
                .bind(&row.fingerprint)
                .bind(target)
                .bind(wrapped_by)
                .bind(STANDARD.encode(wrapped))
                .bind(now_micros())
                .bind(platform_key.unwrap_or(""))
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(staged == 1)
    }

    /// Forgets every re-wrap staged for an organization (left by a switch that did not
    /// commit); called under the organization's key lock, before staging a new switch.
    pub async fn clear_staged_rewraps(&self, org_id: &str) -> Result<(), StoreError> {
        with_write_pool!(self, pool => {
            sqlx::query("DELETE FROM master_key_rewraps WHERE scope_id = $1")
                .bind(org_id)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Records the health monitor's latest check of an organization's customer key.
    pub async fn record_key_check(
        &self,
        org_id: &str,
        ok: bool,
        detail: &str,
    ) -> Result<(), StoreError> {
        let sql = "INSERT INTO master_key_checks (org_id, checked_at, ok, detail) \
                   VALUES ($1, $2, $3, $4) ON CONFLICT (org_id) DO UPDATE \
                   SET checked_at = excluded.checked_at, ok = excluded.ok, detail = excluded.detail";
        with_write_pool!(self, pool => {
            sqlx::query(sql)
                .bind(org_id)
                .bind(now_micros())
                .bind(i64::from(ok))
                .bind(detail)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    pub async fn key_check(&self, org_id: &str) -> Result<Option<KeyCheck>, StoreError> {
        let sql = "SELECT checked_at, ok, detail FROM master_key_checks WHERE org_id = $1";
        let row: Option<(i64, i64, String)> = with_read_pool!(self, pool => {
            sqlx::query_as(sql).bind(org_id).fetch_optional(pool).await?
        });
        Ok(row.map(|(checked_at, ok, detail)| KeyCheck {
            checked_at,
            ok: ok != 0,
            detail,
        }))
    }
}
