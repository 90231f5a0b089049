//! Random trees and random operations, through the real application (store, projections,
//! read models), against a reference model of the cascade written as simply as possible.

use ekm_domain::{OwnState, Plan, ScopeError, ScopeId, ScopeKind, ScopeName, Tier};
use ekm_service::app::Action;
use ekm_service::{App, AppError};
use proptest::prelude::*;

use crate::harness::{metadata, Backend, TestApp};

#[derive(Clone, Debug)]
enum Op {
    Create {
        parent: usize,
        kind: usize,
    },
    Pause(usize),
    Resume(usize),
    Revoke(usize),
    Rotate(usize),
    /// A revoke with a waiting period (far in the future: it never falls due here).
    RevokeLater(usize),
    CancelRevocation(usize),
}

/// When every pending revocation of these histories falls due.
const DUE: &str = "2099-01-01T00:00:00.000000Z";

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (any::<usize>(), 0..4usize).prop_map(|(parent, kind)| Op::Create { parent, kind }),
        3 => any::<usize>().prop_map(Op::Pause),
        3 => any::<usize>().prop_map(Op::Resume),
        1 => any::<usize>().prop_map(Op::Revoke),
        1 => any::<usize>().prop_map(Op::Rotate),
        2 => any::<usize>().prop_map(Op::RevokeLater),
        2 => any::<usize>().prop_map(Op::CancelRevocation),
    ]
}

struct Node {
    id: ScopeId,
    kind: ScopeKind,
    parent: Option<usize>,
    own: OwnState,
    /// While pending revocation: the own state a cancellation returns to.
    before_pending: OwnState,
    key_version: u32,
}

/// The reference: walk from the root; the first revoked scope wins, else the first paused or
/// pending revocation (the two rank together), named by its own state.
fn effective(nodes: &[Node], index: usize) -> (&'static str, Option<ScopeId>) {
    let mut path = vec![index];
    while let Some(parent) = nodes[*path.last().unwrap()].parent {
        path.push(parent);
    }
    path.reverse();
    if let Some(i) = path.iter().find(|i| nodes[**i].own == OwnState::Revoked) {
        return ("revoked", Some(nodes[*i].id));
    }
    if let Some(i) = path.iter().find(|i| {
        matches!(
            nodes[**i].own,
            OwnState::Paused | OwnState::PendingRevocation
        )
    }) {
        return (nodes[*i].own.as_str(), Some(nodes[*i].id));
    }
    ("active", None)
}

fn rule(result: Result<ekm_service::app::Outcome, AppError>) -> Result<bool, ScopeError> {
    match result {
        Ok(outcome) => Ok(outcome.changed),
        Err(AppError::Rule(rule)) => Err(rule),
        Err(other) => panic!("unexpected error: {other:?}"),
    }
}

