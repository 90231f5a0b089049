//! `ekm_projections::merge` (a batch of row operations folded into few statements) leaves
//! the tables exactly as applying the same operations one by one does, for random batches
//! that keep the merging contract (`sql::Statement`): an insert creates a row that does not
//! exist yet, an update sets values on a row inserted earlier, a deleted row is never
//! written again. Every dialect, on its real database.

use ekm_projections::{merge, Dialect, Param, Prepared, Statement};
use proptest::prelude::*;
use sqlx::Connection;

use crate::harness::{Backend, TestDb};

const SHAPES: [&[&str]; 3] = [&["id", "a"], &["id", "a", "b"], &["id", "a", "b", "c"]];
const UPDATES: [&[&str]; 4] = [&["a"], &["b"], &["a", "c"], &["c", "b", "a"]];

/// One abstract operation; `pick` chooses among the rows it may apply to.
#[derive(Clone, Debug)]
enum Op {
    Insert {
        shape: usize,
        a: Option<i64>,
        b: Option<String>,
        c: Option<i64>,
    },
    Update {
        pick: usize,
        columns: usize,
        a: Option<i64>,
        b: Option<String>,
        c: Option<i64>,
    },
    Delete {
        pick: usize,
    },
    /// The second table: integer keys.
    InsertU {
        x: Option<String>,
    },
    UpdateU {
        pick: usize,
        x: Option<String>,
    },
    DeleteU {
        pick: usize,
    },
}

fn text() -> impl Strategy<Value = Option<String>> {
    // COPY's text format reserves backslash, tab, newline and carriage return; `\N` is its
    // NULL.
    proptest::option::of(prop_oneof![
        "[a-z]{0,8}",
        Just("a\tb\nc\\d\re".to_owned()),
        Just("\\N".to_owned()),
        Just(String::new()),
    ])
}

fn op() -> impl Strategy<Value = Op> {
    let int = || proptest::option::of(-5i64..1_000);
    prop_oneof![
        3 => (0..SHAPES.len(), int(), text(), int())
            .prop_map(|(shape, a, b, c)| Op::Insert { shape, a, b, c }),
        4 => (any::<usize>(), 0..UPDATES.len(), int(), text(), int())
            .prop_map(|(pick, columns, a, b, c)| Op::Update { pick, columns, a, b, c }),
        1 => any::<usize>().prop_map(|pick| Op::Delete { pick }),
        1 => text().prop_map(|x| Op::InsertU { x }),
        2 => (any::<usize>(), text()).prop_map(|(pick, x)| Op::UpdateU { pick, x }),
        1 => any::<usize>().prop_map(|pick| Op::DeleteU { pick }),
    ]
}

fn value(column: &str, a: &Option<i64>, b: &Option<String>, c: &Option<i64>) -> Param {
    match column {
        // Mixed `Int` and `OptInt` in one column, as projections write them.
        "a" => match a {
            Some(v) if v % 2 == 0 => Param::Int(*v),
            other => Param::OptInt(*other),
        },
        "b" => Param::OptText(b.clone()),
        _ => Param::OptInt(*c),
    }
}

/// Turns abstract operations into a batch that keeps the contract. `live` holds the rows
/// that exist before the batch (inserted by an earlier one) and grows as rows are inserted.
fn batch(
    ops: &[Op],
    live: &mut Vec<String>,
    live_u: &mut Vec<i64>,
    next: &mut i64,
) -> Vec<Statement> {
    let mut statements = vec![];
    for op in ops {
        match op {
            Op::Insert { shape, a, b, c } => {
                *next += 1;
                let id = format!("r{next}");
                let columns = SHAPES[*shape];
                let mut values = vec![Param::Text(id.clone())];
                values.extend(columns[1..].iter().map(|column| value(column, a, b, c)));
                statements.push(Statement::Insert {
                    table: "merge_t",
                    columns,
                    values,
                });
                live.push(id);
            }
            Op::Update {
                pick,
                columns,
                a,
                b,
                c,
            } if !live.is_empty() => {
                let id = live[pick % live.len()].clone();
                let columns = UPDATES[*columns];
                statements.push(Statement::Update {
                    table: "merge_t",
                    key_column: "id",
                    key: Param::Text(id),
                    columns,
                    values: columns
                        .iter()
                        .map(|column| value(column, a, b, c))
                        .collect(),
                });
            }
            Op::Delete { pick } if !live.is_empty() => {
                let id = live.remove(pick % live.len());
                statements.push(Statement::Delete {
                    table: "merge_t",
                    key_column: "id",
                    key: Param::Text(id),
                });
            }
            Op::InsertU { x } => {
                *next += 1;
                statements.push(Statement::Insert {
                    table: "merge_u",
                    columns: &["k", "x"],
                    values: vec![Param::Int(*next), Param::OptText(x.clone())],
                });
                live_u.push(*next);
            }
            Op::UpdateU { pick, x } if !live_u.is_empty() => {
                let k = live_u[pick % live_u.len()];
                statements.push(Statement::Update {
                    table: "merge_u",
                    key_column: "k",
                    key: Param::Int(k),
                    columns: &["x"],
                    values: vec![Param::OptText(x.clone())],
                });
            }
            Op::DeleteU { pick } if !live_u.is_empty() => {
                let k = live_u.remove(pick % live_u.len());
                statements.push(Statement::Delete {
                    table: "merge_u",
                    key_column: "k",
                    key: Param::Int(k),
                });
            }
            _ => {}
        }
    }
    statements
}

