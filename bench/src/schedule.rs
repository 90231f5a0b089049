//! The scheduler's lateness (issue 17 §2): `actions` pauses given `until`, and how late each
//! resume was recorded after its due time, on a real `ekm serve` (release): SQLite with one
//! instance, PostgreSQL with two on one database (each action must still fire once). Two
//! shapes: due times spread over `spread_ms`, and every action due at the same instant (a
//! burst). The baseline is a bare timer: `tokio::time::sleep_until` in this process for the
//! same instants, in the same run.

use std::io::Write;
use std::time::Duration;

use anyhow::bail;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use tokio::task::JoinSet;

use crate::all::{call, create_org, create_scope};
use crate::report::quantile;
use crate::server::{self, Server};
use crate::BenchDb;

/// Requests in flight while setting up.
const CLIENTS: usize = 8;
/// The first action is due this long after the setup ends.
const LEAD: Duration = Duration::from_secs(2);

pub(crate) struct Shape {
    pub(crate) name: &'static str,
    /// Milliseconds between the first and the last due time.
    pub(crate) spread_ms: i64,
}

pub(crate) struct Lateness {
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
}

fn lateness(values: &mut [f64]) -> Lateness {
    values.sort_by(f64::total_cmp);
    Lateness {
        p50: quantile(values, 0.5),
        p99: quantile(values, 0.99),
        max: values.last().copied().unwrap_or(0.0),
    }
}

/// Creates `n` teams under the organization, `CLIENTS` requests at a time.
async fn teams(base: &str, admin: &str, org: &str, n: usize) -> anyhow::Result<Vec<String>> {
    let client = reqwest::Client::new();
    let mut out = vec![];
    for chunk in (0..n).collect::<Vec<_>>().chunks(CLIENTS) {
        let mut set = JoinSet::new();
        for i in chunk {
            let (client, base, admin, org) = (
                client.clone(),
                base.to_owned(),
                admin.to_owned(),
                org.to_owned(),
            );
            let name = format!("t{i}");
            set.spawn(
                async move { create_scope(&client, &base, &admin, "team", &name, &org).await },
            );
        }
        while let Some(made) = set.join_next().await {
            out.push(made??);
        }
    }
    Ok(out)
}

/// Pauses each team until its due time.
async fn pause_until(
    base: &str,
    admin: &str,
    due: &[(String, DateTime<Utc>)],
) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    for chunk in due.chunks(CLIENTS) {
        let mut set = JoinSet::new();
        for (team, at) in chunk {
            let url = format!("{base}/v1/scopes/{team}/pause");
            let body = json!({"reason": "bench", "until": at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)});
            let (client, admin) = (client.clone(), admin.to_owned());
            set.spawn(async move { call(&client, url, &admin, body).await });
        }
        while let Some(done) = set.join_next().await {
            done??;
        }
    }
    Ok(())
}

/// The organization's `scope.resume` audit entries: (scope id, recorded at, actor).
async fn resumes(base: &str, admin: &str) -> anyhow::Result<Vec<(String, DateTime<Utc>, String)>> {
    let client = reqwest::Client::new();
    let mut out = vec![];
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{base}/v1/audit?action=scope.resume&limit=500");
        if let Some(cursor) = &cursor {
            url.push_str(&format!("&cursor={cursor}"));
        }
        let page: Value = client
            .get(&url)
            .bearer_auth(admin)
            .send()
            .await?
            .json()
            .await?;
        for item in page["items"].as_array().cloned().unwrap_or_default() {
            let at = DateTime::parse_from_rfc3339(item["recorded_at"].as_str().unwrap_or(""))?;
            out.push((
                item["scope_id"].as_str().unwrap_or("").to_owned(),
                at.with_timezone(&Utc),
                item["actor"].as_str().unwrap_or("").to_owned(),
            ));
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return Ok(out),
        }
    }
}

