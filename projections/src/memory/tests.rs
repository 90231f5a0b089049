//! Unit tests of the tree: the cascade, causes and destruction from memory, key versions,
//! grants, and applying idempotently.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use cqrs_es::DomainEvent;
use ekm_domain::metadata::{Actor, ActorKind, EventMetadata};
use ekm_domain::{KeyVersion, Provider, Reason, ScopeEvent, ScopeName, UnavailableReason};

use super::*;

/// Hands out positions and per-aggregate sequences, as the event log would.
#[derive(Default)]
struct Log {
    position: i64,
    sequences: HashMap<ScopeId, i64>,
}

impl Log {
    fn event(&mut self, id: ScopeId, event: &ScopeEvent) -> StoredEvent {
        self.position += 1;
        let sequence = self.sequences.entry(id).or_default();
        *sequence += 1;
        let metadata = EventMetadata {
            actor: Actor {
                kind: ActorKind::User,
                id: "alice".into(),
            },
            request_id: "req".into(),
            reason: Reason::parse("incident 7").ok(),
            source_address: None,
            recorded_at: "2026-11-30T00:00:00Z".into(),
            location: None,
        };
        StoredEvent {
            position: self.position,
            recorded_at: chrono::Utc::now(),
            aggregate_type: "scope".into(),
            aggregate_id: id.to_string(),
            sequence: *sequence,
            event_type: event.event_type(),
            event_version: "1".into(),
            payload: serde_json::to_string(event).unwrap(),
            metadata: serde_json::to_string(&metadata.to_map()).unwrap(),
        }
    }
}

fn ready() -> MemoryTree {
    let tree = MemoryTree::new();
    tree.state.write().unwrap().phase = Phase::Ready;
    tree
}

/// An organization with a team and a thread in the team.
struct Given {
    tree: MemoryTree,
    log: Log,
    org: ScopeId,
    team: ScopeId,
    thread: ScopeId,
}

fn given() -> Given {
    let mut log = Log::default();
    let org = OrgId::generate();
    let team = ScopeId::generate();
    let thread = ScopeId::generate();
    let name = |n: &str| ScopeName::parse(n).unwrap();
    let events = vec![
        log.event(
            org.scope_id(),
            &ScopeEvent::OrganizationCreated {
                org_id: org,
                name: name("acme"),
                plan: Plan::Enterprise,
                tier: Tier::Managed,
                key_version: KeyVersion::FIRST,
                admin_token_id: None,
                key_fingerprint: Some("00112233445566778899aabbccddeeff".into()),
            },
        ),
        log.event(
            team,
            &ScopeEvent::ScopeCreated {
                scope_id: team,
                kind: ScopeKind::Team,
                name: name("research"),
                parent_id: org.scope_id(),
                org_id: org,
                path: vec![org.scope_id(), team],
                key_version: KeyVersion::FIRST,
                key_fingerprint: Some("not-hex".into()),
            },
        ),
        log.event(
            thread,
            &ScopeEvent::ScopeCreated {
                scope_id: thread,
                kind: ScopeKind::Thread,
                name: name("chat"),
                parent_id: team,
                org_id: org,
                path: vec![org.scope_id(), team, thread],
                key_version: KeyVersion::FIRST,
                key_fingerprint: None,
            },
        ),
    ];
    let tree = ready();
    assert_eq!(
        tree.apply(&events).unwrap(),
        vec![Applied::Yes, Applied::Yes, Applied::Yes]
    );
    Given {
        tree,
        log,
        org: org.scope_id(),
        team,
        thread,
    }
}

impl Given {
    fn when(&mut self, id: ScopeId, event: ScopeEvent) -> StoredEvent {
        let stored = self.log.event(id, &event);
        assert_eq!(
            self.tree.apply(std::slice::from_ref(&stored)).unwrap(),
            [Applied::Yes]
        );
        stored
    }

