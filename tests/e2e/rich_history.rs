//! Random histories that touch every column of every read model: scopes created, paused,
//! resumed, rotated, retired and revoked, their justification policies and decryption floors set; tier changes; customer master keys connected
//! (moto) and dropped, their health recorded; grants given and taken back; tokens issued
//! and revoked. Driven through the HTTP API where one exists, as a client would.

use ekm_domain::{KeyHealth, ScopeId, UnavailableReason};
use ekm_service::app::Action;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::harness::{Options, TestApp};
use crate::kms_servers::Moto;

/// The event types a rich history must contain, or it proves less than it claims. (The
/// re-key job's events come from the revokes, once the job has run.)
pub const EVENT_TYPES: [&str; 22] = [
    "OrganizationCreated",
    "ScopeCreated",
    "ScopePaused",
    "ScopeResumed",
    "ScopeRevoked",
    "ScopeKeyRotated",
    "ScopeKeyVersionsRetired",
    "OrganizationTierChanged",
    "OrganizationMasterKeyChanged",
    "OrganizationMasterKeyHealthChanged",
    "PermissionGranted",
    "PermissionRevoked",
    "TokenIssued",
    "TokenRevoked",
    "ScopeJustificationPolicySet",
    "ScopeMinDecryptionVersionSet",
    "ScopeResumeScheduled",
    "ScopeRevocationScheduled",
    "ScopeRevocationCancelled",
    "OrganizationPolicySet",
    "ScopeRotationPeriodSet",
    "OrganizationRateLimitsSet",
];

/// Server options for a rich history: the KMS settings that reach `moto`, no background
/// health monitor (health events are recorded by the history itself, deterministically).
pub fn options() -> Options {
    Options {
        health_interval: None,
        ..crate::byok::options(
            crate::kms_servers::aws_environment(),
            std::time::Duration::from_secs(60),
            std::time::Duration::from_secs(300),
        )
    }
}

struct Org {
    id: String,
    admin: String,
    /// Every scope of this organization, with whether it may have children.
    scopes: Vec<(String, bool)>,
    tokens: Vec<String>,
    /// Grants given (principal, permission, scope) and not taken back by the history.
    grants: Vec<(&'static str, &'static str, Option<String>)>,
    /// Whether a customer key wraps the organization key.
    byok: bool,
}

const PRINCIPALS: [&str; 3] = ["alice", "bob", "ci-runner"];
const PERMISSIONS: [&str; 4] = [
    "encryption:manage",
    "encryption:view",
    "audit:read",
    "data:use",
];

/// A seeded random history over two enterprise organizations, run a number of steps at a
/// time. Refused commands (a pause of a revoked scope, a retire above the current version,
/// ...) are part of the history too: they record nothing.
pub struct RichHistory<'a> {
    app: &'a TestApp,
    moto: &'a Moto,
    arn: &'a str,
    rng: StdRng,
    orgs: Vec<Org>,
    step: usize,
}

/// `steps` commands of a fresh rich history.
pub async fn rich_history(app: &TestApp, moto: &Moto, arn: &str, seed: u64, steps: usize) {
    RichHistory::start(app, moto, arn, seed)
        .await
        .run(steps)
        .await;
    // Commands answered from memory leave the runner a moment behind (ADR 0020): the read
    // models the callers compare hold the whole history first.
    app.app.refresh().await.unwrap();
}

impl<'a> RichHistory<'a> {
    /// Creates the two organizations.
    pub async fn start(app: &'a TestApp, moto: &'a Moto, arn: &'a str, seed: u64) -> Self {
        let mut orgs = vec![];
        for _ in 0..2 {
            let (id, admin) = app.org_with("enterprise", "managed").await;
            orgs.push(Org {
                scopes: vec![(id.clone(), true)],
                id,
                admin,
                tokens: vec![],
                grants: vec![],
                byok: false,
            });
        }
        RichHistory {
            app,
            moto,
            arn,
            rng: StdRng::seed_from_u64(seed),
            orgs,
            step: 0,
        }
    }

    /// `steps` more commands.
    pub async fn run(&mut self, steps: usize) {
        for _ in 0..steps {
            self.step += 1;
            self.one_step().await;
        }
    }

