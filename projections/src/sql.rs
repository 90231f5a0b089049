//! Read-model writes as data. A projection turns an event into row operations (pure); the
//! runner merges a whole batch of them into few statements and executes those inside its
//! transaction, on whichever backend is in use.
//!
//! The contract that makes merging correct: an `Insert` only ever creates a row that does
//! not exist yet, and an `Update` sets columns to values (never to expressions of the old
//! row) on a row whose `Insert` came earlier in the history. So within a batch all inserts
//! can run first, and for each row only the last value of each updated column matters.

use std::collections::HashMap;

/// A bound parameter. Only the types both backends share.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Param {
    Text(String),
    OptText(Option<String>),
    Int(i64),
    OptInt(Option<i64>),
    /// PostgreSQL only: one column of a merged statement, as an array.
    TextArray(Vec<Option<String>>),
    IntArray(Vec<Option<i64>>),
}

/// Which SQL a merged statement is written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// Multi-row `VALUES` lists (SQLite has no arrays).
    Sqlite,
    /// One array parameter per column through `UNNEST`: the SQL text does not depend on the
    /// number of rows, so PostgreSQL parses and plans each statement once per connection.
    Postgres,
    /// As `Postgres`, with inserts loaded by `COPY … FROM STDIN` (see
    /// `ProjectorConfig::bulk_copy` for when that is safe).
    PostgresCopy,
}

impl Param {
    fn is_int(&self) -> bool {
        matches!(self, Param::Int(_) | Param::OptInt(_) | Param::IntArray(_))
    }

    fn into_text(self) -> Option<String> {
        match self {
            Param::Text(v) => Some(v),
            Param::OptText(v) => v,
            Param::Int(v) => Some(v.to_string()),
            Param::OptInt(v) => v.map(|v| v.to_string()),
            Param::TextArray(_) | Param::IntArray(_) => None,
        }
    }

    fn into_int(self) -> Option<i64> {
        match self {
            Param::Int(v) => Some(v),
            Param::OptInt(v) => v,
            Param::Text(v) => v.parse().ok(),
            Param::OptText(v) => v.and_then(|v| v.parse().ok()),
            Param::TextArray(_) | Param::IntArray(_) => None,
        }
    }
}

/// The columns of `rows` as arrays, each typed by its first row.
fn columns_as_arrays(rows: Vec<Vec<Param>>, width: usize) -> (Vec<Param>, Vec<&'static str>) {
    let ints: Vec<bool> = (0..width)
        .map(|c| {
            rows.first()
                .and_then(|r| r.get(c))
                .is_some_and(Param::is_int)
        })
        .collect();
    let mut text: Vec<Vec<Option<String>>> = vec![vec![]; width];
    let mut int: Vec<Vec<Option<i64>>> = vec![vec![]; width];
    for row in rows {
        for (c, value) in row.into_iter().enumerate().take(width) {
            if ints[c] {
                int[c].push(value.into_int());
            } else {
                text[c].push(value.into_text());
            }
        }
    }
    let mut params = Vec::with_capacity(width);
    let mut casts = Vec::with_capacity(width);
    for c in 0..width {
        if ints[c] {
            params.push(Param::IntArray(std::mem::take(&mut int[c])));
            casts.push("int8[]");
        } else {
            params.push(Param::TextArray(std::mem::take(&mut text[c])));
            casts.push("text[]");
        }
    }
    (params, casts)
}

fn unnest(casts: &[&str]) -> String {
    let args: Vec<String> = casts
        .iter()
        .enumerate()
        .map(|(i, cast)| format!("${}::{cast}", i + 1))
        .collect();
    format!("UNNEST({})", args.join(", "))
}

/// One row operation.
#[derive(Clone, Debug, PartialEq)]
pub enum Statement {
    Insert {
        table: &'static str,
        columns: &'static [&'static str],
        values: Vec<Param>,
    },
    Update {
        table: &'static str,
        key_column: &'static str,
        key: Param,
        columns: &'static [&'static str],
        values: Vec<Param>,
    },
    /// Delete every row whose `key_column` equals `key`. Runs after the batch's inserts and
    /// updates: a deleted row is never written again later in the history.
    Delete {
        table: &'static str,
        key_column: &'static str,
        key: Param,
    },
    /// A statement that fits none of the above (a range update or delete). Runs after the
    /// batch's merged statements, in history order, so it sees every row the batch created.
    Raw {
        sql: &'static str,
        params: Vec<Param>,
    },
}