    fn snapshot(&self, id: ScopeId) -> ScopeSnapshot {
        self.tree.snapshot(id).unwrap().unwrap()
    }
}

#[test]
fn snapshot_shows_path_plan_and_key_versions_when_nothing_changed() {
    let given = given();
    let thread = given.snapshot(given.thread);
    assert_eq!(thread.scope.path, vec![given.org, given.team, given.thread]);
    assert_eq!(thread.scope.org_id.scope_id(), given.org);
    assert_eq!(thread.scope.parent_id, Some(given.team));
    assert_eq!(thread.scope.name, "chat");
    assert_eq!(thread.effective, Effective::Active);
    assert_eq!(thread.inherited, Effective::Active);
    assert_eq!(thread.cause, None);
    assert_eq!(
        (thread.org_plan, thread.org_tier),
        (Plan::Enterprise, Tier::Managed)
    );
    assert_eq!(thread.scope.plan, None);
    let org = given.snapshot(given.org);
    assert_eq!(org.scope.plan, Some(Plan::Enterprise));
    assert_eq!(
        org.key_versions[0].fingerprint.as_deref(),
        Some("00112233445566778899aabbccddeeff")
    );
    let team = given.snapshot(given.team);
    assert_eq!(team.key_versions[0].fingerprint.as_deref(), Some("not-hex"));
}

#[test]
fn pause_of_a_team_cascades_to_its_thread_with_the_team_as_cause() {
    let mut given = given();
    let paused = given.when(given.team, ScopeEvent::ScopePaused {});
    let thread = given.snapshot(given.thread);
    assert_eq!(thread.effective, Effective::Paused { by: given.team });
    assert_eq!(thread.inherited, Effective::Paused { by: given.team });
    let cause = thread.cause.unwrap();
    assert_eq!(
        (cause.scope_id, cause.name.as_str()),
        (given.team, "research")
    );
    let change = cause.change.unwrap();
    assert_eq!(change.event, "ScopePaused");
    assert_eq!(change.position, paused.position);
    assert_eq!(change.actor, "user:alice");
    assert_eq!(change.reason.as_deref(), Some("incident 7"));
    // The thread's own state and version are untouched; the team's moved.
    assert_eq!(thread.scope.own_state, OwnState::Active);
    assert_eq!(given.snapshot(given.team).scope.version, 2);
    // Resumed: active again, and the change is the resume.
    given.when(given.team, ScopeEvent::ScopeResumed {});
    let thread = given.snapshot(given.thread);
    assert_eq!(thread.effective, Effective::Active);
    assert_eq!(
        given.snapshot(given.team).scope.state_change.unwrap().event,
        "ScopeResumed"
    );
}

#[test]
fn revoke_beats_a_higher_pause_and_the_highest_revoke_is_the_cause() {
    let mut given = given();
    given.when(given.org, ScopeEvent::ScopePaused {});
    given.when(
        given.thread,
        ScopeEvent::ScopeRevoked { requested_by: None },
    );
    let thread = given.snapshot(given.thread);
    assert_eq!(thread.effective, Effective::Revoked { by: given.thread });
    assert_eq!(thread.inherited, Effective::Paused { by: given.org });
    given.when(given.team, ScopeEvent::ScopeRevoked { requested_by: None });
    let thread = given.snapshot(given.thread);
    assert_eq!(thread.effective, Effective::Revoked { by: given.team });
    assert_eq!(thread.cause.unwrap().scope_id, given.team);
    // The destruction is the highest revoke's, pending until its re-key completes.
    let destruction = thread.destruction.unwrap();
    assert_eq!(destruction.revoked, given.team);
    assert_eq!(destruction.live_done_position, None);
    given.when(
        given.team,
        ScopeEvent::RevocationRekeyStarted { ancestors: vec![] },
    );
    let done = given.when(
        given.team,
        ScopeEvent::RevocationRekeyCompleted { rewrapped: 1 },
    );
    let thread = given.snapshot(given.thread);
    assert_eq!(
        thread.destruction.unwrap().live_done_position,
        Some(done.position)
    );
    let team = given.snapshot(given.team);
    assert_eq!(team.scope.rekey_state.as_deref(), Some("done"));
}

