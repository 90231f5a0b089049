//! Bearer tokens: created once and shown once, stored only as SHA-256 hashes.
//!
//! Tokens carry 256 random bits, so an unsalted hash is safe to store and to look up by
//! (the same scheme as GitHub's and AWS's access tokens); comparing hashes through a unique
//! index leaks nothing useful about the secret.

use std::fmt;
use std::path::Path;

use ekm_domain::{Grant, OrgId, OrgRole, PrincipalKind, PrincipalName, ScopeId};
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::db::Db;
use crate::error::StoreError;
use crate::time::now_micros;
use crate::{with_read_pool, with_write_pool};

/// The file in the data directory that receives the operator token on first start.
pub const OPERATOR_TOKEN_FILE: &str = "operator.token";

/// Where a rotation stages the new operator token until the database has it.
const STAGED_OPERATOR_TOKEN_FILE: &str = "operator.token.new";

/// What `Tokens::rotate_operator_token` did. The secret is in the file (and here, for
/// `--print`); `Debug` never shows it.
#[derive(Debug)]
pub struct RotatedOperatorToken {
    pub token: NewToken,
    /// Ids of the operator tokens revoked by the rotation.
    pub revoked: Vec<String>,
}

/// What a token may do: the platform operator's, or a role in an organization.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The platform operator: creates organizations.
    Operator,
    Org(OrgRole),
}

impl Role {
    pub const ORG_ADMIN: Role = Role::Org(OrgRole::OrgAdmin);

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Org(role) => role.as_str(),
        }
    }

    fn parse(input: &str) -> Option<Role> {
        if input == "operator" {
            return Some(Role::Operator);
        }
        input.parse().ok().map(Role::Org)
    }
}

/// id, principal, kind, role, created_at, expires_at, revoked_at.
type TokenRow = (
    String,
    Option<String>,
    Option<String>,
    String,
    i64,
    Option<i64>,
    Option<i64>,
);

/// A token as an org admin sees it in a list (never the secret or its hash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenInfo {
    pub id: String,
    pub principal: String,
    pub kind: String,
    pub role: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

/// The holder of a valid token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The token's id: the stable principal id recorded in events (never the secret).
    pub token_id: String,
    pub role: Role,
    pub org_id: Option<OrgId>,
    pub name: String,
    /// Microseconds since the epoch after which the token stops working, if any.
    pub expires_at: Option<i64>,
    /// The principal the token belongs to (the actor of its commands).
    pub principal: String,
    /// A user or a service (the actor kind of its events).
    pub kind: PrincipalKind,
    /// What the principal holds through grants, as of authentication (expired grants left
    /// out).
    pub grants: Vec<Grant>,
    /// Microseconds since the epoch at which the first of `grants` expires: from then on
    /// the principal must be looked up again (a cached one is stale).
    pub grants_until: Option<i64>,
}

/// A freshly created token. The secret exists in memory only until it is shown once.
pub struct NewToken {
    pub id: String,
    pub secret: String,
}

impl fmt::Debug for NewToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewToken")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// The stored form of a token: hex SHA-256.
pub fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn generate_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("ekm_{}", hex::encode(bytes))
}

/// The token table.
#[derive(Clone, Debug)]
pub struct Tokens {
    db: Db,
}

impl Tokens {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// Creates a token and returns its secret, which is not stored anywhere.
    pub async fn create(
        &self,
        role: Role,
        org_id: Option<OrgId>,
        name: &str,
    ) -> Result<NewToken, StoreError> {
        let token = NewToken {
            id: format!("tok_{}", uuid::Uuid::now_v7().simple()),
            secret: generate_secret(),
        };
        self.insert(&token, role, org_id, name).await?;
        Ok(token)
    }

    async fn insert(
        &self,
        token: &NewToken,
        role: Role,
        org_id: Option<OrgId>,
        name: &str,
    ) -> Result<bool, StoreError> {
        self.insert_for(token, role, org_id, name, PrincipalKind::User, None)
            .await
    }

