//! The in-memory scope tree answers exactly what the SQL read models answer: after random
//! command histories, through two instances on one PostgreSQL database (each instance's
//! tree fed by its own projector), with a third tree loaded from the rows while commands
//! keep committing, after every event is handed to a tree a second time, and (PostgreSQL)
//! after the read models are rebuilt from the log.

use std::collections::BTreeSet;
use std::sync::Arc;

use ekm_domain::{
    Grant, KeyVersion, Permission, Plan, PrincipalName, ScopeId, ScopeKind, ScopeName, Tier,
};
use ekm_projections::{Applied, GrantRecord, MemoryTree, ScopeSnapshot};
use ekm_service::app::Action;
use ekm_service::scheduler::Scheduler;
use ekm_service::App;
use ekm_store::Db;
use proptest::prelude::*;

use crate::harness::{metadata, Backend, Options, TestApp};

#[derive(Clone, Debug)]
enum Op {
    Create {
        parent: usize,
        kind: usize,
    },
    Pause(usize),
    Resume(usize),
    Revoke(usize),
    /// A revoke with a waiting period (it never falls due here), and its cancellation.
    RevokeLater(usize),
    CancelRevocation(usize),
    /// A rotation period set (or lifted) on a scope.
    RotationPeriod(usize, bool),
    Rotate(usize),
    Retire(usize),
    Tier(bool),
    Grant {
        principal: u8,
        permission: usize,
        scope: Option<usize>,
        /// One of three expiries (past already, in 2041, in 2042), or none.
        expires: Option<u8>,
    },
    Ungrant {
        principal: u8,
        permission: usize,
        scope: Option<usize>,
    },
}

/// An operation, and which instance runs it.
fn op() -> impl Strategy<Value = (bool, Op)> {
    let op = prop_oneof![
        4 => (any::<usize>(), 0..4usize).prop_map(|(parent, kind)| Op::Create { parent, kind }),
        3 => any::<usize>().prop_map(Op::Pause),
        3 => any::<usize>().prop_map(Op::Resume),
        1 => any::<usize>().prop_map(Op::Revoke),
        1 => any::<usize>().prop_map(Op::RevokeLater),
        1 => any::<usize>().prop_map(Op::CancelRevocation),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(i, set)| Op::RotationPeriod(i, set)),
        1 => any::<usize>().prop_map(Op::Rotate),
        1 => any::<usize>().prop_map(Op::Retire),
        1 => any::<bool>().prop_map(Op::Tier),
        2 => (0..3u8, 0..4usize, proptest::option::of(any::<usize>()), proptest::option::of(0..3u8))
            .prop_map(|(principal, permission, scope, expires)| Op::Grant { principal, permission, scope, expires }),
        2 => (0..3u8, 0..4usize, proptest::option::of(any::<usize>()))
            .prop_map(|(principal, permission, scope)| Op::Ungrant { principal, permission, scope }),
    ];
    (any::<bool>(), op)
}