/// A table and its columns: the shape of a merged INSERT.
type InsertShape = (&'static str, &'static [&'static str]);
/// A row to update: table, key column, key.
type RowKey = (&'static str, &'static str, Param);
/// The shape of a merged UPDATE: table, key column, updated columns.
type UpdateShape = (&'static str, &'static str, Vec<&'static str>);
type Rows = Vec<Vec<Param>>;

/// Rows per merged statement: well under both backends' parameter limits.
const ROWS_PER_STATEMENT: usize = 500;

/// A statement ready to run: SQL with `$n` placeholders and its parameters, or (PostgreSQL
/// inserts) a `COPY … FROM STDIN` with its rows in COPY's text format.
pub struct Prepared {
    pub sql: String,
    pub params: Vec<Param>,
    pub copy: Option<Vec<u8>>,
}

/// Appends one value in COPY's text format: `\N` for NULL; backslash, tab, newline and
/// carriage return escaped.
fn copy_value(out: &mut Vec<u8>, value: Param) {
    let text = match value {
        Param::Int(v) => Some(v.to_string()),
        Param::OptInt(v) => v.map(|v| v.to_string()),
        Param::Text(v) => Some(v),
        Param::OptText(v) => v,
        Param::TextArray(_) | Param::IntArray(_) => None,
    };
    match text {
        None => out.extend_from_slice(b"\\N"),
        Some(text) => {
            for byte in text.bytes() {
                match byte {
                    b'\\' => out.extend_from_slice(b"\\\\"),
                    b'\t' => out.extend_from_slice(b"\\t"),
                    b'\n' => out.extend_from_slice(b"\\n"),
                    b'\r' => out.extend_from_slice(b"\\r"),
                    other => out.push(other),
                }
            }
        }
    }
}

/// Rows in COPY's text format.
fn copy_rows(rows: Vec<Vec<Param>>) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows.len() * 256);
    for row in rows {
        for (i, value) in row.into_iter().enumerate() {
            if i > 0 {
                out.push(b'\t');
            }
            copy_value(&mut out, value);
        }
        out.push(b'\n');
    }
    out
}

fn values_list(rows: usize, width: usize) -> String {
    (0..rows)
        .map(|r| {
            let cells: Vec<String> = (1..=width).map(|c| format!("${}", r * width + c)).collect();
            format!("({})", cells.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Merges a batch's row operations: multi-row INSERTs per table, then one multi-row UPDATE
/// per table and set of columns, each row carrying the last value of every column.
pub fn merge(statements: Vec<Statement>, dialect: Dialect) -> Vec<Prepared> {
    let mut inserts: Vec<(InsertShape, Rows)> = vec![];
    // (table, key column, key) → column → value, in first-seen order of rows.
    let mut updates: Vec<(RowKey, Vec<(&'static str, Param)>)> = vec![];
    let mut update_index: HashMap<RowKey, usize> = HashMap::new();
    let mut deletes: Vec<((&'static str, &'static str), Vec<Param>)> = vec![];
    let mut raw: Vec<Prepared> = vec![];
    // Rows this batch inserts, by (table, first column, its value): an update of such a row
    // is folded into the inserted values instead of becoming an UPDATE of its own.
    let mut inserted: HashMap<RowKey, (usize, usize)> = HashMap::new();
    for statement in statements {
        match statement {
            Statement::Insert {
                table,
                columns,
                values,
            } => {
                let group = match inserts
                    .iter()
                    .position(|(shape, _)| *shape == (table, columns))
                {
                    Some(group) => group,
                    None => {
                        inserts.push(((table, columns), vec![]));
                        inserts.len() - 1
                    }
                };
                if let (Some(column), Some(key)) = (columns.first(), values.first()) {
                    let row = inserts[group].1.len();
                    inserted.insert((table, *column, key.clone()), (group, row));
                }
                inserts[group].1.push(values);
            }
            Statement::Raw { sql, params } => raw.push(Prepared {
                sql: sql.to_owned(),
                params,
                copy: None,
            }),
            Statement::Delete {
                table,
                key_column,
                key,
            } => match deletes
                .iter_mut()
                .find(|(shape, _)| *shape == (table, key_column))
            {
                Some((_, keys)) => keys.push(key),
                None => deletes.push(((table, key_column), vec![key])),
            },
            Statement::Update {
                table,
                key_column,
                key,
                columns,
                values,
            } => {
                let row_key = (table, key_column, key);
                let mut columns: Vec<&'static str> = columns.to_vec();
                let mut values = values;
                if let Some(&(group, row)) = inserted.get(&row_key) {
                    let (shape, rows) = &mut inserts[group];
                    let mut rest = (vec![], vec![]);
                    for (column, value) in columns.into_iter().zip(values) {
                        match shape.1.iter().position(|c| *c == column) {
                            Some(i) => rows[row][i] = value,
                            None => {
                                rest.0.push(column);
                                rest.1.push(value);
                            }
                        }
                    }
                    if rest.0.is_empty() {
                        continue;
                    }
                    (columns, values) = rest;
                }
                let index = *update_index.entry(row_key.clone()).or_insert_with(|| {
                    updates.push((row_key, vec![]));
                    updates.len() - 1
                });
                let row = &mut updates[index].1;
                for (column, value) in columns.iter().zip(values) {
                    match row.iter_mut().find(|(c, _)| c == column) {
                        Some(cell) => cell.1 = value,
                        None => row.push((column, value)),
                    }
                }
            }
        }
    }
    let mut prepared = vec![];
    if dialect != Dialect::Sqlite {
        for ((table, columns), rows) in inserts {
            if dialect == Dialect::PostgresCopy {
                // Inserts only ever create rows (the merging contract), so COPY can load
                // them: the cheapest way into PostgreSQL, with no per-row parse.
                prepared.push(Prepared {
                    sql: format!("COPY {table} ({}) FROM STDIN", columns.join(", ")),
                    params: vec![],
                    copy: Some(copy_rows(rows)),
                });
                continue;
            }
            let (params, casts) = columns_as_arrays(rows, columns.len());
            prepared.push(Prepared {
                sql: format!(
                    "INSERT INTO {table} ({}) SELECT * FROM {}",
                    columns.join(", "),
                    unnest(&casts)
                ),
                params,
                copy: None,
            });
        }
        for ((table, key_column, columns), rows) in update_shapes(updates) {
            let (params, casts) = columns_as_arrays(rows, columns.len() + 1);
            let aliases: Vec<String> = (1..=columns.len() + 1).map(|i| format!("c{i}")).collect();
            let sets: Vec<String> = columns
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{c} = u.c{}", i + 2))
                .collect();
            prepared.push(Prepared {
                sql: format!(
                    "UPDATE {table} SET {} FROM {} AS u({}) WHERE {table}.{key_column} = u.c1",
                    sets.join(", "),
                    unnest(&casts),
                    aliases.join(", ")
                ),
                params,
                copy: None,
            });
        }
        for ((table, key_column), keys) in deletes {
            let rows = keys.into_iter().map(|k| vec![k]).collect();
            let (params, casts) = columns_as_arrays(rows, 1);
            prepared.push(Prepared {
                sql: format!(
                    "DELETE FROM {table} WHERE {key_column} = ANY($1::{})",
                    casts.first().copied().unwrap_or("text[]")
                ),
                params,
                copy: None,
            });
        }
        prepared.extend(raw);
        return prepared;
    }
    for ((table, columns), rows) in inserts {
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            prepared.push(Prepared {
                sql: format!(
                    "INSERT INTO {table} ({}) VALUES {}",
                    columns.join(", "),
                    values_list(chunk.len(), columns.len())
                ),
                params: chunk.iter().flatten().cloned().collect(),
                copy: None,
            });
        }
    }
    for ((table, key_column, columns), rows) in update_shapes(updates) {
        let sets: Vec<String> = columns
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c} = u.column{}", i + 2))
            .collect();
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            prepared.push(Prepared {
                // VALUES columns are named column1, column2, ... on both backends.
                sql: format!(
                    "UPDATE {table} SET {} FROM (VALUES {}) AS u WHERE {table}.{key_column} = u.column1",
                    sets.join(", "),
                    values_list(chunk.len(), columns.len() + 1)
                ),
                params: chunk.iter().flatten().cloned().collect(),
                copy: None,
            });
        }
    }
    for ((table, key_column), keys) in deletes {
        for chunk in keys.chunks(ROWS_PER_STATEMENT) {
            prepared.push(Prepared {
                sql: format!(
                    "DELETE FROM {table} WHERE {key_column} IN ({})",
                    (1..=chunk.len())
                        .map(|i| format!("${i}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                params: chunk.to_vec(),
                copy: None,
            });
        }
    }
    prepared.extend(raw);
    prepared
}

/// Updated rows grouped by their exact set of columns, each row as (key, values...).
fn update_shapes(updates: Vec<(RowKey, Vec<(&'static str, Param)>)>) -> Vec<(UpdateShape, Rows)> {
    let mut shapes: Vec<(UpdateShape, Rows)> = vec![];
    for ((table, key_column, key), cells) in updates {
        let columns: Vec<&'static str> = cells.iter().map(|(c, _)| *c).collect();
        let mut row = vec![key];
        row.extend(cells.into_iter().map(|(_, v)| v));
        let shape = (table, key_column, columns);
        match shapes.iter_mut().find(|(s, _)| *s == shape) {
            Some((_, rows)) => rows.push(row),
            None => shapes.push((shape, vec![row])),
        }
    }
    shapes
}

/// Executes prepared statements on `$conn` (a `&mut` SQLite connection or transaction).
macro_rules! execute_prepared_sqlite {
    ($conn:expr, $prepared:expr) => {
        for statement in $prepared {
            let mut query = sqlx::query(&statement.sql);
            for param in statement.params {
                query = match param {
                    $crate::sql::Param::Text(v) => query.bind(v),
                    $crate::sql::Param::OptText(v) => query.bind(v),
                    $crate::sql::Param::Int(v) => query.bind(v),
                    $crate::sql::Param::OptInt(v) => query.bind(v),
                    $crate::sql::Param::TextArray(_) | $crate::sql::Param::IntArray(_) => {
                        return Err($crate::error::ProjectionError::ArraysOnSqlite)
                    }
                };
            }
            query.execute(&mut *$conn).await?;
        }
    };
}

/// Executes prepared statements on `$conn` (a `&mut` PostgreSQL connection or transaction).
macro_rules! execute_prepared_postgres {
    ($conn:expr, $prepared:expr) => {
        for statement in $prepared {
            if let Some(rows) = statement.copy {
                let mut copy =
                    sqlx::postgres::PgConnection::copy_in_raw(&mut *$conn, &statement.sql).await?;
                copy.send(rows).await?;
                copy.finish().await?;
                continue;
            }
            let mut query = sqlx::query(&statement.sql);
            for param in statement.params {
                query = match param {
                    $crate::sql::Param::Text(v) => query.bind(v),
                    $crate::sql::Param::OptText(v) => query.bind(v),
                    $crate::sql::Param::Int(v) => query.bind(v),
                    $crate::sql::Param::OptInt(v) => query.bind(v),
                    $crate::sql::Param::TextArray(v) => query.bind(v),
                    $crate::sql::Param::IntArray(v) => query.bind(v),
                };
            }
            query.execute(&mut *$conn).await?;
        }
    };
}
pub(crate) use {execute_prepared_postgres, execute_prepared_sqlite};

#[cfg(test)]
mod tests {
    use super::*;

    fn update(key: &str, columns: &'static [&'static str], values: Vec<i64>) -> Statement {
        Statement::Update {
            table: "t",
            key_column: "id",
            key: Param::Text(key.into()),
            columns,
            values: values.into_iter().map(Param::Int).collect(),
        }
    }

    fn batch() -> Vec<Statement> {
        vec![
            Statement::Insert {
                table: "t",
                columns: &["id", "a"],
                values: vec![Param::Text("x".into()), Param::Int(1)],
            },
            update("z", &["a", "b"], vec![2, 3]),
            Statement::Insert {
                table: "t",
                columns: &["id", "a"],
                values: vec![Param::Text("y".into()), Param::Int(1)],
            },
            update("z", &["a"], vec![4]),
            update("w", &["a", "b"], vec![5, 6]),
        ]
    }

    #[test]
    fn updates_of_rows_the_batch_inserts_fold_into_the_insert() {
        let batch = vec![
            Statement::Insert {
                table: "t",
                columns: &["id", "a"],
                values: vec![Param::Text("x".into()), Param::Int(1)],
            },
            update("x", &["a", "b"], vec![2, 3]),
            update("x", &["a"], vec![4]),
            Statement::Insert {
                table: "t",
                columns: &["id", "a"],
                values: vec![Param::Text("y".into()), Param::Int(1)],
            },
            update("y", &["a"], vec![5]),
        ];
        let merged = merge(batch, Dialect::Sqlite);
        assert_eq!(merged.len(), 2);
        assert_eq!(
            merged[0].sql,
            "INSERT INTO t (id, a) VALUES ($1, $2), ($3, $4)"
        );
        assert_eq!(
            merged[0].params,
            vec![
                Param::Text("x".into()),
                Param::Int(4),
                Param::Text("y".into()),
                Param::Int(5),
            ]
        );
        // `b` is not among the inserted columns: it stays an update, of `x` only.
        assert_eq!(
            merged[1].sql,
            "UPDATE t SET b = u.column2 FROM (VALUES ($1, $2)) AS u WHERE t.id = u.column1"
        );
        assert_eq!(
            merged[1].params,
            vec![Param::Text("x".into()), Param::Int(3)]
        );
    }

    #[test]
    fn inserts_merge_per_table_and_updates_keep_the_last_value_per_column() {
        let merged = merge(batch(), Dialect::Sqlite);
        assert_eq!(merged.len(), 2);
        assert_eq!(
            merged[0].sql,
            "INSERT INTO t (id, a) VALUES ($1, $2), ($3, $4)"
        );
        assert_eq!(
            merged[1].sql,
            "UPDATE t SET a = u.column2, b = u.column3 FROM (VALUES ($1, $2, $3), ($4, $5, $6)) AS u WHERE t.id = u.column1"
        );
        assert_eq!(
            merged[1].params,
            vec![
                Param::Text("z".into()),
                Param::Int(4),
                Param::Int(3),
                Param::Text("w".into()),
                Param::Int(5),
                Param::Int(6),
            ]
        );
    }

    #[test]
    fn on_postgres_the_same_batch_becomes_array_statements_whatever_its_size() {
        let merged = merge(batch(), Dialect::Postgres);
        assert_eq!(merged.len(), 2);
        assert_eq!(
            merged[0].sql,
            "INSERT INTO t (id, a) SELECT * FROM UNNEST($1::text[], $2::int8[])"
        );
        assert_eq!(
            merged[0].params,
            vec![
                Param::TextArray(vec![Some("x".into()), Some("y".into())]),
                Param::IntArray(vec![Some(1), Some(1)]),
            ]
        );
        assert!(merged[1].copy.is_none());
        assert_eq!(
            merged[1].sql,
            "UPDATE t SET a = u.c2, b = u.c3 FROM UNNEST($1::text[], $2::int8[], $3::int8[]) AS u(c1, c2, c3) WHERE t.id = u.c1"
        );
        assert_eq!(
            merged[1].params,
            vec![
                Param::TextArray(vec![Some("z".into()), Some("w".into())]),
                Param::IntArray(vec![Some(4), Some(5)]),
                Param::IntArray(vec![Some(3), Some(6)]),
            ]
        );
    }

    #[test]
    fn copy_rows_escape_what_copy_text_format_reserves() {
        let rows = vec![
            vec![
                Param::Text("a\tb\nc\\d\re".into()),
                Param::OptText(None),
                Param::Int(-7),
                Param::OptInt(None),
            ],
            vec![
                Param::Text(r#"{"k":"v\"x"}"#.into()),
                Param::OptText(Some("\\N".into())),
                Param::OptInt(Some(3)),
                Param::Text(String::new()),
            ],
        ];
        assert_eq!(
            String::from_utf8(copy_rows(rows)).unwrap(),
            "a\\tb\\nc\\\\d\\re\t\\N\t-7\t\\N\n{\"k\":\"v\\\\\"x\"}\t\\\\N\t3\t\n"
        );
    }

    #[test]
    fn bulk_postgres_inserts_become_copy() {
        let prepared = merge(batch(), Dialect::PostgresCopy);
        let copy = prepared
            .iter()
            .find(|p| p.copy.is_some())
            .expect("a COPY for the inserts");
        assert_eq!(copy.sql, "COPY t (id, a) FROM STDIN");
        assert_eq!(copy.copy.as_deref(), Some(&b"x\t1\ny\t1\n"[..]));
    }
}
