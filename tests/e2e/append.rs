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
    let stored = db.events_through(0, i64::MAX, 10).await.unwrap();
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

/// Holds every group-commit flush of `db` at its write: a PostgreSQL lock that `INSERT`
/// waits for, or SQLite's one writer connection. Dropping or releasing it lets them go.
enum Block {
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
    Sqlite(sqlx::pool::PoolConnection<sqlx::Sqlite>),
}

impl Block {
    async fn new(db: &Db) -> Block {
        match db {
            Db::Postgres(pg) => {
                let mut tx = pg.pool.begin().await.unwrap();
                sqlx::query("LOCK TABLE events IN SHARE MODE")
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                Block::Postgres(tx)
            }
            Db::Sqlite(lite) => Block::Sqlite(lite.write.acquire().await.unwrap()),
        }
    }

    async fn release(self) {
        match self {
            Block::Postgres(tx) => tx.commit().await.unwrap(),
            Block::Sqlite(conn) => drop(conn),
        }
    }
}

/// Fills every flush slot of the group commit with one append each (held by `block`), so
/// that what is appended next waits in the queue and forms one batch.
async fn occupy_flushers(db: &Db) -> Vec<tokio::task::JoinHandle<Appended>> {
    let flushers = occupy_count(db);
    let mut batches = db.group_batches();
    let before = *batches.borrow();
    let mut running = vec![];
    for i in 0..flushers {
        let db = db.clone();
        running.push(tokio::spawn(async move {
            db.append(
                &format!("occupant-{i}"),
                0,
                &[ScopeEvent::ScopePaused {}],
                &HashMap::new(),
                &KeyWrites::default(),
            )
            .await
            .unwrap()
        }));
        batches
            .wait_for(|taken| *taken > before + i as u64)
            .await
            .unwrap();
    }
    running
}

/// Queues an append without waiting for it: polled once, it is in the group's queue.
async fn queue<'a>(
    append: impl std::future::Future<Output = Result<Appended, ekm_store::StoreError>> + Send + 'a,
) -> std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Appended, ekm_store::StoreError>> + Send + 'a>,
> {
    let mut append = Box::pin(append);
    assert!(
        futures_util::future::poll_immediate(&mut append)
            .await
            .is_none(),
        "an append answered while every flush was held"
    );
    append
}

fn committed(outcome: Appended) -> Vec<ekm_store::StoredEvent> {
    match outcome {
        Appended::Committed { events, .. } => events,
        other => panic!("expected a commit, got {other:?}"),
    }
}

/// Group commit (ADR 0024): appends that arrive while the flushes are busy share one
/// transaction, and each command still gets exactly its own events back, in order.
async fn appends_waiting_together_share_one_commit_and_each_gets_its_own_events(backend: Backend) {
    let test_db = TestDb::new(backend).await;
    let db = Db::open(&test_db.config).await.unwrap();
    let meta = HashMap::new();
    let none = KeyWrites::default();
    let block = Block::new(&db).await;
    let occupants = occupy_flushers(&db).await;
    let taken_before = *db.group_batches().borrow();

    let two = [ScopeEvent::ScopePaused {}, ScopeEvent::ScopeResumed {}];
    let one = [ScopeEvent::ScopePaused {}];
    let a = queue(db.append("a", 0, &two, &meta, &none)).await;
    let b = queue(db.append("b", 0, &one, &meta, &none)).await;
    let c = queue(db.append("c", 0, &two, &meta, &none)).await;
    block.release().await;
    let (a, b, c) = tokio::join!(a, b, c);
    for occupant in occupants {
        committed(occupant.await.unwrap());
    }
    let (a, b, c) = (
        committed(a.unwrap()),
        committed(b.unwrap()),
        committed(c.unwrap()),
    );

    for (events, id, count) in [(&a, "a", 2), (&b, "b", 1), (&c, "c", 2)] {
        assert_eq!(events.len(), count, "{id} got its own events only");
        assert!(events.iter().all(|e| e.aggregate_id == id));
        let sequences: Vec<i64> = events.iter().map(|e| e.sequence).collect();
        assert_eq!(sequences, (1..=count as i64).collect::<Vec<_>>());
    }
    assert_eq!(
        *db.group_batches().borrow(),
        taken_before + 1,
        "the three waiting appends were written as one batch"
    );
    if db.is_postgres() {
        // One transaction: positions derive from its id (migration 0013).
        let transactions: std::collections::HashSet<i64> = a
            .iter()
            .chain(&b)
            .chain(&c)
            .map(|e| e.position >> 13)
            .collect();
        assert_eq!(transactions.len(), 1, "one transaction holds the batch");
    }
    let stored = db.events_through(0, i64::MAX, 100).await.unwrap();
    assert_eq!(stored.len(), 5 + occupy_count(&db));
    db.close().await;
}
on_both_backends!(appends_waiting_together_share_one_commit_and_each_gets_its_own_events);