    async fn insert_for(
        &self,
        token: &NewToken,
        role: Role,
        org_id: Option<OrgId>,
        principal: &str,
        kind: PrincipalKind,
        expires_at: Option<i64>,
    ) -> Result<bool, StoreError> {
        let sql = "INSERT INTO tokens (id, token_hash, role, org_id, name, created_at, principal, \
                   principal_kind, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                   ON CONFLICT DO NOTHING";
        let inserted = with_write_pool!(&self.db, pool => {
            sqlx::query(sql)
                .bind(&token.id)
                .bind(hash(&token.secret))
                .bind(role.as_str())
                .bind(org_id.map(|o| o.to_string()))
                .bind(principal)
                .bind(now_micros())
                .bind(principal)
                .bind(kind.as_str())
                .bind(expires_at)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(inserted == 1)
    }

    /// A new token id (the secret comes with `issue`).
    pub fn new_token() -> NewToken {
        NewToken {
            id: format!("tok_{}", uuid::Uuid::now_v7().simple()),
            secret: generate_secret(),
        }
    }

    /// Stores a token issued to a principal of an organization.
    pub async fn issue(
        &self,
        token: &NewToken,
        org_id: OrgId,
        principal: &str,
        kind: PrincipalKind,
        role: OrgRole,
        expires_at: Option<i64>,
    ) -> Result<(), StoreError> {
        self.insert_for(
            token,
            Role::Org(role),
            Some(org_id),
            principal,
            kind,
            expires_at,
        )
        .await
        .map(|_| ())
    }

    /// A page of the organization's tokens, newest first: those after `after` (the last
    /// page's `(created_at, id)`), at most `limit`.
    pub async fn list_page(
        &self,
        org_id: OrgId,
        after: Option<(i64, String)>,
        limit: i64,
    ) -> Result<Vec<TokenInfo>, StoreError> {
        let (at, id) = after.unwrap_or((i64::MAX, String::new()));
        let sql = "SELECT id, principal, principal_kind, role, created_at, expires_at, revoked_at \
                   FROM tokens WHERE org_id = $1 \
                   AND (created_at < $2 OR (created_at = $2 AND id < $3) OR $4) \
                   ORDER BY created_at DESC, id DESC LIMIT $5";
        let first = id.is_empty();
        let rows: Vec<TokenRow> = with_read_pool!(&self.db, pool => {
            sqlx::query_as(sql)
                .bind(org_id.to_string())
                .bind(at)
                .bind(id)
                .bind(first)
                .bind(limit)
                .fetch_all(pool)
                .await?
        });
        Ok(rows
            .into_iter()
            .map(
                |(id, principal, kind, role, created_at, expires_at, revoked_at)| TokenInfo {
                    principal: principal.unwrap_or_else(|| id.clone()),
                    id,
                    kind: kind.unwrap_or_else(|| "user".into()),
                    role,
                    created_at,
                    expires_at,
                    revoked_at,
                },
            )
            .collect())
    }

    /// The organization a token belongs to, if it exists.
    pub async fn org_of(&self, id: &str) -> Result<Option<Option<String>>, StoreError> {
        let row: Option<Option<String>> = with_read_pool!(&self.db, pool => {
            sqlx::query_scalar("SELECT org_id FROM tokens WHERE id = $1")
                .bind(id)
                .fetch_optional(pool)
                .await?
        });
        Ok(row)
    }

    /// Revokes a token: it stops working at once.
    pub async fn revoke(&self, id: &str) -> Result<(), StoreError> {
        let sql = "UPDATE tokens SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL";
        with_write_pool!(&self.db, pool => {
            sqlx::query(sql).bind(id).bind(now_micros()).execute(pool).await?;
        });
        Ok(())
    }

    /// The principal holding `secret`, if the token exists, is not revoked and not expired.
    pub async fn authenticate(&self, secret: &str) -> Result<Option<Principal>, StoreError> {
        let Some(mut principal) = self.authenticate_token(secret).await? else {
            return Ok(None);
        };
        if let Some(org) = principal.org_id {
            (principal.grants, principal.grants_until) = self
                .grants_of(org, &principal.principal, now_micros())
                .await?;
        }
        Ok(Some(principal))
    }

    /// `authenticate` without the principal's grants (`grants` left empty), for a caller
    /// that holds them elsewhere (the in-memory scope tree).
    pub async fn authenticate_token(&self, secret: &str) -> Result<Option<Principal>, StoreError> {
        let sql =
            "SELECT id, role, org_id, name, expires_at, principal, principal_kind, token_hash \
                   FROM tokens WHERE token_hash = $1 AND revoked_at IS NULL \
                   AND (expires_at IS NULL OR expires_at > $2)";
        let presented = hash(secret);
        let found = with_read_pool!(&self.db, pool => {
            sqlx::query(sql)
                .bind(&presented)
                .bind(now_micros())
                .fetch_optional(pool)
                .await?
                .map(|row| -> Result<_, sqlx::Error> {
                    Ok((
                        row.try_get::<String, _>("id")?,
                        row.try_get::<String, _>("role")?,
                        row.try_get::<Option<String>, _>("org_id")?,
                        row.try_get::<String, _>("name")?,
                        row.try_get::<Option<i64>, _>("expires_at")?,
                        row.try_get::<Option<String>, _>("principal")?,
                        row.try_get::<Option<String>, _>("principal_kind")?,
                        row.try_get::<String, _>("token_hash")?,
                    ))
                })
                .transpose()?
        });
        let Some((token_id, role, org_id, name, expires_at, principal, kind, stored)) = found
        else {
            return Ok(None);
        };
        // The index found the row; the comparison that decides is constant-time, so no
        // answer depends on how much of a hash matched.
        if !constant_time_eq(stored.as_bytes(), presented.as_bytes()) {
            return Ok(None);
        }
        let Some(role) = Role::parse(&role) else {
            return Ok(None);
        };
        let org_id = match org_id {
            Some(org) => match OrgId::parse(&org) {
                Ok(org) => Some(org),
                Err(_) => return Ok(None),
            },
            None => None,
        };
        // Tokens from before principals have none: users. A kind this version does not know
        // authenticates nobody, like an unknown role.
        let kind = match kind.as_deref() {
            None => PrincipalKind::User,
            Some(text) => match text.parse() {
                Ok(kind) => kind,
                Err(_) => return Ok(None),
            },
        };
        let principal = principal.unwrap_or_else(|| token_id.clone());
        Ok(Some(Principal {
            token_id,
            role,
            org_id,
            name,
            expires_at,
            principal,
            kind,
            grants: vec![],
            grants_until: None,
        }))
    }

    /// What a principal holds through grants at `now` (from the grants read model; expired
    /// grants left out), and when the first of them expires.
    pub async fn grants_of(
        &self,
        org: OrgId,
        principal: &str,
        now: i64,
    ) -> Result<(Vec<Grant>, Option<i64>), StoreError> {
        let sql = "SELECT principal, permission, scope_id, expires_at FROM grants_view \
                   WHERE org_id = $1 AND principal = $2 \
                   AND (expires_at IS NULL OR expires_at > $3) ORDER BY granted_position";
        let rows: Vec<(String, String, String, Option<i64>)> = with_read_pool!(&self.db, pool => {
            sqlx::query_as(sql)
                .bind(org.to_string())
                .bind(principal)
                .bind(now)
                .fetch_all(pool)
                .await?
        });
        let until = rows.iter().filter_map(|r| r.3).min();
        let grants = rows
            .into_iter()
            .filter_map(|r| parse_grant(&r.0, &r.1, &r.2))
            .collect();
        Ok((grants, until))
    }

    /// A page of an organization's grants, by principal, permission and when granted, each
    /// with its expiry (microseconds since the epoch) and its sort key (principal and permission as stored,
    /// `granted_position`; `None` for a row that does not parse, which still counts for the
    /// page, so that the page's end is told right): those after `after` (the last
    /// page's `(principal, permission, granted_position)`) in the same order, at most `limit`.
    pub async fn grants_page(
        &self,
        org: OrgId,
        after: Option<(String, String, i64)>,
        limit: i64,
    ) -> Result<Vec<(Option<Grant>, Option<i64>, (String, String, i64))>, StoreError> {
        let first = after.is_none();
        let (principal, permission, position) = after.unwrap_or_default();
        let sql = "SELECT principal, permission, scope_id, granted_position, expires_at \
                   FROM grants_view \
                   WHERE org_id = $1 AND ($5 OR principal > $2 \
                   OR (principal = $2 AND permission > $3) \
                   OR (principal = $2 AND permission = $3 AND granted_position > $4)) \
                   ORDER BY principal, permission, granted_position LIMIT $6";
        let rows: Vec<(String, String, String, i64, Option<i64>)> = with_read_pool!(&self.db, pool => {
            sqlx::query_as(sql)
                .bind(org.to_string())
                .bind(principal)
                .bind(permission)
                .bind(position)
                .bind(first)
                .bind(limit)
                .fetch_all(pool)
                .await?
        });
        Ok(rows
            .into_iter()
            .map(|r| (parse_grant(&r.0, &r.1, &r.2), r.4, (r.0, r.1, r.3)))
            .collect())
    }

    /// Replaces the live operator token with a new one and writes it to
    /// `DIR/operator.token` (0600, atomically). The old row stays, revoked, so that the
    /// audit log still tells which token acted; new requests refuse the old token at once,
    /// servers that cached it within the token cache's bound (one second, ADR 0007).
    ///
    /// Order: the new token is staged in `DIR/operator.token.new`, the database replaces
    /// the old token in one transaction, then the staged file is renamed over the old one.
    /// A crash between the last two steps leaves the valid token in the staged file; the
    /// next rotation or start finishes the rename (`finish_interrupted_rotation`).
    pub async fn rotate_operator_token(
        &self,
        data_dir: &Path,
    ) -> Result<RotatedOperatorToken, StoreError> {
        self.finish_interrupted_rotation(data_dir).await?;
        let path = data_dir.join(OPERATOR_TOKEN_FILE);
        let staged = data_dir.join(STAGED_OPERATOR_TOKEN_FILE);
        let io_error = |path: &Path| {
            let path = path.display().to_string();
            move |source| StoreError::DataDir { path, source }
        };
        let token = NewToken {
            id: format!("tok_{}", uuid::Uuid::now_v7().simple()),
            secret: generate_secret(),
        };
        crate::private_files::write_private_atomically(&staged, &token.secret)
            .map_err(io_error(&staged))?;
        let revoked = match self.replace_operator_token(&token).await {
            Ok(revoked) => revoked,
            Err(error) => {
                // Never valid: nobody must take it for the operator token.
                let _ = std::fs::remove_file(&staged);
                return Err(error);
            }
        };
        std::fs::rename(&staged, &path).map_err(io_error(&path))?;
        std::fs::File::open(data_dir)
            .and_then(|dir| dir.sync_all())
            .map_err(io_error(data_dir))?;
        Ok(RotatedOperatorToken { token, revoked })
    }

    /// Revokes every live operator token and inserts `token`, in one transaction.
    async fn replace_operator_token(&self, token: &NewToken) -> Result<Vec<String>, StoreError> {
        let now = now_micros();
        with_write_pool!(&self.db, pool => {
            let mut tx = pool.begin().await?;
            let revoked: Vec<String> = sqlx::query_scalar(
                "UPDATE tokens SET revoked_at = $1 WHERE role = 'operator' \
                 AND revoked_at IS NULL RETURNING id",
            )
            .bind(now)
            .fetch_all(&mut *tx)
            .await?;
            let inserted = sqlx::query(
                "INSERT INTO tokens (id, token_hash, role, org_id, name, created_at, principal, \
                 principal_kind) VALUES ($1, $2, 'operator', NULL, 'platform operator', $3, \
                 'platform operator', 'user') ON CONFLICT DO NOTHING",
            )
            .bind(&token.id)
            .bind(hash(&token.secret))
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if inserted != 1 {
                // A concurrent rotation committed a live operator token first.
                tx.rollback().await?;
                return Err(StoreError::OperatorTokenRace);
            }
            tx.commit().await?;
            Ok(revoked)
        })
    }

    /// Completes a rotation interrupted after its commit: the staged token becomes the
    /// file if it is the live operator token, and is removed otherwise.
    async fn finish_interrupted_rotation(&self, data_dir: &Path) -> Result<(), StoreError> {
        let staged = data_dir.join(STAGED_OPERATOR_TOKEN_FILE);
        let io_error = |source| StoreError::DataDir {
            path: staged.display().to_string(),
            source,
        };
        let secret = match std::fs::read_to_string(&staged) {
            Ok(text) => zeroize::Zeroizing::new(text.trim().to_owned()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(error) => return Err(io_error(error)),
        };
        let live: i64 = with_write_pool!(&self.db, pool => {
            sqlx::query_scalar(
                "SELECT COUNT(*) FROM tokens WHERE token_hash = $1 AND role = 'operator' \
                 AND revoked_at IS NULL",
            )
            .bind(hash(&secret))
            .fetch_one(pool)
            .await?
        });
        if live == 1 {
            std::fs::rename(&staged, data_dir.join(OPERATOR_TOKEN_FILE)).map_err(io_error)?;
            tracing::warn!("finished an interrupted operator token rotation");
        } else {
            std::fs::remove_file(&staged).map_err(io_error)?;
        }
        Ok(())
    }

    /// Makes sure an operator token exists. The first instance to start on a database
    /// creates it and writes it to `DIR/operator.token` with 0600 permissions; later starts
    /// leave both alone. Returns whether this call created it. The token is never logged.
    pub async fn ensure_operator_token(&self, data_dir: &Path) -> Result<bool, StoreError> {
        let exists: i64 = with_read_pool!(&self.db, pool => {
            sqlx::query_scalar("SELECT COUNT(*) FROM tokens WHERE role = 'operator'")
                .fetch_one(pool)
                .await?
        });
        let path = data_dir.join(OPERATOR_TOKEN_FILE);
        let io_error = |source| StoreError::DataDir {
            path: path.display().to_string(),
            source,
        };
        // A token file left readable (an older version, a copy by hand) is taken back.
        crate::private_files::restrict_if_present(&path).map_err(io_error)?;
        self.finish_interrupted_rotation(data_dir).await?;
        if exists > 0 {
            return Ok(false);
        }
        // Write the file before the hash, so a crash in between never leaves a token that
        // nobody holds. An existing file (a new database on an old data directory) is kept.
        let (secret, wrote_file) = match std::fs::read_to_string(&path) {
            Ok(existing) if !existing.trim().is_empty() => (existing.trim().to_owned(), false),
            _ => {
                let secret = generate_secret();
                crate::private_files::write_private_atomically(&path, &secret).map_err(io_error)?;
                (secret, true)
            }
        };
        let token = NewToken {
            id: format!("tok_{}", uuid::Uuid::now_v7().simple()),
            secret,
        };
        let inserted = self
            .insert(&token, Role::Operator, None, "platform operator")
            .await?;
        if !inserted && wrote_file {
            // Another instance created the operator token first; ours was never valid.
            std::fs::remove_file(&path).map_err(io_error)?;
        }
        Ok(inserted)
    }
}

/// Equality whose time depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn parse_grant(principal: &str, permission: &str, scope: &str) -> Option<Grant> {
    Some(Grant {
        principal: PrincipalName::parse(principal).ok()?,
        permission: permission.parse().ok()?,
        scope: if scope.is_empty() {
            None
        } else {
            Some(ScopeId::parse(scope).ok()?)
        },
    })
}

#[cfg(test)]
mod constant_time_tests {
    use super::constant_time_eq;

    #[test]
    fn equal_only_when_every_byte_is() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }
}