/// Runs `ops` (each on the instance it names, when there are two). Refusals are part of
/// a random history; only what was recorded matters here.
async fn run_ops(
    apps: &[&App],
    org: ScopeId,
    scopes: &mut Vec<(ScopeId, ScopeKind)>,
    ops: &[(bool, Op)],
) {
    let kinds = [
        ScopeKind::Team,
        ScopeKind::Thread,
        ScopeKind::McpConnector,
        ScopeKind::Agent,
    ];
    let name = ScopeName::parse("n").unwrap();
    for (second, op) in ops {
        let app = apps[usize::from(*second) % apps.len()];
        let pick = |i: &usize| scopes[i % scopes.len()].0;
        let grant = |principal: &u8, permission: &usize, scope: &Option<usize>| Grant {
            principal: PrincipalName::parse(&format!("p{principal}")).unwrap(),
            permission: Permission::ALL[*permission],
            scope: scope.as_ref().map(pick),
        };
        let action = match op {
            Op::Create { parent, kind } => {
                let parent = pick(parent);
                let Ok(Some(snapshot)) = app.scope(parent).await else {
                    continue;
                };
                if let Ok(outcome) = app
                    .create_scope(&snapshot, kinds[*kind], name.clone(), &metadata())
                    .await
                {
                    scopes.push((outcome.scope.scope.id, kinds[*kind]));
                }
                continue;
            }
            Op::Pause(i) => (pick(i), Action::Pause),
            Op::Resume(i) => (pick(i), Action::Resume),
            Op::Revoke(i) => {
                let id = pick(i);
                if id == org {
                    continue;
                }
                let confirm = id.to_string();
                (id, Action::Revoke { confirm })
            }
            Op::RevokeLater(i) => {
                let id = pick(i);
                let action = Action::ScheduleRevocation {
                    confirm: id.to_string(),
                    due_at: "2099-01-01T00:00:00.000000Z".to_owned(),
                    requested_by: "user:tester".to_owned(),
                };
                (id, action)
            }
            Op::CancelRevocation(i) => (pick(i), Action::CancelRevocation { now: rfc3339_now() }),
            Op::RotationPeriod(i, set) => (
                pick(i),
                Action::SetRotationPeriod(set.then(|| "P30D".to_owned())),
            ),
            Op::Rotate(i) => (pick(i), Action::Rotate),
            Op::Retire(i) => {
                let id = pick(i);
                let Ok(Some(snapshot)) = app.scope(id).await else {
                    continue;
                };
                let below = KeyVersion::new(snapshot.scope.key_version);
                (id, Action::RetireKeyVersions(below))
            }
            Op::Tier(managed) => {
                let tier = if *managed {
                    Tier::Managed
                } else {
                    Tier::Default
                };
                (org, Action::ChangeTier(tier))
            }
            Op::Grant {
                principal,
                permission,
                scope,
                expires,
            } => (
                org,
                Action::Grant {
                    grant: grant(principal, permission, scope),
                    expires_at: expires.map(|e| match e {
                        0 => "2001-01-01T00:00:00.000000Z".to_owned(),
                        e => format!("20{}-01-01T00:00:00.000000Z", 40 + e),
                    }),
                },
            ),
            Op::Ungrant {
                principal,
                permission,
                scope,
            } => (org, Action::Ungrant(grant(principal, permission, scope))),
        };
        drop(app.act(action.0, action.1, &metadata(), None).await);
    }
}

async fn sql_ids(db: &Db) -> Vec<ScopeId> {
    let ids: Vec<String> = ekm_store::with_read_pool!(db, pool => {
        sqlx::query_scalar("SELECT id FROM scope_view ORDER BY id").fetch_all(pool).await.unwrap()
    });
    ids.iter().map(|id| ScopeId::parse(id).unwrap()).collect()
}

async fn sql_grants(db: &Db) -> Vec<GrantRecord> {
    type Row = (
        String,
        String,
        String,
        String,
        i64,
        i64,
        String,
        Option<i64>,
    );
    let rows: Vec<Row> = ekm_store::with_read_pool!(db, pool => {
        sqlx::query_as("SELECT org_id, principal, permission, scope_id, granted_position, \
                        granted_at, granted_by, expires_at FROM grants_view ORDER BY granted_position")
            .fetch_all(pool).await.unwrap()
    });
    rows.into_iter()
        .map(|r| GrantRecord {
            org_id: ScopeId::parse(&r.0).unwrap(),
            principal: r.1,
            permission: r.2,
            scope_id: r.3,
            granted_position: r.4,
            granted_at: r.5,
            granted_by: r.6,
            expires_at: r.7,
        })
        .collect()
}

/// A tree's snapshot with what `App::scope` adds from SQL (the master key's activation).
async fn filled(app: &App, tree: &MemoryTree, id: ScopeId) -> Option<ScopeSnapshot> {
    let mut snapshot = tree.snapshot(id).unwrap()?;
    if let Some(destruction) = snapshot.destruction.as_mut() {
        destruction.master_activated_position =
            app.read().master_key_activated_position().await.unwrap();
    }
    Some(snapshot)
}

