//! Histories written straight into `events` with SQL (orders of magnitude faster than
//! commands; the position trigger still numbers every row): the creation events of a tree,
//! and a batch that inserts events with one statement.

use std::collections::HashMap;

use anyhow::Context;
use ekm_domain::{KeyVersion, OrgId, Plan, ScopeEvent, ScopeId, ScopeKind, ScopeName, Tier};

/// An enterprise organization on the managed tier.
pub(crate) fn org_created(org: OrgId, name: &ScopeName) -> ScopeEvent {
    ScopeEvent::OrganizationCreated {
        org_id: org,
        name: name.clone(),
        plan: Plan::Enterprise,
        tier: Tier::Managed,
        key_version: KeyVersion::FIRST,
        admin_token_id: None,
        key_fingerprint: None,
    }
}

/// A scope whose path (ids from the organization down) ends with itself.
pub(crate) fn scope_created(
    kind: ScopeKind,
    org: OrgId,
    path: Vec<ScopeId>,
    name: &ScopeName,
) -> anyhow::Result<ScopeEvent> {
    let [.., parent_id, scope_id] = path[..] else {
        anyhow::bail!("a scope's path holds its parent and itself")
    };
    Ok(ScopeEvent::ScopeCreated {
        scope_id,
        kind,
        name: name.clone(),
        parent_id,
        org_id: org,
        path,
        key_version: KeyVersion::FIRST,
        key_fingerprint: None,
    })
}

/// Events waiting to be inserted, as one array per column.
#[derive(Default)]
pub(crate) struct EventBatch {
    ids: Vec<String>,
    sequences: Vec<i64>,
    types: Vec<String>,
    payloads: Vec<String>,
    metadata: Vec<String>,
}

impl EventBatch {
    pub(crate) fn push(
        &mut self,
        id: String,
        sequence: i64,
        event_type: &str,
        event: &ScopeEvent,
        metadata: HashMap<String, String>,
    ) -> anyhow::Result<()> {
        self.ids.push(id);
        self.sequences.push(sequence);
        self.types.push(event_type.to_owned());
        self.payloads.push(serde_json::to_string(event)?);
        self.metadata.push(serde_json::to_string(&metadata)?);
        Ok(())
    }

    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }

    /// Inserts the events in the order they were pushed, and empties the batch.
    pub(crate) async fn flush(&mut self, pool: &sqlx::PgPool) -> anyhow::Result<()> {
        if self.ids.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
             SELECT 'scope', id, seq, ty, '1', CAST(payload AS json), CAST(meta AS json) \
             FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[]) \
             WITH ORDINALITY AS t(id, seq, ty, payload, meta, n) ORDER BY n",
        )
        .bind(&self.ids)
        .bind(&self.sequences)
        .bind(&self.types)
        .bind(&self.payloads)
        .bind(&self.metadata)
        .execute(pool)
        .await
        .context("seed events")?;
        *self = EventBatch::default();
        Ok(())
    }
}
