//! Each kind of tampering with the event log and its seals, found by `ekm audit verify` at
//! its kind and position, on both backends.

use super::*;

async fn verify_reports_altered_when_seals_are_recomputed_without_the_key(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, _, team, events) = history(&app).await;
    assert_eq!(first_failure(&verify(&app, Some(&org), None).1, &org), None);
    let pause = events
        .iter()
        .find(|e| e.event_type == "ScopePaused")
        .unwrap()
        .clone();

    // The attacker rewrites the first pause's reason and seals the chain again from there,
    // with the only key they can have: not the audit key, which the database never held.
    app.app.refresh().await.unwrap(); // tampering starts from sealed history (ADR 0020)
    drop_immutability(&app.db).await;
    exec(
        &app.db,
        &format!(
            "UPDATE events SET metadata = '{}' WHERE position = {}",
            pause.metadata.replace("investigation 4711", "routine"),
            pause.position
        ),
    )
    .await;
    let guessed = ekm_keys::SealKey::from_bytes(&[0u8; 32]).unwrap();
    let seals: Vec<(i64, String)> = ekm_store::with_read_pool!(&app.db, pool => {
        sqlx::query_as("SELECT position, prev_hash FROM audit_chain WHERE org_id = $1 AND position >= $2 ORDER BY position")
            .bind(&org)
            .bind(pause.position)
            .fetch_all(pool)
            .await
            .unwrap()
    });
    let mut prev = seals[0].1.clone();
    for (position, _) in seals {
        let event = &app.db.events_at(&[position]).await.unwrap()[0];
        let seal = ekm_projections::seal_entry(&guessed, &org, &prev, event).unwrap();
        exec(
            &app.db,
            &format!("UPDATE audit_chain SET prev_hash = '{prev}', hash = '{seal}' WHERE position = {position}"),
        )
        .await;
        prev = seal;
    }
    let (ok, reports) = verify(&app, Some(&org), None);
    assert!(!ok);
    assert_eq!(
        first_failure(&reports, &org),
        Some(("altered".into(), pause.position))
    );
    assert_eq!(reports[0]["first_failure"]["scope_id"], team.as_str());
    app.stop().await;
}
on_both_backends!(verify_reports_altered_when_seals_are_recomputed_without_the_key);

async fn verify_reports_removed_when_a_sealed_event_is_deleted(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, _, _, events) = history(&app).await;
    let resume = events
        .iter()
        .find(|e| e.event_type == "ScopeResumed")
        .unwrap()
        .position;
    app.app.refresh().await.unwrap(); // tampering starts from sealed history (ADR 0020)
    drop_immutability(&app.db).await;
    exec(
        &app.db,
        &format!("DELETE FROM events WHERE position = {resume}"),
    )
    .await;
    let (ok, reports) = verify(&app, Some(&org), None);
    assert!(!ok);
    assert_eq!(
        first_failure(&reports, &org),
        Some(("removed".into(), resume))
    );
    app.stop().await;
}
on_both_backends!(verify_reports_removed_when_a_sealed_event_is_deleted);

async fn verify_reports_inserted_when_an_event_fills_a_position_gap(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, admin) = app.org("enterprise").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    // An event of another aggregate type takes a position (a gap once it is gone: on
    // PostgreSQL rolled-back inserts leave such gaps too), then the team's history goes on.
    exec(
        &app.db,
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
         payload, metadata) VALUES ('test', 'gap', 1, 'Tested', '1', '{}', '{}')",
    )
    .await;
    let gap = app.db.committed_head().await.unwrap();
    app.pause(&admin, &team).await;
    app.resume(&admin, &team).await;
    assert_eq!(first_failure(&verify(&app, Some(&org), None).1, &org), None);

    // The attacker forges a pause of the team into the gap.
    let pause = app.db.events_of(&team).await.unwrap()[1].clone();
    assert_eq!(pause.event_type, "ScopePaused");
    app.app.refresh().await.unwrap(); // tampering starts from sealed history (ADR 0020)
    drop_immutability(&app.db).await;
    exec(
        &app.db,
        &format!("DELETE FROM events WHERE position = {gap}"),
    )
    .await;
    exec(
        &app.db,
        &format!(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
             event_version, payload, metadata) VALUES ('scope', '{team}', 99, 'ScopePaused', \
             '{}', '{}', '{}')",
            pause.event_version, pause.payload, pause.metadata
        ),
    )
    .await;
    exec(
        &app.db,
        &format!(
            "UPDATE events SET position = {gap} WHERE aggregate_id = '{team}' AND sequence = 99"
        ),
    )
    .await;
    let (ok, reports) = verify(&app, Some(&org), None);
    assert!(!ok);
    assert_eq!(
        first_failure(&reports, &org),
        Some(("inserted".into(), gap))
    );
    app.stop().await;
}
on_both_backends!(verify_reports_inserted_when_an_event_fills_a_position_gap);

async fn verify_reports_reordered_when_a_seal_link_is_edited(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, _, _, events) = history(&app).await;
    let resume = events
        .iter()
        .find(|e| e.event_type == "ScopeResumed")
        .unwrap()
        .position;
    // The resume's link now names the entry two back, as if the pause before it had moved.
    exec(
        &app.db,
        &format!(
            "UPDATE audit_chain SET prev_hash = (SELECT prev_hash FROM audit_chain WHERE position = \
             (SELECT MAX(position) FROM audit_chain WHERE org_id = '{org}' AND position < {resume})) \
             WHERE position = {resume}"
        ),
    )
    .await;
    let (ok, reports) = verify(&app, Some(&org), None);
    assert!(!ok);
    assert_eq!(
        first_failure(&reports, &org),
        Some(("reordered".into(), resume))
    );
    app.stop().await;
}
on_both_backends!(verify_reports_reordered_when_a_seal_link_is_edited);