/// Every tree holds exactly the scopes and grants of the read models, and answers every
/// scope exactly as `ReadModels::scope` does.
async fn assert_trees_equal_sql(
    apps: &[&App],
    trees: &[&MemoryTree],
    db: &Db,
) -> Result<(), TestCaseError> {
    let ids = sql_ids(db).await;
    let grants = sql_grants(db).await;
    for tree in trees {
        let held: BTreeSet<ScopeId> = tree.ids().into_iter().collect();
        prop_assert_eq!(&held, &ids.iter().copied().collect::<BTreeSet<_>>());
        prop_assert_eq!(&tree.grant_records(), &grants);
        for id in &ids {
            let sql = apps[0].read().scope(*id).await.unwrap();
            prop_assert!(sql.is_some());
            prop_assert_eq!(&filled(apps[0], tree, *id).await, &sql, "scope {}", id);
        }
    }
    // And `App::scope` (the API's read) answers from its tree the same.
    for app in apps {
        prop_assert!(app.memory().is_ready());
        for id in &ids {
            prop_assert_eq!(
                app.scope(*id).await.unwrap(),
                apps[0].read().scope(*id).await.unwrap()
            );
        }
    }
    Ok(())
}

async fn check(
    first: &TestApp,
    second: Option<&TestApp>,
    ops: Vec<(bool, Op)>,
) -> Result<(), TestCaseError> {
    let mut apps = vec![&first.app];
    apps.extend(second.map(|s| &s.app));
    let name = ScopeName::parse("org").unwrap();
    let (org, _) = first
        .app
        .create_org(name, Plan::Enterprise, Tier::Managed, &metadata())
        .await
        .unwrap();
    let org = org.scope.scope.id;
    let mut scopes = vec![(org, ScopeKind::Organization)];
    let (before, after) = ops.split_at(ops.len() / 2);
    run_ops(&apps, org, &mut scopes, before).await;
    // A third tree, loaded from the rows while the second half commits.
    let fresh = Arc::new(MemoryTree::new());
    first.app.projector().add_listener(fresh.listener());
    let (load, ()) = tokio::join!(
        fresh.load(&first.db, first.app.projector()),
        run_ops(&apps, org, &mut scopes, after)
    );
    load.unwrap();
    // The revokes' re-keys record events too, and a re-key starts only once its revoke is in
    // the read models: until nothing more is committed, let every instance hear every event
    // (everything committed, not only what lies below PostgreSQL's fence at one instant: a
    // notification or a runner transaction of the other instance may hold it briefly), then
    // finish the re-keys that became pending. (The background re-key jobs would otherwise
    // record events after the comparison began.)
    // The scheduler (grants given an expiry already past) is driven the same way: the
    // instances run neither job in the background here, so nothing commits once the loop
    // has seen the head stand still.
    let mut rekeyers = vec![&first.rekeyer];
    rekeyers.extend(second.map(|s| &s.rekeyer));
    let schedulers: Vec<_> = apps.iter().map(|a| Scheduler::new((*a).clone())).collect();
    loop {
        let head = first.db.committed_head().await.unwrap();
        for app in &apps {
            app.projector().catch_up_to(head).await.unwrap();
        }
        for rekeyer in &rekeyers {
            rekeyer.run_pending().await.unwrap();
        }
        for scheduler in &schedulers {
            scheduler.fire_due_now().await.unwrap();
        }
        if first.db.committed_head().await.unwrap() == head {
            break;
        }
    }
    let mut trees: Vec<&MemoryTree> = apps.iter().map(|a| a.memory().as_ref()).collect();
    trees.push(&fresh);
    assert_trees_equal_sql(&apps, &trees, &first.db).await?;
    // Every event handed over again (as a command does with its own): nothing changes.
    let events = first.db.events_after(0, 100_000).await.unwrap();
    for tree in &trees {
        let applied = tree.apply(&events).unwrap();
        prop_assert!(
            applied.iter().all(|a| *a == Applied::Skipped),
            "{:?}",
            applied
        );
    }
    assert_trees_equal_sql(&apps, &trees, &first.db).await?;
    // PostgreSQL (beside the running instances): a rebuild from the log yields the same rows,
    // so the trees equal the rebuilt read models too.
    if second.is_some() {
        let live = crate::rebuild::dump(&first.db).await;
        ekm_projections::rebuild(&first.db, &mut |_, _| {})
            .await
            .unwrap();
        prop_assert_eq!(crate::rebuild::dump(&first.db).await, live);
        assert_trees_equal_sql(&apps, &trees, &first.db).await?;
    }
    Ok(())
}