/// The same operation as plain SQL, one statement per operation.
fn one_by_one(statement: Statement) -> Prepared {
    let (sql, params) = match statement {
        Statement::Insert {
            table,
            columns,
            values,
        } => {
            let marks: Vec<String> = (1..=columns.len()).map(|i| format!("${i}")).collect();
            (
                format!(
                    "INSERT INTO {table} ({}) VALUES ({})",
                    columns.join(", "),
                    marks.join(", ")
                ),
                values,
            )
        }
        Statement::Update {
            table,
            key_column,
            key,
            columns,
            values,
        } => {
            let sets: Vec<String> = columns
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{c} = ${}", i + 1))
                .collect();
            let mut params = values;
            params.push(key);
            (
                format!(
                    "UPDATE {table} SET {} WHERE {key_column} = ${}",
                    sets.join(", "),
                    columns.len() + 1
                ),
                params,
            )
        }
        Statement::Delete {
            table,
            key_column,
            key,
        } => (
            format!("DELETE FROM {table} WHERE {key_column} = $1"),
            vec![key],
        ),
        Statement::Raw { sql, params } => (sql.to_owned(), params),
    };
    Prepared {
        sql,
        params,
        copy: None,
    }
}

/// Two databases (SQLite files, or PostgreSQL schemas) with the same tables.
enum Pair {
    Sqlite(sqlx::SqliteConnection, sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection, sqlx::PgConnection),
}

const TABLES: &str = "CREATE TABLE merge_t (id text PRIMARY KEY, a bigint, b text, c bigint); \
                      CREATE TABLE merge_u (k bigint PRIMARY KEY, x text);";

/// The pair for test case number `case`, in the test's database.
async fn pair(test_db: &TestDb, case: usize) -> Pair {
    match &test_db.url {
        None => {
            let open = |name: &str| {
                let path = test_db.data_dir().join(format!("{case}-{name}"));
                sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(path)
                    .create_if_missing(true)
            };
            let mut one = sqlx::SqliteConnection::connect_with(&open("one.db"))
                .await
                .unwrap();
            let mut merged = sqlx::SqliteConnection::connect_with(&open("merged.db"))
                .await
                .unwrap();
            for conn in [&mut one, &mut merged] {
                sqlx::raw_sql(TABLES).execute(&mut *conn).await.unwrap();
            }
            Pair::Sqlite(one, merged)
        }
        Some(url) => {
            let mut conns = vec![];
            for side in ["one", "merged"] {
                let schema = format!("{side}_{case}");
                let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
                sqlx::raw_sql(&format!(
                    "CREATE SCHEMA {schema}; SET search_path TO {schema}; {TABLES}"
                ))
                .execute(&mut conn)
                .await
                .unwrap();
                conns.push(conn);
            }
            let merged = conns.pop().unwrap();
            Pair::Postgres(conns.pop().unwrap(), merged)
        }
    }
}

macro_rules! bind_all {
    ($query:expr, $params:expr) => {{
        let mut query = $query;
        for param in $params {
            query = match param {
                Param::Text(v) => query.bind(v),
                Param::OptText(v) => query.bind(v),
                Param::Int(v) => query.bind(v),
                Param::OptInt(v) => query.bind(v),
                Param::TextArray(v) => bind_array!(query, v),
                Param::IntArray(v) => bind_array!(query, v),
            };
        }
        query
    }};
}

