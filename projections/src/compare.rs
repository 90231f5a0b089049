//! The rows of every rebuildable read model, as text: what "the read models equal a rebuild"
//! compares (the rebuild tests, and the kill -9 tool of `ekm-bench`).

use ekm_store::Db;

use crate::error::ProjectionError;
use crate::runner::standard_projections;

/// The tables of every rebuildable read model, as the projections declare them.
pub fn read_model_tables() -> Vec<&'static str> {
    standard_projections(None)
        .iter()
        .filter(|p| p.rebuildable())
        .flat_map(|p| p.tables().iter().copied())
        .collect()
}

/// Every column of `table`, from the database's own catalog: a column added by a later
/// migration is compared without anyone remembering to list it.
pub async fn table_columns(db: &Db, table: &str) -> Result<Vec<String>, ProjectionError> {
    let columns: Vec<String> = match db {
        Db::Sqlite(sqlite) => {
            sqlx::query_scalar("SELECT name FROM pragma_table_info($1) ORDER BY cid")
                .bind(table)
                .fetch_all(&sqlite.read)
                .await?
        }
        Db::Postgres(pg) => {
            sqlx::query_scalar(
                "SELECT column_name::text FROM information_schema.columns \
                 WHERE table_schema = 'public' AND table_name = $1 ORDER BY ordinal_position",
            )
            .bind(table)
            .fetch_all(&pg.pool)
            .await?
        }
    };
    Ok(columns)
}

/// Every row of `table`, every column, as text (`table: col=value|…`), sorted.
pub async fn table_rows(db: &Db, table: &str) -> Result<Vec<String>, ProjectionError> {
    let cells: Vec<String> = table_columns(db, table)
        .await?
        .iter()
        .map(|c| format!("'{c}=' || COALESCE(CAST({c} AS TEXT), '<null>')"))
        .collect();
    if cells.is_empty() {
        return Ok(vec![]);
    }
    let sql = format!("SELECT {} AS row FROM {table}", cells.join(" || '|' || "));
    let mut rows: Vec<String> = ekm_store::with_read_pool!(db, pool => {
        sqlx::query_scalar(&sql).fetch_all(pool).await?
    });
    rows.sort();
    Ok(rows.into_iter().map(|r| format!("{table}: {r}")).collect())
}

/// Every row of every rebuildable read model, every column, as text, sorted per table.
pub async fn read_model_rows(db: &Db) -> Result<Vec<String>, ProjectionError> {
    let mut out = vec![];
    for table in read_model_tables() {
        out.extend(table_rows(db, table).await?);
    }
    Ok(out)
}

/// The rows of `expected` missing from `actual`, and those of `actual` not in `expected`.
pub fn row_differences<'a>(
    actual: &'a [String],
    expected: &'a [String],
) -> (Vec<&'a String>, Vec<&'a String>) {
    let have: std::collections::HashSet<&String> = actual.iter().collect();
    let want: std::collections::HashSet<&String> = expected.iter().collect();
    let missing = expected.iter().filter(|r| !have.contains(r)).collect();
    let extra = actual.iter().filter(|r| !want.contains(r)).collect();
    (missing, extra)
}
