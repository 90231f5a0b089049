//! One commit per command (ADR 0020): a command's events and the key material they refer
//! to are written together or not at all.

use std::collections::HashMap;

use ekm_domain::ScopeEvent;
use ekm_store::{Appended, Db, KeyRow, KeyWrites, WrappingKeyRow};

use crate::harness::{Backend, TestDb};
use crate::on_both_backends;

fn wrapping(scope: &str) -> (WrappingKeyRow, Option<String>) {
    let row = WrappingKeyRow {
        scope_id: scope.to_owned(),
        epoch: 1,
        fingerprint: "wrapping-fingerprint".into(),
        wrapped: vec![1; 80],
        parent: None,
        master_fingerprint: Some("local:test".into()),
        rekey_of: None,
    };
    (row, None)
}

fn version(scope: &str, version: u32, epoch: u32) -> KeyRow {
    KeyRow {
        scope_id: scope.to_owned(),
        version,
        fingerprint: format!("fingerprint-{version}"),
        wrapped: vec![2; 80],
        parent: None,
        master_fingerprint: None,
        node_epoch: Some(epoch),
    }
}

async fn count(db: &Db, table: &str) -> i64 {
    ekm_store::with_write_pool!(db, pool => {
        sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(pool)
            .await
            .unwrap()
    })
}

async fn append_writes_nothing_when_its_key_cannot_be_stored(backend: Backend) {
    let test_db = TestDb::new(backend).await;
    let db = Db::open(&test_db.config).await.unwrap();
    let meta = HashMap::new();

    // A key version under an epoch that does not exist (a re-key destroyed it meanwhile).
    let raced = KeyWrites {
        wrapping: None,
        version: Some(version("s", 1, 7)),
    };
    let outcome = db
        .append("s", 0, &[ScopeEvent::ScopePaused {}], &meta, &raced)
        .await
        .unwrap();
    assert_eq!(outcome, Appended::KeysRaced);
    assert_eq!(count(&db, "events").await, 0, "the event went with its key");
    assert_eq!(count(&db, "key_material").await, 0);

    // The first epoch of a wrapping key someone else made first: nothing written either.
    let first = KeyWrites {
        wrapping: Some(wrapping("s")),
        version: Some(version("s", 1, 1)),
    };
    assert!(matches!(
        db.append("s", 0, &[ScopeEvent::ScopePaused {}], &meta, &first)
            .await
            .unwrap(),
        Appended::Committed { .. }
    ));
    let again = KeyWrites {
        wrapping: Some(wrapping("t")),
        version: Some(version("t", 1, 1)),
    };
    let made_elsewhere = KeyWrites {
        wrapping: Some(wrapping("t")),
        version: Some(version("t", 1, 1)),
    };
    assert!(matches!(
        db.append(
            "u",
            0,
            &[ScopeEvent::ScopePaused {}],
            &meta,
            &made_elsewhere
        )
        .await
        .unwrap(),
        Appended::Committed { .. }
    ));
    let outcome = db
        .append("t", 0, &[ScopeEvent::ScopePaused {}], &meta, &again)
        .await
        .unwrap();
    assert_eq!(outcome, Appended::KeysRaced);
    assert_eq!(count(&db, "events").await, 2);
    assert_eq!(count(&db, "key_material").await, 2);

    // A first epoch wrapped under a parent epoch that a re-key destroyed (the foreign key is
    // checked at commit on PostgreSQL): nothing written.
    let (mut orphan, platform) = wrapping("v");
    orphan.parent = Some(("gone".into(), 1));
    orphan.master_fingerprint = None;
    let under_gone = KeyWrites {
        wrapping: Some((orphan, platform)),
        version: Some(version("v", 1, 1)),
    };
    let outcome = db
        .append("v", 0, &[ScopeEvent::ScopePaused {}], &meta, &under_gone)
        .await
        .unwrap();
    assert_eq!(outcome, Appended::KeysRaced);
    assert_eq!(count(&db, "events").await, 2);
    assert_eq!(count(&db, "wrapping_keys").await, 2);
    db.close().await;
}
on_both_backends!(append_writes_nothing_when_its_key_cannot_be_stored);