async fn verify_reports_truncated_when_the_tail_is_cut_with_its_seals(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, _, _, events) = history(&app).await;
    let heads = app.data_dir().join("auditor-heads.json");
    let (ok, _) = verify(&app, None, Some(&heads));
    assert!(ok);
    let head = events.last().unwrap().position;
    let recorded: Value = serde_json::from_str(&std::fs::read_to_string(&heads).unwrap()).unwrap();
    assert_eq!(recorded["orgs"][&org]["position"], head);

    // The last two entries go, events and seals, with the chain's state: what is left is a
    // perfectly valid, shorter chain.
    let cut = events[events.len() - 2].position;
    app.app.refresh().await.unwrap(); // tampering starts from sealed history (ADR 0020)
    drop_immutability(&app.db).await;
    exec(
        &app.db,
        &format!(
            "DELETE FROM events WHERE position >= {cut}; DELETE FROM audit_chain WHERE position >= {cut}"
        ),
    )
    .await;
    let (ok, reports) = verify(&app, None, Some(&heads));
    assert!(!ok);
    assert_eq!(
        first_failure(&reports, &org),
        Some(("truncated".into(), head))
    );
    // The failed run kept the recorded head: the next run fails the same way.
    let (ok, reports) = verify(&app, None, Some(&heads));
    assert!(!ok);
    assert_eq!(
        first_failure(&reports, &org),
        Some(("truncated".into(), head))
    );
    app.stop().await;
}
on_both_backends!(verify_reports_truncated_when_the_tail_is_cut_with_its_seals);

async fn verify_reports_emptied_when_an_organization_history_is_removed(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, _, _, events) = history(&app).await;
    let heads = app.data_dir().join("auditor-heads.json");
    assert!(verify(&app, None, Some(&heads)).0);
    let head = events.last().unwrap().position;

    app.app.refresh().await.unwrap(); // tampering starts from sealed history (ADR 0020)
    drop_immutability(&app.db).await;
    exec(
        &app.db,
        &format!(
            "DELETE FROM events WHERE audit_org = '{org}'; DELETE FROM audit_chain WHERE org_id = '{org}'; \
             DELETE FROM projection_state WHERE projection = 'audit_chain' AND key = '{org}'"
        ),
    )
    .await;
    // Every organization (no --org): the emptied one is still listed by the head file.
    let (ok, reports) = verify(&app, None, Some(&heads));
    assert!(!ok);
    assert_eq!(
        first_failure(&reports, &org),
        Some(("emptied".into(), head))
    );
    app.stop().await;
}
on_both_backends!(verify_reports_emptied_when_an_organization_history_is_removed);

async fn verify_reports_resealed_when_the_server_seals_an_altered_history_again(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, _, _, events) = history(&app).await;
    let heads = app.data_dir().join("auditor-heads.json");
    assert!(verify(&app, None, Some(&heads)).0);
    let head = events.last().unwrap().position;
    let pause = events
        .iter()
        .find(|e| e.event_type == "ScopePaused")
        .unwrap()
        .clone();

    // Alter an event, then make the chain forget it ever sealed anything.
    app.app.refresh().await.unwrap(); // tampering starts from sealed history (ADR 0020)
    drop_immutability(&app.db).await;
    exec(
        &app.db,
        &format!(
            "UPDATE events SET metadata = '{}' WHERE position = {}; \
             DELETE FROM audit_chain; DELETE FROM projection_state WHERE projection = 'audit_chain'; \
             UPDATE projection_checkpoints SET position = 0 WHERE name = 'audit_chain'",
            pause.metadata.replace("investigation 4711", "routine"),
            pause.position
        ),
    )
    .await;
    // Without seals, events the runner had sealed are found unsealed.
    let (ok, reports) = verify(&app, Some(&org), None);
    assert!(!ok);
    assert_eq!(
        first_failure(&reports, &org),
        Some(("inserted".into(), events[0].position))
    );
    // A server started now refuses to seal that history again.
    let mut command = Command::new(env!("CARGO_BIN_EXE_ekm"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(app.data_dir())
        .env_remove("EKM_DATABASE_URL");
    if let Some(url) = app.database_url() {
        command.args(["--database-url", url]);
    }
    let refused = exits_within(command, std::time::Duration::from_secs(60));
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--seal-existing-history"), "{stderr}");
    // Nor does the running one.
    let running = app.app.projector().catch_up().await.unwrap_err();
    assert!(
        matches!(
            running,
            ekm_projections::ProjectionError::ResealRefused { .. }
        ),
        "{running:?}"
    );

    // One that is told to seals the altered history with the real key: every seal
    // verifies, but not the one the auditor recorded.
    let mut command = Command::new(env!("CARGO_BIN_EXE_ekm"));
    command
        .args(["--log-format", "json", "serve", "--seal-existing-history"])
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(app.data_dir())
        .env_remove("EKM_DATABASE_URL");
    if let Some(url) = app.database_url() {
        command.args(["--database-url", url]);
    }
    // Listening means its read models, and so the seals, have caught up.
    drop(serve_until_listening(command));
    assert_eq!(first_failure(&verify(&app, Some(&org), None).1, &org), None);
    let (ok, reports) = verify(&app, None, Some(&heads));
    assert!(!ok);
    assert_eq!(
        first_failure(&reports, &org),
        Some(("resealed".into(), head))
    );
    app.stop().await;
}
on_both_backends!(verify_reports_resealed_when_the_server_seals_an_altered_history_again);