/// The group commit's flush slots (`PG_FLUSHERS`; SQLite has one writer).
fn occupy_count(_db: &Db) -> usize {
    1
}

/// One command of a batch that loses its race (its sequence taken, its key's epoch gone, or
/// a second command on the same scope in the same batch) fails alone: its neighbours in
/// the batch commit, and nothing of the loser is stored.
async fn a_command_that_loses_its_race_in_a_batch_does_not_fail_its_neighbours(backend: Backend) {
    let test_db = TestDb::new(backend).await;
    let db = Db::open(&test_db.config).await.unwrap();
    let meta = HashMap::new();
    let none = KeyWrites::default();
    let one = [ScopeEvent::ScopePaused {}];
    committed(db.append("taken", 0, &one, &meta, &none).await.unwrap());

    let block = Block::new(&db).await;
    let occupants = occupy_flushers(&db).await;
    let raced = KeyWrites {
        wrapping: None,
        version: Some(version("raced", 1, 7)),
    };
    let taken_before = *db.group_batches().borrow();
    let stale = queue(db.append("taken", 0, &one, &meta, &none)).await;
    let before = queue(db.append("before", 0, &one, &meta, &none)).await;
    let keys = queue(db.append("raced", 0, &one, &meta, &raced)).await;
    let twice_first = queue(db.append("twice", 0, &one, &meta, &none)).await;
    let twice_second = queue(db.append("twice", 0, &one, &meta, &none)).await;
    let after = queue(db.append("after", 0, &one, &meta, &none)).await;
    block.release().await;
    let (stale, before, keys, twice_first, twice_second, after) =
        tokio::join!(stale, before, keys, twice_first, twice_second, after);
    for occupant in occupants {
        committed(occupant.await.unwrap());
    }

    assert_eq!(stale.unwrap(), Appended::Conflict);
    assert_eq!(keys.unwrap(), Appended::KeysRaced);
    assert_eq!(committed(before.unwrap())[0].aggregate_id, "before");
    assert_eq!(committed(after.unwrap())[0].aggregate_id, "after");
    assert_eq!(committed(twice_first.unwrap())[0].aggregate_id, "twice");
    assert_eq!(
        twice_second.unwrap(),
        Appended::Conflict,
        "the second append on a scope waits for the next batch and meets the first"
    );
    assert_eq!(
        *db.group_batches().borrow(),
        taken_before + 2,
        "the waiting appends made two batches: the second append on `twice` in the later one"
    );
    let stored = db.events_through(0, i64::MAX, 100).await.unwrap();
    let mut ids: Vec<&str> = stored.iter().map(|e| e.aggregate_id.as_str()).collect();
    ids.sort_unstable();
    let mut expected = vec!["after", "before", "taken", "twice"];
    expected.extend((0..occupy_count(&db)).map(|i| ["occupant-0", "occupant-1"][i]));
    expected.sort_unstable();
    assert_eq!(
        ids, expected,
        "the losers stored nothing, the others everything"
    );
    assert_eq!(count(&db, "key_material").await, 0);
    db.close().await;
}
on_both_backends!(a_command_that_loses_its_race_in_a_batch_does_not_fail_its_neighbours);
