//! A destroyed key leaves no byte in the database's files: revoke, retire, switch to a
//! customer key.

use std::path::PathBuf;

use crate::data_plane::managed_org;
use crate::harness::{Backend, TestApp};
use crate::on_both_backends;

use super::*;

/// The files that hold the key tables: every file of the data directory (SQLite: the
/// database, its WAL and shared memory), or (PostgreSQL) the key tables' relation files,
/// flushed by a checkpoint first. Also any file named in `extra` (old relation files).
async fn key_files(app: &TestApp) -> Vec<PathBuf> {
    match &app.db {
        Db::Sqlite(_) => std::fs::read_dir(app.data_dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect(),
        Db::Postgres(db) => {
            sqlx::query("CHECKPOINT").execute(&db.pool).await.unwrap();
            let dir: String = sqlx::query_scalar("SHOW data_directory")
                .fetch_one(&db.pool)
                .await
                .unwrap();
            let mut files = vec![];
            for table in ["key_material", "wrapping_keys", "master_key_rewraps"] {
                let relative: String =
                    sqlx::query_scalar(&format!("SELECT pg_relation_filepath('{table}')"))
                        .fetch_one(&db.pool)
                        .await
                        .unwrap();
                files.push(Path::new(&dir).join(relative));
            }
            files
        }
    }
}

fn found_in(files: &[PathBuf], needles: &[Vec<u8>]) -> usize {
    let mut found = 0;
    for file in files {
        let Ok(bytes) = std::fs::read(file) else {
            continue;
        };
        for needle in needles {
            if bytes.windows(needle.len()).any(|w| w == needle.as_slice()) {
                found += 1;
            }
        }
    }
    found
}

/// The stored text (base64) of the wrapped keys of `scopes`, and of their wrapping keys.
async fn stored_key_text(db: &Db, scopes: &[&str]) -> Vec<Vec<u8>> {
    let mut out = vec![];
    for scope in scopes {
        let rows: Vec<String> = ekm_store::with_write_pool!(db, pool => {
            sqlx::query_scalar("SELECT wrapped FROM key_material WHERE scope_id = $1 \
                                UNION ALL SELECT wrapped FROM wrapping_keys WHERE scope_id = $1")
                .bind(*scope)
                .fetch_all(pool)
                .await
                .unwrap()
        });
        out.extend(rows.into_iter().map(String::into_bytes));
    }
    out
}

async fn revoke_leaves_no_byte_of_a_destroyed_key_in_the_files(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, token) = managed_org(&app).await;
    let team = app.scope(&token, "team", "research", &org).await;
    let thread = app.scope(&token, "thread", "t", &team).await;
    let _survivor = app.scope(&token, "thread", "kept", &team).await;
    // The thread's keys, and the team's and organization's wrapping keys as they are now
    // (the re-key destroys them).
    let destroyed = stored_key_text(&app.db, &[&thread]).await;
    let old_wrapping: Vec<Vec<u8>> = {
        let rows: Vec<String> = ekm_store::with_write_pool!(&app.db, pool => {
            sqlx::query_scalar("SELECT wrapped FROM wrapping_keys WHERE scope_id = $1 OR scope_id = $2")
                .bind(&team)
                .bind(&org)
                .fetch_all(pool)
                .await
                .unwrap()
        });
        rows.into_iter().map(String::into_bytes).collect()
    };
    assert_eq!(
        destroyed.len(),
        2,
        "the thread's key version and wrapping key"
    );
    assert_eq!(old_wrapping.len(), 2);
    let needles: Vec<Vec<u8>> = destroyed.iter().chain(&old_wrapping).cloned().collect();
    let files_before = key_files(&app).await;
    assert_eq!(
        found_in(&files_before, &needles),
        needles.len(),
        "before the revoke, the files hold every one of them (so this test can fail)"
    );

    assert_eq!(app.revoke(&token, &thread).await.status, 200);
    app.rekeyer.run_pending().await.unwrap();
    let mut files = key_files(&app).await;
    files.extend(files_before);
    assert_eq!(
        found_in(&files, &needles),
        0,
        "no byte of a destroyed key stays in {files:?}"
    );
    app.stop().await;
}
on_both_backends!(revoke_leaves_no_byte_of_a_destroyed_key_in_the_files);

/// The stored text of a scope's key versions below `below`.
async fn version_text(db: &Db, scope: &str, below: i64) -> Vec<Vec<u8>> {
    let rows: Vec<String> = ekm_store::with_write_pool!(db, pool => {
        sqlx::query_scalar("SELECT wrapped FROM key_material WHERE scope_id = $1 AND version < $2")
            .bind(scope)
            .bind(below)
            .fetch_all(pool)
            .await
            .unwrap()
    });
    rows.into_iter().map(String::into_bytes).collect()
}

/// Retiring key versions destroys them in the files too, not only in the table.
async fn retire_leaves_no_byte_of_a_retired_version_in_the_files(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (org, token) = managed_org(&app).await;
    let team = app.scope(&token, "team", "research", &org).await;
    let rotated = app
        .post(
            &format!("/v1/scopes/{team}/rotate"),
            &token,
            serde_json::json!({}),
        )
        .await;
    assert_eq!(rotated.status, 200, "{:?}", rotated.body);
    let retired = version_text(&app.db, &team, 2).await;
    assert_eq!(retired.len(), 1);
    let files_before = key_files(&app).await;
    assert_eq!(found_in(&files_before, &retired), 1, "present before");
    app.floor(&token, &team, 2).await;
    let answer = app
        .post(
            &format!("/v1/scopes/{team}/retire"),
            &token,
            serde_json::json!({"below": 2}),
        )
        .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    let mut files = key_files(&app).await;
    files.extend(files_before);
    assert_eq!(found_in(&files, &retired), 0, "gone from {files:?}");
    app.stop().await;
}
on_both_backends!(retire_leaves_no_byte_of_a_retired_version_in_the_files);

/// Switching to a customer key replaces the organization key's platform-only wrapping, and
/// that wrapping leaves the files too.
async fn byok_switch_leaves_no_platform_only_wrapping_in_the_files(backend: Backend) {
    let customer = CustomerKey::create().await;
    let app = TestApp::spawn_with(backend, customer.options()).await;
    let (org, token) = managed_org(&app).await;
    let platform_only: Vec<Vec<u8>> = {
        let rows: Vec<String> = ekm_store::with_write_pool!(&app.db, pool => {
            sqlx::query_scalar("SELECT wrapped FROM wrapping_keys WHERE scope_id = $1")
                .bind(&org)
                .fetch_all(pool)
                .await
                .unwrap()
        });
        rows.into_iter().map(String::into_bytes).collect()
    };
    assert_eq!(platform_only.len(), 1);
    let files_before = key_files(&app).await;
    assert_eq!(found_in(&files_before, &platform_only), 1, "present before");
    customer.connect(&app, &token, &org).await;
    let mut files = key_files(&app).await;
    files.extend(files_before);
    assert_eq!(found_in(&files, &platform_only), 0, "gone from {files:?}");
    app.stop().await;
}
on_both_backends!(byok_switch_leaves_no_platform_only_wrapping_in_the_files);