async fn append_writes_no_key_when_it_loses_the_race_for_its_sequence(backend: Backend) {
    let test_db = TestDb::new(backend).await;
    let db = Db::open(&test_db.config).await.unwrap();
    let meta = HashMap::new();
    let first = KeyWrites {
        wrapping: Some(wrapping("s")),
        version: Some(version("s", 1, 1)),
    };
    let Appended::Committed {
        positions,
        last_sequence,
        ..
    } = db
        .append(
            "s",
            0,
            &[ScopeEvent::ScopePaused {}, ScopeEvent::ScopeResumed {}],
            &meta,
            &first,
        )
        .await
        .unwrap()
    else {
        panic!("the first append commits")
    };
    assert_eq!(last_sequence, 2);
    assert_eq!(positions.len(), 2);
    assert!(positions[0] < positions[1]);

    // Decided on the state before that commit: refused, and its key version is not kept.
    let stale = KeyWrites {
        wrapping: None,
        version: Some(version("s", 2, 1)),
    };
    let outcome = db
        .append("s", 1, &[ScopeEvent::ScopePaused {}], &meta, &stale)
        .await
        .unwrap();
    assert_eq!(outcome, Appended::Conflict);
    assert_eq!(count(&db, "events").await, 2);
    assert_eq!(count(&db, "key_material").await, 1);
    let stored = db.events_after(0, 10).await.unwrap();
    let mine: Vec<i64> = stored.iter().map(|e| e.position).collect();
    assert_eq!(
        mine, positions,
        "the positions returned are the stored ones"
    );
    db.close().await;
}
on_both_backends!(append_writes_no_key_when_it_loses_the_race_for_its_sequence);

/// PostgreSQL: a caller that gives up while waiting for an organization's key lock (a client
/// that hangs up during a master-key switch) leaves no lock behind: once the holder lets go,
/// the next caller gets it. Before, the abandoned request's connection went back to the
/// pool, PostgreSQL granted it the lock later, and nobody ever released it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_org_keys_is_free_again_when_a_waiting_caller_gave_up() {
    let test_db = crate::harness::TestDb::new(crate::harness::Backend::Postgres).await;
    let db = ekm_store::Db::open(&test_db.config).await.unwrap();
    let ekm_store::Db::Postgres(pg) = &db else {
        unreachable!()
    };
    let org = uuid::Uuid::now_v7().to_string();
    // Someone holds the lock.
    let holder = db.lock_org_keys(&org).await.unwrap();
    // A caller waits for it, and is dropped while PostgreSQL has it queued.
    let waiting = {
        let db = db.clone();
        let org = org.clone();
        tokio::spawn(async move { db.lock_org_keys(&org).await.map(|_| ()) })
    };
    loop {
        let queued: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_one(&pg.pool)
        .await
        .unwrap();
        if queued > 0 {
            break;
        }
        tokio::task::yield_now().await;
    }
    waiting.abort();
    let _ = waiting.await;
    drop(holder);
    // The next caller gets the lock (the bound only turns a hang into a failure).
    let next = tokio::time::timeout(std::time::Duration::from_secs(30), db.lock_org_keys(&org))
        .await
        .expect("the organization's key lock was left held by the abandoned caller")
        .unwrap();
    drop(next);
    db.close().await;
}

/// A caller that gives up while its `BEGIN` is in flight (a client gone mid-command) leaves
/// no transaction behind on the pooled connection: sqlx 0.8.6 queues no rollback then
/// (transact-rs/sqlx#4393), and the pool's next borrower would write inside it, uncommitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_write_is_committed_when_an_earlier_begin_was_cancelled_in_flight() {
    use sqlx::{Acquire as _, Connection as _};
    use std::future::Future as _;
    let test_db = crate::harness::TestDb::new(crate::harness::Backend::Postgres).await;
    let url = test_db.url.clone().unwrap();
    let pool = ekm_store::pg_pool_options()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE written (n integer)")
        .execute(&pool)
        .await
        .unwrap();
    let (mut cancelled, mut written) = (0, 0);
    while cancelled < 3 {
        // Under load the answer may be read at the first poll more often: try more.
        assert!(written < 1000, "BEGIN was answered at once every time");
        let mut conn = pool.acquire().await.unwrap();
        {
            // BEGIN is sent on the first poll; its answer is (almost always) not read yet.
            // When it was, the transaction is dropped with a rollback queued: try again.
            let mut begin = std::pin::pin!((&mut conn).begin());
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            if begin.as_mut().poll(&mut cx).is_pending() {
                cancelled += 1;
            }
        }
        drop(conn);
        // The pool's next borrower (the same connection, the pool holds one) writes.
        sqlx::query("INSERT INTO written VALUES ($1)")
            .bind(written)
            .execute(&pool)
            .await
            .unwrap();
        written += 1;
    }
    let mut other = sqlx::PgConnection::connect(&url).await.unwrap();
    let committed: i64 = sqlx::query_scalar("SELECT count(*) FROM written")
        .fetch_one(&mut other)
        .await
        .unwrap();
    assert_eq!(
        committed, written,
        "every write through the pool is committed"
    );
    pool.close().await;
}
