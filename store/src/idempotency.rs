//! Idempotency keys (issue 18 §3, ADR 0035): the first answer to a request that carried
//! an `Idempotency-Key`, per principal, kept for `KEEP` so that a retry is answered from it
//! instead of acting twice. In the database, so it holds across instances and restarts.

use sqlx::Row;

use crate::db::Db;
use crate::error::StoreError;
use crate::time::now_micros;
use crate::with_write_pool;

/// How long a key's answer is kept: 24 hours, in microseconds.
pub const KEEP_MICROS: i64 = 24 * 3600 * 1_000_000;
/// A first request still running after this long is taken to have died with its instance
/// (every request has a deadline far shorter): a retry runs again.
pub const ABANDONED_MICROS: i64 = 10 * 60 * 1_000_000;

/// An answer as the client received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeptAnswer {
    pub status: u16,
    /// The headers worth replaying (content type, location, ETag), as name/value pairs.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// What `Idempotency::begin` found.
#[derive(Debug, PartialEq, Eq)]
pub enum Begun {
    /// The key is new (or its last use expired): this request runs, then `finish` or
    /// `forget` with this claim.
    First(String),
    /// The same key and request were answered: replay this.
    Answered(KeptAnswer),
    /// The same key and request are still running elsewhere.
    Running,
    /// The key was used with another request.
    Reused,
}

#[derive(Clone)]
pub struct Idempotency {
    db: Db,
}

impl Idempotency {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// Claims `key` for `principal` and a request whose fingerprint is `fingerprint`, or
    /// says what the key already holds.
    pub async fn begin(
        &self,
        principal: &str,
        key: &str,
        fingerprint: &str,
    ) -> Result<Begun, StoreError> {
        let now = now_micros();
        let forget = "DELETE FROM idempotency_keys WHERE principal = $1 AND key = $2 \
             AND (created_at < $3 OR (status IS NULL AND created_at < $4))";
        let claim =
            "INSERT INTO idempotency_keys (principal, key, fingerprint, claim, created_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (principal, key) DO NOTHING";
        let this = uuid::Uuid::now_v7().simple().to_string();
        let claimed = with_write_pool!(&self.db, pool => {
            sqlx::query(forget)
                .bind(principal)
                .bind(key)
                .bind(now - KEEP_MICROS)
                .bind(now - ABANDONED_MICROS)
                .execute(pool)
                .await?;
            sqlx::query(claim)
                .bind(principal)
                .bind(key)
                .bind(fingerprint)
                .bind(this.as_str())
                .bind(now)
                .execute(pool)
                .await?
                .rows_affected()
        });
        if claimed == 1 {
            return Ok(Begun::First(this));
        }
        let read = "SELECT fingerprint, status, response_headers, response_body \
             FROM idempotency_keys WHERE principal = $1 AND key = $2";
        let row = with_write_pool!(&self.db, pool => {
            match sqlx::query(read).bind(principal).bind(key).fetch_optional(pool).await? {
                None => None,
                Some(row) => Some((
                    row.try_get::<String, _>(0)?,
                    row.try_get::<Option<i64>, _>(1)?,
                    row.try_get::<Option<String>, _>(2)?,
                    row.try_get::<Option<Vec<u8>>, _>(3)?,
                )),
            }
        });
        // Gone between the two statements: its first request failed and let it go.
        let Some((kept_fingerprint, status, headers, body)) = row else {
            return Ok(Begun::Running);
        };
        if kept_fingerprint != fingerprint {
            return Ok(Begun::Reused);
        }
        let Some(status) = status else {
            return Ok(Begun::Running);
        };
        let headers: Vec<(String, String)> = headers
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default();
        Ok(Begun::Answered(KeptAnswer {
            status: u16::try_from(status).unwrap_or(500),
            headers,
            body: body.unwrap_or_default(),
        }))
    }

    /// Keeps the first request's answer, if `claim` still holds the key (a run taken for
    /// abandoned lost it). Returns whether it did.
    pub async fn finish(
        &self,
        principal: &str,
        key: &str,
        claim: &str,
        answer: &KeptAnswer,
    ) -> Result<bool, StoreError> {
        let sql = "UPDATE idempotency_keys SET status = $3, response_headers = $4, \
             response_body = $5 WHERE principal = $1 AND key = $2 AND claim = $6 \
             AND status IS NULL";
        let headers = serde_json::to_string(&answer.headers).unwrap_or_else(|_| "[]".into());
        let kept = with_write_pool!(&self.db, pool => {
            sqlx::query(sql)
                .bind(principal)
                .bind(key)
                .bind(i64::from(answer.status))
                .bind(headers.as_str())
                .bind(answer.body.as_slice())
                .bind(claim)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(kept == 1)
    }

    /// Lets the key go: the first request did nothing a retry must not repeat (refused for
    /// a reason that may pass, such as 503 or 429).
    pub async fn forget(&self, principal: &str, key: &str, claim: &str) -> Result<(), StoreError> {
        let sql = "DELETE FROM idempotency_keys WHERE principal = $1 AND key = $2 \
             AND claim = $3 AND status IS NULL";
        with_write_pool!(&self.db, pool => {
            sqlx::query(sql).bind(principal).bind(key).bind(claim).execute(pool).await?;
        });
        Ok(())
    }

    /// Removes every key older than `KEEP_MICROS`; returns how many.
    pub async fn expire(&self) -> Result<u64, StoreError> {
        let sql = "DELETE FROM idempotency_keys WHERE created_at < $1";
        let removed = with_write_pool!(&self.db, pool => {
            sqlx::query(sql)
                .bind(now_micros() - KEEP_MICROS)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(removed)
    }
}