    /// Ends with the first organization under a customer key that is unavailable, so that
    /// the health columns hold values at the end (a later switch clears them), and the second
    /// paused until tomorrow, so that the schedule holds a row (a later resume clears it).
    pub async fn end_unavailable(&mut self) {
        let second = &self.orgs[1];
        let until = chrono::Utc::now() + chrono::Duration::days(1);
        let paused = self
            .app
            .post(
                &format!("/v1/scopes/{}/pause", second.id),
                &second.admin,
                json!({"reason": "the end of the history",
                       "until": until.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)}),
            )
            .await;
        assert_eq!(paused.status, 200, "{}", paused.body);
        // Its policy set, and its revocation pending (tomorrow, never within the test), after
        // one cancelled: the pending columns and the schedule hold values at the end.
        let policy = self
            .app
            .call(
                "PUT",
                &format!("/v1/orgs/{}/policy", second.id),
                Some(&second.admin),
                Some(json!({"revoke_window": "P14D", "rotation_period": "P90D"})),
            )
            .await;
        assert_eq!(policy.status, 200, "{}", policy.body);
        // Its own rate limits, set by the operator (a column of the read model to rebuild).
        let limits = self
            .app
            .call(
                "PUT",
                &format!("/v1/orgs/{}/limits", second.id),
                Some(&self.app.operator_token),
                Some(
                    json!({"commands_principal": {"per_second": 50, "burst": 500},
                            "data_plane_organization": {"per_second": 900, "burst": 1800}}),
                ),
            )
            .await;
        assert_eq!(limits.status, 200, "{}", limits.body);
        for (path, body) in [
            (
                "revoke",
                json!({"reason": "r", "confirm": second.id, "after": "P2D"}),
            ),
            ("cancel-revocation", json!({"reason": "not yet"})),
            (
                "revoke",
                json!({"reason": "r", "confirm": second.id, "after": "P1D"}),
            ),
        ] {
            let sent = self
                .app
                .post(
                    &format!("/v1/scopes/{}/{path}", second.id),
                    &second.admin,
                    body,
                )
                .await;
            assert_eq!(sent.status, 200, "{}", sent.body);
        }
        let org = &mut self.orgs[0];
        // A busy machine can make a KMS round trip time out: a few attempts.
        for _ in 0..5 {
            if org.byok {
                break;
            }
            let body =
                json!({"provider": "aws-kms", "key_id": self.arn, "endpoint_url": self.moto.url});
            let switched = crate::byok::connect(self.app, &org.admin, &org.id, body).await;
            org.byok = switched.status.is_success();
        }
        assert!(org.byok, "the customer key could not be connected");
        let action = Action::RecordMasterKeyHealth {
            health: KeyHealth::Unavailable,
            reason: Some(UnavailableReason::AccessDenied),
            detail: "the end of the history".into(),
        };
        let metadata = ekm_service::health::system_metadata();
        let scope = ScopeId::parse(&org.id).unwrap();
        self.app
            .app
            .act(scope, action, &metadata, None)
            .await
            .unwrap();
    }

    async fn one_step(&mut self) {
        let (app, moto, arn, step) = (self.app, self.moto, self.arn, self.step);
        let rng = &mut self.rng;
        let org = &mut self.orgs[rng.random_range(0..2)];
        let (target, _) = org.scopes[rng.random_range(0..org.scopes.len())].clone();
        let token = org.admin.clone();
        match rng.random_range(0..100) {
            0..=24 => {
                let parents: Vec<&String> = org
                    .scopes
                    .iter()
                    .filter(|(_, parent)| *parent)
                    .map(|(id, _)| id)
                    .collect();
                let parent = parents[rng.random_range(0..parents.len())].clone();
                let kinds: &[&str] = if parent == org.id {
                    &["team", "team", "thread", "mcp_connector"]
                } else {
                    &["thread", "agent", "mcp_connector"]
                };
                let kind = kinds[rng.random_range(0..kinds.len())];
                let created = app
                    .post(
                        "/v1/scopes",
                        &token,
                        json!({"kind": kind, "name": format!("s{step}"), "parent_id": parent}),
                    )
                    .await;
                if created.status.is_success() {
                    org.scopes.push((created.str("id"), kind == "team"));
                }
            }
            25..=34 => {
                // Half the pauses end on their own, tomorrow (never within the test): the
                // schedule is a read model too.
                let mut body = json!({"reason": format!("pause {step}")});
                if rng.random_bool(0.5) {
                    let until = chrono::Utc::now() + chrono::Duration::days(1);
                    body["until"] =
                        json!(until.to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
                }
                drop(
                    app.post(&format!("/v1/scopes/{target}/pause"), &token, body)
                        .await,
                );
            }
            35..=40 => drop(app.resume(&token, &target).await),
            41..=44 => {
                // A justification policy: set, tightened, or lifted.
                let codes = ["agent_run", "customer_support", "legal_hold"];
                let allowed: Vec<&str> = codes
                    .iter()
                    .copied()
                    .filter(|_| rng.random_bool(0.5))
                    .collect();
                // A list needs `required` (ADR 0027).
                let required = !allowed.is_empty() || rng.random_bool(0.5);
                let body = json!({"required": required, "allowed": allowed});
                let path = format!("/v1/scopes/{target}/justification-policy");
                drop(app.call("PUT", &path, Some(&token), Some(body)).await);
            }
            45..=51 => drop(
                app.post(&format!("/v1/scopes/{target}/rotate"), &token, json!({}))
                    .await,
            ),
            52..=56 => {
                // Rotate first, so that there is an older version to retire.
                let rotated = app
                    .post(&format!("/v1/scopes/{target}/rotate"), &token, json!({}))
                    .await;
                let newest = rotated.body["key_versions"]
                    .as_array()
                    .and_then(|versions| {
                        versions.iter().filter_map(|v| v["version"].as_u64()).max()
                    });
                if let Some(newest) = newest.filter(|n| *n >= 2) {
                    let below = rng.random_range(2..=newest);
                    // The floor first (retire destroys only below it); sometimes lowered
                    // again afterwards, as an admin who changed their mind would.
                    drop(
                        app.call(
                            "PUT",
                            &format!("/v1/scopes/{target}/min-decryption-version"),
                            Some(&token),
                            Some(json!({"version": below})),
                        )
                        .await,
                    );
                    drop(
                        app.post(
                            &format!("/v1/scopes/{target}/retire"),
                            &token,
                            json!({"below": below}),
                        )
                        .await,
                    );
                    if rng.random_bool(0.3) {
                        drop(
                            app.call(
                                "PUT",
                                &format!("/v1/scopes/{target}/min-decryption-version"),
                                Some(&token),
                                Some(json!({"version": 1})),
                            )
                            .await,
                        );
                    }
                }
            }
            57..=60 => {
                // Revoked at once, pending for a day (never within the test), or cancelled;
                // on the organization itself, its revoke window is set instead.
                let path = |action: &str| format!("/v1/scopes/{target}/{action}");
                let sent = match (target == org.id, rng.random_range(0..3)) {
                    (true, n) => {
                        let window = [json!("P3D"), json!("PT12H"), json!(null)][n].clone();
                        let period = [json!("P30D"), json!(null), json!("P365D")][n].clone();
                        let body = json!({"revoke_window": window, "rotation_period": period});
                        let policy = format!("/v1/orgs/{}/policy", org.id);
                        app.call("PUT", &policy, Some(&token), Some(body)).await
                    }
                    (false, 0) if rng.random_bool(0.3) => {
                        let body = json!({"rotation_period": "P60D"});
                        app.call("PUT", &path("rotation-period"), Some(&token), Some(body))
                            .await
                    }
                    (false, 0) => app.revoke(&token, &target).await,
                    (false, 1) => {
                        let body = json!({"reason": "later", "confirm": target, "after": "P1D"});
                        app.post(&path("revoke"), &token, body).await
                    }
                    (false, _) => {
                        let body = json!({"reason": "changed my mind"});
                        app.post(&path("cancel-revocation"), &token, body).await
                    }
                };
                drop(sent);
            }
            // Under a customer key, the first PUT goes back to the platform's key (managed).
            61..=63 => {
                for _ in 0..2 {
                    let tier = if org.byok {
                        "managed"
                    } else {
                        ["default", "managed"][rng.random_range(0..2)]
                    };
                    let changed = app
                        .call(
                            "PUT",
                            &format!("/v1/orgs/{}/tier", org.id),
                            Some(&token),
                            Some(json!({"tier": tier, "reason": "plan review"})),
                        )
                        .await;
                    if changed.status.is_success() {
                        org.byok = false;
                    }
                }
            }
            // Health is recorded only under a customer key: connect one first when there is
            // none (and sometimes go back to the platform's key).
            64..=73 => {
                if !org.byok || rng.random_range(0..4) == 0 {
                    let body = if org.byok {
                        json!({"provider": "local", "reason": "back home"})
                    } else {
                        json!({"provider": "aws-kms", "key_id": arn, "endpoint_url": moto.url, "reason": "go byok"})
                    };
                    let switched = crate::byok::connect(app, &token, &org.id, body).await;
                    if switched.status.is_success() {
                        org.byok = switched.body["tier"] == "byok";
                    }
                    return;
                }
                let (health, reason) = if rng.random_range(0..2) == 0 {
                    (KeyHealth::Available, None)
                } else {
                    let reasons = [
                        UnavailableReason::Disabled,
                        UnavailableReason::PendingDeletion,
                        UnavailableReason::Unreachable,
                    ];
                    (
                        KeyHealth::Unavailable,
                        Some(reasons[rng.random_range(0..reasons.len())]),
                    )
                };
                let action = Action::RecordMasterKeyHealth {
                    health,
                    reason,
                    detail: format!("check {step}"),
                };
                let metadata = ekm_service::health::system_metadata();
                drop(
                    app.app
                        .act(ScopeId::parse(&org.id).unwrap(), action, &metadata, None)
                        .await,
                );
            }
            74..=83 => {
                let principal = PRINCIPALS[rng.random_range(0..PRINCIPALS.len())];
                let permission = PERMISSIONS[rng.random_range(0..PERMISSIONS.len())];
                let mut body = json!({"principal": principal, "permission": permission});
                let scope = (rng.random_range(0..2) == 0).then(|| target.clone());
                if let Some(scope) = &scope {
                    body["scope_id"] = json!(scope);
                }
                // A third expire (days ahead: never during the history); given again, a
                // grant's expiry is replaced.
                if rng.random_range(0..3) == 0 {
                    let days = chrono::Duration::days(rng.random_range(1..4));
                    body["expires_at"] = json!((chrono::Utc::now() + days)
                        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
                }
                let granted = app
                    .post(&format!("/v1/orgs/{}/grants", org.id), &token, body)
                    .await;
                if granted.status.is_success() {
                    org.grants.push((principal, permission, scope));
                }
            }
            // Mostly a grant given earlier, sometimes one that does not exist.
            84..=89 => {
                let (principal, permission, scope) =
                    if org.grants.is_empty() || rng.random_range(0..4) == 0 {
                        (
                            PRINCIPALS[rng.random_range(0..PRINCIPALS.len())],
                            PERMISSIONS[rng.random_range(0..PERMISSIONS.len())],
                            (rng.random_range(0..2) == 0).then(|| target.clone()),
                        )
                    } else {
                        org.grants.remove(rng.random_range(0..org.grants.len()))
                    };
                let query = scope
                    .as_ref()
                    .map(|s| format!("?scope_id={s}"))
                    .unwrap_or_default();
                let removed = app
                    .call(
                        "DELETE",
                        &format!("/v1/orgs/{}/grants/{principal}/{permission}{query}", org.id),
                        Some(&token),
                        None,
                    )
                    .await;
                // Half the time given back at once: the same grant, revoked then granted
                // again, must survive a rebuild that applies both in one batch.
                if removed.status.is_success() && rng.random_range(0..2) == 0 {
                    let mut body = json!({"principal": principal, "permission": permission});
                    if let Some(scope) = &scope {
                        body["scope_id"] = json!(scope);
                    }
                    let granted = app
                        .post(&format!("/v1/orgs/{}/grants", org.id), &token, body)
                        .await;
                    if granted.status.is_success() {
                        org.grants.push((principal, permission, scope));
                    }
                }
            }
            90..=95 => {
                let principal = PRINCIPALS[rng.random_range(0..PRINCIPALS.len())];
                let role = ["member", "it_admin"][rng.random_range(0..2)];
                let issued = app
                    .post(
                        &format!("/v1/orgs/{}/tokens", org.id),
                        &token,
                        json!({"principal": principal, "role": role}),
                    )
                    .await;
                if issued.status.is_success() {
                    org.tokens.push(issued.str("id"));
                }
            }
            _ => {
                if !org.tokens.is_empty() {
                    let id = org.tokens.remove(rng.random_range(0..org.tokens.len()));
                    drop(
                        app.call(
                            "DELETE",
                            &format!("/v1/orgs/{}/tokens/{id}", org.id),
                            Some(&token),
                            None,
                        )
                        .await,
                    );
                }
            }
        }
    }
}

/// Panics unless the log holds at least one event of every type in `EVENT_TYPES`.
pub async fn assert_every_event_type(db: &ekm_store::Db) {
    let events = db.events_through(0, i64::MAX, 1_000_000).await.unwrap();
    for wanted in EVENT_TYPES {
        let count = events.iter().filter(|e| e.event_type == wanted).count();
        assert!(count > 0, "the history has no {wanted} event");
    }
}