#[test]
fn an_unusable_master_key_makes_every_scope_unavailable_with_the_org_as_cause() {
    let mut given = given();
    let master = MasterKeyRef {
        provider: Provider::AwsKms,
        key_id: "alias/acme".into(),
        region: Some("eu-west-1".into()),
        endpoint_url: None,
    };
    given.when(
        given.org,
        ScopeEvent::OrganizationMasterKeyChanged {
            from: None,
            to: Some(master.clone()),
            tier_from: Tier::Managed,
            tier_to: Tier::Byok,
            rewrapped: vec![],
        },
    );
    assert_eq!(given.snapshot(given.thread).effective, Effective::Active);
    assert_eq!(given.snapshot(given.thread).org_tier, Tier::Byok);
    given.when(
        given.org,
        ScopeEvent::OrganizationMasterKeyHealthChanged {
            health: KeyHealth::Unavailable,
            reason: Some(UnavailableReason::Disabled),
            detail: "disabled by the customer".into(),
        },
    );
    let thread = given.snapshot(given.thread);
    assert_eq!(thread.effective, Effective::Unavailable { by: given.org });
    let change = thread.cause.unwrap().change.unwrap();
    assert_eq!(change.event, "OrganizationMasterKeyHealthChanged");
    assert_eq!(change.actor, "system");
    assert_eq!(change.reason.as_deref(), Some("disabled"));
    let org = given.snapshot(given.org);
    assert_eq!(org.scope.master_key, Some(master));
    assert_eq!(
        org.scope.master_detail.as_deref(),
        Some("disabled by the customer")
    );
    // A revoke below still wins over the master key.
    given.when(given.team, ScopeEvent::ScopeRevoked { requested_by: None });
    assert_eq!(
        given.snapshot(given.thread).effective,
        Effective::Revoked { by: given.team }
    );
}

#[test]
fn rotation_adds_a_version_and_retiring_marks_the_older_ones() {
    let mut given = given();
    given.when(
        given.thread,
        ScopeEvent::ScopeKeyRotated {
            key_version: KeyVersion::new(2),
            key_fingerprint: Some("ffeeddccbbaa99887766554433221100".into()),
        },
    );
    given.when(
        given.thread,
        ScopeEvent::ScopeKeyVersionsRetired {
            below: KeyVersion::new(2),
        },
    );
    let thread = given.snapshot(given.thread);
    assert_eq!(thread.scope.key_version, 2);
    let versions: Vec<(u32, bool)> = thread
        .key_versions
        .iter()
        .map(|k| (k.version, k.retired))
        .collect();
    assert_eq!(versions, [(1, true), (2, false)]);
}