/// One shape on running servers (the first takes the requests): the scheduler's lateness
/// and the bare timer's, in milliseconds.
pub(crate) async fn measure(
    servers: &[Server],
    actions: usize,
    shape: &Shape,
) -> anyhow::Result<(Lateness, Lateness)> {
    let first = &servers[0];
    let client = reqwest::Client::new();
    let org = create_org(&client, &first.base, &first.operator_token()?).await?;
    let teams = teams(&first.base, &org.admin, &org.id, actions).await?;
    // Due times: after the pauses are all in (at about 1 ms a pause, with room).
    let setup = Duration::from_millis(actions as u64 * 2);
    let start = Utc::now() + chrono::Duration::from_std(setup + LEAD)?;
    let step = shape.spread_ms as f64 / actions.max(2).saturating_sub(1) as f64;
    let due: Vec<(String, DateTime<Utc>)> = teams
        .into_iter()
        .enumerate()
        .map(|(i, team)| {
            (
                team,
                start + chrono::Duration::microseconds((i as f64 * step * 1000.0) as i64),
            )
        })
        .collect();
    pause_until(&first.base, &org.admin, &due).await?;
    if Utc::now() >= start {
        bail!("setting up took past the first due time: raise LEAD");
    }
    // The baseline: a bare timer for each of the same instants.
    let mut timers = JoinSet::new();
    for (_, at) in &due {
        let at = *at;
        timers.spawn(async move {
            let wait = (at - Utc::now()).to_std().unwrap_or_default();
            tokio::time::sleep_until(tokio::time::Instant::now() + wait).await;
            (Utc::now() - at).num_microseconds().unwrap_or(0) as f64 / 1000.0
        });
    }
    let mut bare = vec![];
    while let Some(late) = timers.join_next().await {
        bare.push(late?);
    }
    // Then wait for every resume to be recorded (at most 60 s past the last due time).
    let last = due.last().map(|(_, at)| *at).unwrap_or(start);
    let deadline = last + chrono::Duration::seconds(60);
    let recorded = loop {
        let recorded = resumes(&first.base, &org.admin).await?;
        if recorded.len() >= actions || Utc::now() > deadline {
            break recorded;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let due_of: std::collections::HashMap<&str, DateTime<Utc>> =
        due.iter().map(|(team, at)| (team.as_str(), *at)).collect();
    let mut seen = std::collections::HashSet::new();
    let mut late = vec![];
    for (scope, at, actor) in &recorded {
        if actor != "system:scheduler" || !seen.insert(scope.clone()) {
            bail!(
                "{scope}: resumed by {actor}, or twice ({} resumes for {actions} actions)",
                recorded.len()
            );
        }
        let Some(due) = due_of.get(scope.as_str()) else {
            bail!("a resume of a scope not paused here: {scope}");
        };
        late.push((*at - *due).num_microseconds().unwrap_or(0) as f64 / 1000.0);
    }
    if late.len() != actions {
        bail!(
            "{} of {actions} actions fired within 60 s of the last due time",
            late.len()
        );
    }
    Ok((lateness(&mut late), lateness(&mut bare)))
}

pub async fn run(actions: usize, spread_ms: i64) -> anyhow::Result<()> {
    let shapes = [
        Shape {
            name: "spread",
            spread_ms,
        },
        Shape {
            name: "burst",
            spread_ms: 0,
        },
    ];
    let mut table = vec![
        "| backend | shape | lateness p50 | p99 | max | bare timer p50 / p99 (ms) |".to_owned(),
        "|---|---|---|---|---|---|".to_owned(),
    ];
    // SQLite: one instance.
    let dir = server::temp_path("ekm-bench-schedule-sqlite");
    let _ = std::fs::remove_dir_all(&dir);
    let (sqlite, _) = Server::start(&dir, None).await?;
    let mut rows = vec![];
    for shape in &shapes {
        rows.push((
            "SQLite, 1 instance",
            shape.name,
            measure(std::slice::from_ref(&sqlite), actions, shape).await?,
        ));
    }
    sqlite.stop();
    let _ = std::fs::remove_dir_all(&dir);
    // PostgreSQL: two instances on one database; each action must still fire once.
    let db = BenchDb::create().await?;
    let dir = server::temp_path("ekm-bench-schedule-pg");
    let _ = std::fs::remove_dir_all(&dir);
    let (a, _) = Server::start(&dir, Some(&db.url)).await?;
    // The second on the same data directory: the same master key file, as in `all`.
    let (b, _) = Server::start(&dir, Some(&db.url)).await?;
    let servers = [a, b];
    for shape in &shapes {
        rows.push((
            "PostgreSQL, 2 instances",
            shape.name,
            measure(&servers, actions, shape).await?,
        ));
    }
    for server in servers {
        server.stop();
    }
    db.drop_db().await?;
    let _ = std::fs::remove_dir_all(&dir);
    for (backend, shape, (late, bare)) in rows {
        let shape = match shape {
            "spread" => format!("{actions} due over {spread_ms} ms"),
            _ => format!("{actions} due at one instant"),
        };
        table.push(format!(
            "| {backend} | {shape} | {:.1} ms | {:.1} ms | {:.1} ms | {:.2} / {:.2} |",
            late.p50, late.p99, late.max, bare.p50, bare.p99
        ));
    }
    let mut out = std::io::stdout().lock();
    for line in table {
        writeln!(out, "{line}")?;
    }
    Ok(())
}