async fn check(app: &App, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let kinds = [
        ScopeKind::Team,
        ScopeKind::Thread,
        ScopeKind::McpConnector,
        ScopeKind::Agent,
    ];
    let name = ScopeName::parse("n").unwrap();
    let (org, _) = app
        .create_org(name.clone(), Plan::Enterprise, Tier::Default, &metadata())
        .await
        .unwrap();
    let mut nodes = vec![Node {
        id: org.scope.scope.id,
        kind: ScopeKind::Organization,
        parent: None,
        own: OwnState::Active,
        before_pending: OwnState::Active,
        key_version: 1,
    }];
    for op in ops {
        match op {
            Op::Create { parent, kind } => {
                let parent = parent % nodes.len();
                let kind = kinds[kind];
                let snapshot = app.scope(nodes[parent].id).await.unwrap().unwrap();
                let got = app
                    .create_scope(&snapshot, kind, name.clone(), &metadata())
                    .await;
                let (state, cause) = effective(&nodes, parent);
                let expected = if !kind.allows_parent(nodes[parent].kind) {
                    Err(ScopeError::InvalidParent {
                        kind,
                        parent_kind: nodes[parent].kind,
                    })
                } else if state == "revoked" {
                    Err(ScopeError::ParentRevoked {
                        cause: cause.unwrap(),
                    })
                } else if state == "paused" || state == "pending_revocation" {
                    Err(ScopeError::ParentPaused {
                        cause: cause.unwrap(),
                    })
                } else {
                    Ok(())
                };
                match (got, expected) {
                    (Ok(outcome), Ok(())) => nodes.push(Node {
                        id: outcome.scope.scope.id,
                        kind,
                        parent: Some(parent),
                        own: OwnState::Active,
                        before_pending: OwnState::Active,
                        key_version: 1,
                    }),
                    (Err(AppError::Rule(got)), Err(expected)) => prop_assert_eq!(got, expected),
                    (got, expected) => prop_assert!(
                        false,
                        "create: got {:?}, expected {:?}",
                        got.map(|_| ()),
                        expected
                    ),
                }
            }
            Op::Pause(i)
            | Op::Resume(i)
            | Op::Revoke(i)
            | Op::Rotate(i)
            | Op::RevokeLater(i)
            | Op::CancelRevocation(i) => {
                let i = i % nodes.len();
                let id = nodes[i].id;
                let action = match op {
                    Op::Pause(_) => Action::Pause,
                    Op::Resume(_) => Action::Resume,
                    Op::Revoke(_) => Action::Revoke {
                        confirm: id.to_string(),
                    },
                    Op::RevokeLater(_) => Action::ScheduleRevocation {
                        confirm: id.to_string(),
                        due_at: DUE.to_owned(),
                        requested_by: "user:tester".to_owned(),
                    },
                    Op::CancelRevocation(_) => Action::CancelRevocation { now: rfc3339_now() },
                    _ => Action::Rotate,
                };
                let got = rule(app.act(id, action.clone(), &metadata(), None).await);
                let inherited = nodes[i].parent.map(|p| effective(&nodes, p));
                let expected = if nodes[i].own == OwnState::Revoked {
                    Err(ScopeError::Revoked)
                } else if let Some(("revoked", cause)) = inherited {
                    Err(ScopeError::AncestorRevoked {
                        cause: cause.unwrap(),
                    })
                } else if nodes[i].own == OwnState::PendingRevocation
                    && matches!(
                        action,
                        Action::Pause | Action::Resume | Action::ScheduleRevocation { .. }
                    )
                {
                    Err(ScopeError::PendingRevocation {
                        due_at: DUE.to_owned(),
                    })
                } else {
                    let node = &mut nodes[i];
                    Ok(match action {
                        Action::Pause => {
                            std::mem::replace(&mut node.own, OwnState::Paused) != OwnState::Paused
                        }
                        Action::Resume => {
                            std::mem::replace(&mut node.own, OwnState::Active) != OwnState::Active
                        }
                        Action::Revoke { .. } => {
                            node.own = OwnState::Revoked;
                            true
                        }
                        Action::ScheduleRevocation { .. } => {
                            node.before_pending =
                                std::mem::replace(&mut node.own, OwnState::PendingRevocation);
                            true
                        }
                        Action::CancelRevocation { .. } => {
                            let pending = node.own == OwnState::PendingRevocation;
                            if pending {
                                node.own = node.before_pending;
                            }
                            pending
                        }
                        Action::CreateOrganization { .. }
                        | Action::CreateScope { .. }
                        | Action::ChangeTier(_)
                        | Action::RetireKeyVersions(_)
                        | Action::SetMasterKey { .. }
                        | Action::RecordMasterKeyHealth { .. }
                        | Action::IssueToken { .. }
                        | Action::RevokeToken(_)
                        | Action::Grant { .. }
                        | Action::Ungrant(_)
                        | Action::ExpireGrant { .. }
                        | Action::StartRevocationRekey { .. }
                        | Action::RecordRevocationRekey { .. }
                        | Action::CompleteRevocationRekey { .. }
                        | Action::SetJustificationPolicy(_)
                        | Action::SetMinDecryptionVersion(_)
                        | Action::ChangePlan(_)
                        | Action::PauseUntil(_)
                        | Action::FireScheduledResume { .. }
                        | Action::FireScheduledRevocation { .. }
                        | Action::SetOrgPolicy { .. }
                        | Action::SetRotationPeriod(_)
                        | Action::SetRateLimits(_)
                        | Action::AutoRotate { .. } => {
                            unreachable!("not generated")
                        }
                        Action::Rotate => {
                            node.key_version += 1;
                            true
                        }
                    })
                };
                prop_assert_eq!(got, expected);
            }
        }
        // After every operation, every scope reads exactly as the model says.
        for (index, node) in nodes.iter().enumerate() {
            let snapshot = app.scope(node.id).await.unwrap().unwrap();
            let (state, cause) = effective(&nodes, index);
            prop_assert_eq!(snapshot.effective.as_str(), state);
            prop_assert_eq!(snapshot.cause.map(|c| c.scope_id), cause);
            prop_assert_eq!(snapshot.scope.own_state, node.own);
            prop_assert_eq!(snapshot.scope.key_version, node.key_version);
        }
    }
    Ok(())
}

fn run(backend: Backend, cases: u32) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(cases));
    runner
        .run(&proptest::collection::vec(op(), 1..40), |ops| {
            runtime.block_on(async {
                let test_app = TestApp::spawn(backend).await;
                let result = check(&test_app.app, ops).await;
                test_app.stop().await;
                result
            })
        })
        .unwrap();
}

#[test]
fn commands_match_the_reference_model_when_random_on_sqlite() {
    run(Backend::Sqlite, 24);
}

#[test]
fn commands_match_the_reference_model_when_random_on_postgres() {
    run(Backend::Postgres, 8);
}

fn rfc3339_now() -> String {
    ekm_store::time::rfc3339(chrono::Utc::now())
}