#[test]
fn an_event_applied_twice_or_out_of_order_changes_nothing() {
    let mut given = given();
    let paused = given.when(given.team, ScopeEvent::ScopePaused {});
    // The projector tells it again after the command handed it over.
    assert_eq!(
        given.tree.apply(std::slice::from_ref(&paused)).unwrap(),
        [Applied::Skipped]
    );
    // A command's event whose predecessor (another instance's) has not arrived: left
    // for the projector, which tells both in order.
    let resumed = given.log.event(given.team, &ScopeEvent::ScopeResumed {});
    let paused_again = given.log.event(given.team, &ScopeEvent::ScopePaused {});
    assert_eq!(
        given
            .tree
            .apply(std::slice::from_ref(&paused_again))
            .unwrap(),
        [Applied::Gap]
    );
    assert_eq!(
        given.snapshot(given.thread).effective,
        Effective::Paused { by: given.team }
    );
    given.tree.told(&[resumed, paused_again.clone()]);
    let team = given.snapshot(given.team);
    assert_eq!(team.scope.version, 4);
    assert_eq!(
        team.scope.state_change.unwrap().position,
        paused_again.position
    );
    // A child whose parent is unknown here yet: also left for the projector.
    let orphan = ScopeId::generate();
    let unknown_parent = ScopeId::generate();
    let created = given.log.event(
        orphan,
        &ScopeEvent::ScopeCreated {
            scope_id: orphan,
            kind: ScopeKind::Thread,
            name: ScopeName::parse("x").unwrap(),
            parent_id: unknown_parent,
            org_id: OrgId::of_root(given.org),
            path: vec![given.org, unknown_parent, orphan],
            key_version: KeyVersion::FIRST,
            key_fingerprint: None,
        },
    );
    assert_eq!(given.tree.apply(&[created]).unwrap(), [Applied::Gap]);
    assert!(given.tree.snapshot(orphan).unwrap().is_none());
}

#[test]
fn grants_follow_grant_and_revoke_in_position_order() {
    let mut given = given();
    let principal = PrincipalName::parse("svc").unwrap();
    let grant = |scope| ScopeEvent::PermissionGranted {
        principal: principal.clone(),
        permission: Permission::DataUse,
        scope_id: scope,
        expires_at: None,
    };
    given.when(given.org, grant(Some(given.team)));
    given.when(given.org, grant(None));
    let org = OrgId::of_root(given.org);
    let scopes: Vec<Option<ScopeId>> = given
        .tree
        .grants_of(org, "svc", 0)
        .0
        .iter()
        .map(|g| g.scope)
        .collect();
    assert_eq!(scopes, [Some(given.team), None]);
    given.when(
        given.org,
        ScopeEvent::PermissionRevoked {
            principal: principal.clone(),
            permission: Permission::DataUse,
            scope_id: Some(given.team),
        },
    );
    let (left, _) = given.tree.grants_of(org, "svc", 0);
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].scope, None);
    assert!(given.tree.grants_of(org, "someone-else", 0).0.is_empty());
    // Every event of the organization moves its version (the ETag), grants included.
    assert_eq!(given.snapshot(given.org).scope.version, 4);
}

#[test]
fn a_grant_stops_counting_at_its_expiry_and_a_grant_again_replaces_it() {
    // Given a grant until 2040 on the whole organization
    let mut given = given();
    let org = OrgId::of_root(given.org);
    let principal = PrincipalName::parse("svc").unwrap();
    let grant = |expires_at: Option<&str>| ScopeEvent::PermissionGranted {
        principal: principal.clone(),
        permission: Permission::DataUse,
        scope_id: None,
        expires_at: expires_at.map(str::to_owned),
    };
    given.when(given.org, grant(Some("2040-01-01T00:00:00Z")));
    let expiry = chrono::DateTime::parse_from_rfc3339("2040-01-01T00:00:00Z")
        .unwrap()
        .timestamp_micros();
    // Then it counts until that instant, which is when the principal must be looked up
    // again, and not from it on
    let (grants, until) = given.tree.grants_of(org, "svc", expiry - 1);
    assert_eq!((grants.len(), until), (1, Some(expiry)));
    assert_eq!(given.tree.grants_of(org, "svc", expiry), (vec![], None));
    // When granted again for good, then one grant, which does not expire
    given.when(given.org, grant(None));
    let (grants, until) = given.tree.grants_of(org, "svc", expiry + 1);
    assert_eq!((grants.len(), until), (1, None));
    assert_eq!(given.tree.grant_records().len(), 1);
    // When granted with a time that cannot be read (a row written around the aggregate),
    // then it counts as expired
    given.when(given.org, grant(Some("soon")));
    assert_eq!(given.tree.grants_of(org, "svc", 1), (vec![], None));
}