fn run(backend: Backend, cases: u32) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(cases));
    runner
        .run(&proptest::collection::vec(op(), 1..60), |ops| {
            runtime.block_on(async {
                // Neither background job runs: `check` drives them, so that nothing
                // commits while the trees are compared.
                let options = || Options {
                    rekey_in_background: false,
                    scheduler: false,
                    ..Options::default()
                };
                let first = TestApp::spawn_with(backend, options()).await;
                let second = match backend {
                    Backend::Postgres => Some(first.peer_with(options()).await),
                    Backend::Sqlite => None,
                };
                let result = check(&first, second.as_ref(), ops).await;
                if let Some(second) = second {
                    second.stop().await;
                }
                first.stop().await;
                result
            })
        })
        .unwrap();
}

#[test]
fn memory_tree_equals_the_read_models_when_histories_are_random_on_sqlite() {
    run(Backend::Sqlite, 12);
}

#[test]
fn memory_tree_equals_the_read_models_when_two_postgres_instances_share_histories() {
    run(Backend::Postgres, 10);
}

/// Two instances on one PostgreSQL database: a pause acknowledged by A shows in B's
/// `GET /v1/scopes/{id}` (answered from B's tree) within the documented bound (NOTIFY; the
/// poll interval is 500 ms), and a scope A creates is found on B within it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_scope_shows_the_pause_within_a_second_when_another_instance_paused() {
    let a = TestApp::spawn(Backend::Postgres).await;
    let b = a.peer().await;
    let (org, admin) = a.org("enterprise").await;
    let team = a.scope(&admin, "team", "research", &org).await;
    let thread = a.scope(&admin, "thread", "chat", &team).await;
    let path = format!("/v1/scopes/{thread}");
    // Created on A: B finds it within the bound.
    let started = std::time::Instant::now();
    while b.get(&path, &admin).await.status != 200 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(1),
            "B did not see A's scope within a second"
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(b.get(&path, &admin).await.body["effective_state"], "active");
    // Paused on A: B's read shows the cascade within the bound.
    assert_eq!(a.pause(&admin, &team).await.status, 200);
    let acknowledged = std::time::Instant::now();
    loop {
        let read = b.get(&path, &admin).await;
        assert_eq!(read.status, 200, "{}", read.body);
        if read.body["effective_state"] == "paused" {
            assert_eq!(read.body["cause"]["scope_id"], team.as_str());
            break;
        }
        assert!(
            acknowledged.elapsed() < std::time::Duration::from_secs(1),
            "B still read the thread active a second after A acknowledged the pause"
        );
        tokio::task::yield_now().await;
    }
    eprintln!(
        "cross-instance read: paused on B {:?} after A's acknowledgement",
        acknowledged.elapsed()
    );
    // B answered from its tree, not from SQL.
    assert!(b.app.memory().is_ready());
    let thread_id = ScopeId::parse(&thread).unwrap();
    assert_eq!(
        b.app
            .memory()
            .snapshot(thread_id)
            .unwrap()
            .unwrap()
            .effective,
        ekm_domain::Effective::Paused {
            by: ScopeId::parse(&team).unwrap()
        }
    );
    b.stop().await;
    a.stop().await;
}

