//! Read-model writes as data: a projection turns an event into `Statement`s (pure), and the
//! runner executes them inside its transaction on whichever backend is in use.

/// A bound parameter. Only the types both backends share.
#[derive(Clone, Debug, PartialEq)]
pub enum Param {
    Text(String),
    OptText(Option<String>),
    Int(i64),
    OptInt(Option<i64>),
}

/// One SQL statement with `$n` placeholders (valid on SQLite and PostgreSQL alike).
#[derive(Clone, Debug, PartialEq)]
pub struct Statement {
    pub sql: &'static str,
    pub params: Vec<Param>,
}

impl Statement {
    pub fn new(sql: &'static str, params: Vec<Param>) -> Self {
        Self { sql, params }
    }
}

/// Executes statements on `$conn` (a `&mut` connection or transaction of either backend).
macro_rules! execute_statements {
    ($conn:expr, $statements:expr) => {
        for statement in $statements {
            let mut query = sqlx::query(statement.sql);
            for param in statement.params {
                query = match param {
                    $crate::sql::Param::Text(v) => query.bind(v),
                    $crate::sql::Param::OptText(v) => query.bind(v),
                    $crate::sql::Param::Int(v) => query.bind(v),
                    $crate::sql::Param::OptInt(v) => query.bind(v),
                };
            }
            query.execute(&mut *$conn).await?;
        }
    };
}
pub(crate) use execute_statements;