#[test]
fn events_told_while_loading_are_kept_and_none_before() {
    let tree = MemoryTree::new();
    let mut given = given();
    let paused = given.log.event(given.team, &ScopeEvent::ScopePaused {});
    // Not in use (SQL reads): nothing accumulates.
    tree.told(std::slice::from_ref(&paused));
    assert_eq!(tree.state.read().unwrap().pending.len(), 0);
    // Loading: kept for after the rows.
    tree.state.write().unwrap().phase = Phase::Loading;
    tree.told(std::slice::from_ref(&paused));
    assert!(!tree.is_ready());
    assert!(tree.snapshot(given.team).unwrap().is_none());
    assert_eq!(tree.state.read().unwrap().pending.len(), 1);
}

#[test]
fn plan_floor_and_justification_policy_reach_the_snapshots() {
    use ekm_domain::{JustificationCode, JustificationPolicy};
    let mut given = given();
    given.when(
        given.org,
        ScopeEvent::OrganizationPlanChanged {
            from: Plan::Enterprise,
            to: Plan::Standard,
        },
    );
    assert_eq!(given.snapshot(given.thread).org_plan, Plan::Standard);
    given.when(
        given.team,
        ScopeEvent::ScopeMinDecryptionVersionSet {
            version: KeyVersion::new(3),
        },
    );
    assert_eq!(given.snapshot(given.team).scope.min_decryption_version, 3);
    assert_eq!(given.snapshot(given.thread).scope.min_decryption_version, 1);
    let code = JustificationCode::parse("agent_run").unwrap();
    given.when(
        given.team,
        ScopeEvent::ScopeJustificationPolicySet {
            required: true,
            allowed: vec![code.clone()],
        },
    );
    let thread = given.snapshot(given.thread);
    assert_eq!(thread.justification.required_by, Some(given.team));
    assert_eq!(thread.justification.lists, vec![(given.team, vec![code])]);
    assert_eq!(thread.scope.justification, None);
    // Lifted, and the floor lowered: nothing of either is left.
    given.when(
        given.team,
        ScopeEvent::ScopeJustificationPolicySet {
            required: false,
            allowed: vec![],
        },
    );
    given.when(
        given.team,
        ScopeEvent::ScopeMinDecryptionVersionSet {
            version: KeyVersion::FIRST,
        },
    );
    let team = given.snapshot(given.team);
    assert_eq!(team.justification, Default::default());
    assert_eq!(team.scope.justification, None::<JustificationPolicy>);
    assert_eq!(team.scope.min_decryption_version, 1);
}