/// A command decides on the aggregate this instance cached when its memory tree vouches for
/// it (no read of the store). When another instance changed the scope a moment ago and this
/// instance has not heard yet, that decision is stale: a pause that looks like "already
/// paused" must still pause, and a version the client read elsewhere must still be accepted.
/// The runners are held by a lock on their checkpoint rows, so A cannot hear B's resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pause_changes_the_scope_when_this_instance_has_not_heard_the_resume_yet() {
    let a = TestApp::spawn(Backend::Postgres).await;
    let b = a.peer().await;
    let (org, admin) = a.org("enterprise").await;
    for if_match in [false, true] {
        let team = a.scope(&admin, "team", &format!("t{if_match}"), &org).await;
        assert_eq!(a.pause(&admin, &team).await.status, 200);
        a.app.refresh().await.unwrap();
        b.app.refresh().await.unwrap();
        let team_id = ScopeId::parse(&team).unwrap();
        let hold = crate::harness::hold_runners(&a.db).await;
        // B resumes (answered from B's memory, its runner held)...
        let resumed = b.resume(&admin, &team).await;
        assert_eq!(resumed.status, 200, "{}", resumed.body);
        let version = resumed.body["version"].as_i64().unwrap();
        // ...A still believes the team paused...
        assert_eq!(
            a.app.memory().snapshot(team_id).unwrap().unwrap().effective,
            ekm_domain::Effective::Paused { by: team_id }
        );
        // ...and a pause on A pauses (with If-Match: with the version the client read from
        // B). Its answer waits for A's runner, which must first apply B's resume: held until
        // A's pause is committed, or until A answered without committing anything.
        let pausing = {
            let mut request = a
                .client
                .post(format!("{}/v1/scopes/{team}/pause", a.base))
                .bearer_auth(&admin)
                .json(&serde_json::json!({"reason": "again"}));
            if if_match {
                request = request.header("if-match", format!("\"{version}\""));
            }
            tokio::spawn(async move { request.send().await })
        };
        loop {
            let events = a.db.events_of(&team).await.unwrap();
            if events.len() as i64 > version || pausing.is_finished() {
                break;
            }
            tokio::task::yield_now().await;
        }
        hold.rollback().await.unwrap();
        let paused = pausing.await.unwrap().unwrap();
        assert_eq!(paused.status(), 200, "If-Match: {if_match}");
        let body: serde_json::Value = paused.json().await.unwrap();
        assert_eq!(body["own_state"], "paused", "If-Match: {if_match}: {body}");
        assert_eq!(body["version"], version + 1, "If-Match: {if_match}: {body}");
        a.app.refresh().await.unwrap();
        let events = a.db.events_of(&team).await.unwrap();
        let kinds: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(kinds.last(), Some(&"ScopePaused"), "{kinds:?}");
    }
    b.stop().await;
    a.stop().await;
}

/// An instance that loaded its tree from the rows (started after the organization existed)
/// knows each scope's sequence from its row. When it commits an event of a scope whose
/// previous event (another instance's) it has not heard yet, that event waits for the
/// projector instead of being applied over the gap: otherwise the missed event, told later,
/// would look already applied and its pause would never show.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_tree_keeps_the_other_instances_pause_when_this_instance_commits_before_hearing_it()
{
    let a = TestApp::spawn(Backend::Postgres).await;
    let name = ScopeName::parse("org").unwrap();
    let (org, _) = a
        .app
        .create_org(name, Plan::Enterprise, Tier::Managed, &metadata())
        .await
        .unwrap();
    let org = org.scope.scope.id;
    // B starts now: its tree is loaded from the rows.
    let b = a.peer().await;
    let hold = crate::harness::hold_runners(&a.db).await;
    // A pauses; B has not heard it (every runner is held)...
    a.app
        .act(org, Action::Pause, &metadata(), None)
        .await
        .unwrap();
    // ...and B rotates the organization's key: decided on the stored events, committed
    // after A's pause, answered once B's runner has applied both.
    let rotating = {
        let app = b.app.clone();
        tokio::spawn(async move { app.act(org, Action::Rotate, &metadata(), None).await })
    };
    loop {
        let events = a.db.events_of(&org.to_string()).await.unwrap();
        if events.len() == 3 || rotating.is_finished() {
            break;
        }
        tokio::task::yield_now().await;
    }
    hold.rollback().await.unwrap();
    let rotated = rotating.await.unwrap().unwrap();
    assert_eq!(rotated.scope.scope.own_state, ekm_domain::OwnState::Paused);
    b.app.projector().catch_up().await.unwrap();
    let sql = b.app.read().scope(org).await.unwrap();
    assert_eq!(filled(&b.app, b.app.memory(), org).await, sql);
    assert_eq!(sql.unwrap().scope.own_state, ekm_domain::OwnState::Paused);
    b.stop().await;
    a.stop().await;
}

fn rfc3339_now() -> String {
    ekm_store::time::rfc3339(chrono::Utc::now())
}