async fn run_sqlite(conn: &mut sqlx::SqliteConnection, prepared: Vec<Prepared>) {
    let mut tx = conn.begin().await.unwrap();
    for statement in prepared {
        assert!(statement.copy.is_none());
        macro_rules! bind_array {
            ($query:expr, $v:expr) => {{
                let _ = $v;
                panic!("arrays on SQLite")
            }};
        }
        bind_all!(sqlx::query(&statement.sql), statement.params)
            .execute(&mut *tx)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", statement.sql));
    }
    tx.commit().await.unwrap();
}

async fn run_postgres(conn: &mut sqlx::PgConnection, prepared: Vec<Prepared>) {
    let mut tx = conn.begin().await.unwrap();
    for statement in prepared {
        if let Some(rows) = statement.copy {
            let mut copy = tx.copy_in_raw(&statement.sql).await.unwrap();
            copy.send(rows).await.unwrap();
            copy.finish().await.unwrap();
            continue;
        }
        macro_rules! bind_array {
            ($query:expr, $v:expr) => {
                $query.bind($v)
            };
        }
        bind_all!(sqlx::query(&statement.sql), statement.params)
            .execute(&mut *tx)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", statement.sql));
    }
    tx.commit().await.unwrap();
}

const DUMP: [&str; 2] = [
    "SELECT id || '|' || COALESCE(CAST(a AS TEXT), '<null>') || '|' || COALESCE(b, '<null>') || '|' || COALESCE(CAST(c AS TEXT), '<null>') FROM merge_t ORDER BY id",
    "SELECT CAST(k AS TEXT) || '|' || COALESCE(x, '<null>') FROM merge_u ORDER BY k",
];

async fn dumps(pair: &mut Pair) -> (Vec<String>, Vec<String>) {
    let (mut one, mut merged) = (vec![], vec![]);
    for sql in DUMP {
        match pair {
            Pair::Sqlite(a, b) => {
                one.extend(
                    sqlx::query_scalar::<_, String>(sql)
                        .fetch_all(&mut *a)
                        .await
                        .unwrap(),
                );
                merged.extend(
                    sqlx::query_scalar::<_, String>(sql)
                        .fetch_all(&mut *b)
                        .await
                        .unwrap(),
                );
            }
            Pair::Postgres(a, b) => {
                one.extend(
                    sqlx::query_scalar::<_, String>(sql)
                        .fetch_all(&mut *a)
                        .await
                        .unwrap(),
                );
                merged.extend(
                    sqlx::query_scalar::<_, String>(sql)
                        .fetch_all(&mut *b)
                        .await
                        .unwrap(),
                );
            }
        }
    }
    (one, merged)
}

/// Applies each batch one by one on one side and merged (in `dialect`) on the other; the
/// tables must be equal after every batch.
async fn check(
    pair: &mut Pair,
    dialect: Dialect,
    batches: Vec<Vec<Op>>,
) -> Result<(), TestCaseError> {
    let (mut live, mut live_u, mut next) = (vec![], vec![], 0);
    for ops in batches {
        let statements = batch(&ops, &mut live, &mut live_u, &mut next);
        let singles: Vec<Prepared> = statements.iter().cloned().map(one_by_one).collect();
        let merged = merge(statements, dialect);
        match pair {
            Pair::Sqlite(one, other) => {
                run_sqlite(one, singles).await;
                run_sqlite(other, merged).await;
            }
            Pair::Postgres(one, other) => {
                run_postgres(one, singles).await;
                run_postgres(other, merged).await;
            }
        }
        let (one, merged) = dumps(pair).await;
        prop_assert_eq!(merged, one);
    }
    Ok(())
}

fn run(backend: Backend, dialect: Dialect, cases: u32) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(cases));
    let batches = proptest::collection::vec(proptest::collection::vec(op(), 0..40), 1..5);
    let test_db = runtime.block_on(TestDb::new(backend));
    let cases = std::sync::atomic::AtomicUsize::new(0);
    runner
        .run(&batches, |batches| {
            let case = cases.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            runtime.block_on(async {
                let mut pair = pair(&test_db, case).await;
                check(&mut pair, dialect, batches).await
            })
        })
        .unwrap();
}

#[test]
fn merge_equals_one_by_one_application_when_batches_are_random_on_sqlite() {
    run(Backend::Sqlite, Dialect::Sqlite, 64);
}

#[test]
fn merge_equals_one_by_one_application_when_batches_are_random_on_postgres() {
    run(Backend::Postgres, Dialect::Postgres, 24);
}

#[test]
fn merge_with_copy_equals_one_by_one_application_when_batches_are_random() {
    run(Backend::Postgres, Dialect::PostgresCopy, 24);
}