#[test]
fn rotations_fall_due_by_the_nearest_period_on_the_path_and_never_under_a_revoke() {
    let mut given = given();
    let day: i64 = 86_400_000_000;
    let now = chrono::Utc::now().timestamp_micros();
    let ids = |due: &[RotationDue]| {
        let mut ids: Vec<ScopeId> = due.iter().map(|d| d.scope_id).collect();
        ids.sort();
        ids
    };
    // No period anywhere: nothing is ever due, nor listed.
    assert_eq!(given.tree.org_rotations(given.org, None, 10), vec![]);
    assert_eq!(
        given.tree.rotations_due(now + 400 * day, 100),
        (vec![], None)
    );
    // The organization rotates daily; the team overrides with 30 days, and its thread
    // inherits the team's.
    given.when(
        given.org,
        ScopeEvent::ScopeRotationPeriodSet {
            period: Some("P1D".into()),
        },
    );
    given.when(
        given.team,
        ScopeEvent::ScopeRotationPeriodSet {
            period: Some("P30D".into()),
        },
    );
    // Listed: each key's next rotation, soonest first, page by page.
    let listed = given.tree.org_rotations(given.org, None, 10);
    assert_eq!(listed.len(), 3);
    assert_eq!(listed[0].scope_id, given.org);
    let first = &listed[0];
    let after = (
        first.due_at,
        first.scope_id.to_string(),
        ROTATION.to_owned(),
        first.from.get().to_string(),
    );
    assert_eq!(
        given.tree.org_rotations(given.org, Some(after), 10),
        listed[1..].to_vec()
    );
    assert_eq!(
        given.tree.org_rotations(ScopeId::generate(), None, 10),
        vec![]
    );
    let (due, next) = given.tree.rotations_due(now + 2 * day, 100);
    assert_eq!(ids(&due), vec![given.org]);
    assert_eq!(due[0].from, KeyVersion::FIRST);
    assert_eq!(due[0].period, "P1D");
    let next = next.unwrap();
    assert!(next > now + 29 * day && next <= now + 31 * day, "{next}");
    let (due, _) = given.tree.rotations_due(now + 31 * day, 100);
    let mut expected = vec![given.org, given.team, given.thread];
    expected.sort();
    assert_eq!(ids(&due), expected);
    // At most `limit`, and the next look is at once.
    let (due, next) = given.tree.rotations_due(now + 31 * day, 1);
    assert_eq!((due.len(), next), (1, Some(now + 31 * day)));
    // From any starting point the same keys; those skipped (in backoff) do not count
    // against the limit.
    for start in 0..5 {
        let (due, _) = given
            .tree
            .rotations_due_from(now + 31 * day, 100, start, &|_, _| false);
        assert_eq!(ids(&due), expected);
    }
    let org = given.org;
    let (due, _) = given
        .tree
        .rotations_due_from(now + 31 * day, 2, 0, &|id, _| id == org);
    let mut others = vec![given.team, given.thread];
    others.sort();
    assert_eq!(ids(&due), others);
    // An organization whose customer key is unavailable mints nothing: nothing is due.
    given.when(
        given.org,
        ScopeEvent::OrganizationMasterKeyHealthChanged {
            health: KeyHealth::Unavailable,
            reason: Some(UnavailableReason::Disabled),
            detail: "disabled".into(),
        },
    );
    assert_eq!(given.tree.rotations_due(now + 31 * day, 100).0, vec![]);
    assert_eq!(given.tree.org_rotations(given.org, None, 10), vec![]);
    given.when(
        given.org,
        ScopeEvent::OrganizationMasterKeyHealthChanged {
            health: KeyHealth::Available,
            reason: None,
            detail: "back".into(),
        },
    );
    // Rotated: its new version is due a period after its creation.
    given.when(
        given.org,
        ScopeEvent::ScopeKeyRotated {
            key_version: KeyVersion::new(2),
            key_fingerprint: None,
        },
    );
    let hour = day / 24;
    let (due, _) = given.tree.rotations_due(now + day - hour, 100);
    assert_eq!(due.len(), 0, "{due:?}");
    let (due, _) = given.tree.rotations_due(now + day + hour, 100);
    assert_eq!(
        (ids(&due), due[0].from),
        (vec![given.org], KeyVersion::new(2))
    );
    // A period that cannot be read sets nothing: the thread inherits the team's.
    given.when(
        given.thread,
        ScopeEvent::ScopeRotationPeriodSet {
            period: Some("soon".into()),
        },
    );
    let (due, _) = given.tree.rotations_due(now + 31 * day, 100);
    assert!(ids(&due).contains(&given.thread));
    // A revoked team rotates nothing below it; lifting the team's period makes its
    // subtree inherit the organization's again.
    given.when(
        given.team,
        ScopeEvent::ScopeRotationPeriodSet { period: None },
    );
    let (due, _) = given.tree.rotations_due(now + day + hour, 100);
    let mut expected = vec![given.org, given.team, given.thread];
    expected.sort();
    assert_eq!(ids(&due), expected);
    given.when(given.team, ScopeEvent::ScopeRevoked { requested_by: None });
    let (due, _) = given.tree.rotations_due(now + 400 * day, 100);
    assert_eq!(ids(&due), vec![given.org]);
}
