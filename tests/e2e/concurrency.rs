//! Many clients pausing and resuming the same scopes at once: every acknowledged change is
//! exactly one event, none is lost or duplicated, conflicts are retried or answered.

use std::sync::Arc;

use serde_json::json;

use crate::harness::{Backend, TestApp};
use crate::on_both_backends;

async fn pause_and_resume_lose_nothing_when_concurrent(backend: Backend) {
    let app = Arc::new(TestApp::spawn(backend).await);
    let (org, admin) = app.org("enterprise").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    let thread = app.scope(&admin, "thread", "t", &team).await;
    let targets = [team.clone(), thread.clone()];

    let clients = 8;
    let requests_per_client = 12;
    let mut tasks = vec![];
    for client in 0..clients {
        let app = app.clone();
        let admin = admin.clone();
        let targets = targets.clone();
        tasks.push(tokio::spawn(async move {
            let mut changed = [0usize; 2];
            for i in 0..requests_per_client {
                let which = (client + i) % 2;
                let action = if (client * 7 + i) % 2 == 0 {
                    "pause"
                } else {
                    "resume"
                };
                let response = app
                    .post(
                        &format!("/v1/scopes/{}/{action}", targets[which]),
                        &admin,
                        json!({"reason": format!("client {client} request {i}")}),
                    )
                    .await;
                match response.status.as_u16() {
                    200 => {
                        if response.body["changed"] == true {
                            changed[which] += 1;
                        }
                    }
                    // Retries exhausted: answered, not lost.
                    409 => response.assert_problem(409, "conflict"),
                    other => panic!("unexpected {other}: {}", response.body),
                }
            }
            changed
        }));
    }
    let mut changed = [0usize; 2];
    for task in tasks {
        let result = task.await.unwrap();
        changed[0] += result[0];
        changed[1] += result[1];
    }

    for (which, id) in targets.iter().enumerate() {
        let events = app.db.events_of(id).await.unwrap();
        // One creation event, then one event per acknowledged change.
        assert_eq!(events.len() - 1, changed[which], "scope {which}");
        // Idempotency means the changes strictly alternate, starting with a pause.
        for (i, event) in events.iter().skip(1).enumerate() {
            let expected = if i % 2 == 0 {
                "ScopePaused"
            } else {
                "ScopeResumed"
            };
            assert_eq!(event.event_type, expected);
        }
        // Sequences are gap-free and positions strictly increase.
        for pair in events.windows(2) {
            assert_eq!(pair[1].sequence, pair[0].sequence + 1);
            assert!(pair[1].position > pair[0].position);
        }
        // The read model agrees with the last event.
        let expected_state = match events.last().unwrap().event_type.as_str() {
            "ScopePaused" => "paused",
            _ => "active",
        };
        let scope = app.get(&format!("/v1/scopes/{id}"), &admin).await;
        assert_eq!(scope.body["own_state"], expected_state);
        assert_eq!(scope.body["version"], events.len() as i64);
    }
    assert!(changed.iter().sum::<usize>() > 0);
}
on_both_backends!(pause_and_resume_lose_nothing_when_concurrent);
