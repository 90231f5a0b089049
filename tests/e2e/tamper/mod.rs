//! Tamper evidence that does not trust the database (ADR 0018): the guards an attacker with
//! SQL access meets first (`guards`), what `ekm audit verify` finds after each kind of
//! tampering with the chain (`chain`) and the access tables (`access`); helpers here.

use std::path::Path;
use std::process::Command;

use ekm_store::{Db, StoredEvent};
use serde_json::Value;

use crate::audit::{drop_immutability, exec};
use crate::harness::{Backend, TestApp};
use crate::on_both_backends;

mod access;
mod chain;
mod guards;

/// Runs `sql` and returns the database's refusal, if any.
pub async fn try_exec(db: &Db, sql: &str) -> Result<(), String> {
    ekm_store::with_write_pool!(db, pool => {
        sqlx::raw_sql(sql)
            .execute(pool)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
}

pub async fn count(db: &Db, sql: &str) -> i64 {
    ekm_store::with_read_pool!(db, pool => {
        sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
    })
}

// ---------------------------------------------------------------------------------------
// What `ekm audit verify` finds, by kind and position of the first bad entry.

/// `ekm audit verify --json`, as an auditor runs it: its exit status and its reports.
pub fn verify(app: &TestApp, org: Option<&str>, head_file: Option<&Path>) -> (bool, Vec<Value>) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ekm"));
    command
        .args(["audit", "verify", "--json", "--data-dir"])
        .arg(app.data_dir())
        .env_remove("EKM_DATABASE_URL");
    if let Some(url) = app.database_url() {
        command.args(["--database-url", url]);
    }
    if let Some(org) = org {
        command.args(["--org", org]);
    }
    if let Some(path) = head_file {
        command.arg("--head-file").arg(path);
    }
    let output = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let reports: Vec<Value> = serde_json::from_str(&stdout).unwrap_or_else(|_| {
        panic!(
            "not JSON: {stdout} {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status.success(), reports)
}

/// Runs `command` to its end, or kills it and fails if it is still running after `limit`
/// (a server that should have refused to start).
pub fn exits_within(mut command: Command, limit: std::time::Duration) -> std::process::Output {
    let child = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match finished.recv_timeout(limit) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            panic!("the command was still running after {limit:?}");
        }
    }
}

/// A running `ekm serve`, killed when dropped.
pub struct Served(std::process::Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `command` (an `ekm --log-format json serve …`) and returns once it logs that it
/// listens; fails with its log if it exits first or is not ready within a minute.
pub fn serve_until_listening(mut command: Command) -> Served {
    let mut child = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let served = Served(child);
    let (ready, listening) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut log = vec![];
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("\"listening\"") {
                let _ = ready.send(Ok(()));
            }
            log.push(line);
        }
        let _ = ready.send(Err(log.join("\n")));
    });
    listening
        .recv_timeout(std::time::Duration::from_secs(60))
        .unwrap()
        .unwrap_or_else(|log| panic!("ekm serve did not start: {log}"));
    served
}

/// The kind and position of `org`'s first bad entry (None when its chain verifies).
pub fn first_failure(reports: &[Value], org: &str) -> Option<(String, i64)> {
    let report = reports
        .iter()
        .find(|r| r["org_id"] == org)
        .unwrap_or_else(|| panic!("no report for {org}: {reports:?}"));
    let failure = &report["first_failure"];
    if failure.is_null() {
        // Only the access tables can fail a report whose chain verifies.
        let clean = report["access_mismatches"].as_array().unwrap().is_empty();
        assert_eq!(report["ok"], clean, "{report}");
        return None;
    }
    assert_eq!(report["ok"], false, "{report}");
    Some((
        failure["problem"].as_str().unwrap().to_owned(),
        failure["position"].as_i64().unwrap(),
    ))
}

/// An organization with a team paused, resumed and paused again; its events in order.
pub async fn history(app: &TestApp) -> (String, String, String, Vec<StoredEvent>) {
    let (org, admin) = app.org("enterprise").await;
    let team = app.scope(&admin, "team", "research", &org).await;
    app.pause(&admin, &team).await;
    app.resume(&admin, &team).await;
    app.pause(&admin, &team).await;
    // The runner seals behind the answers (ADR 0020): tampering starts from sealed history.
    app.app.refresh().await.unwrap();
    let events = org_events(&app.db, &org).await;
    (org, admin, team, events)
}

pub async fn org_events(db: &Db, org: &str) -> Vec<StoredEvent> {
    let positions: Vec<i64> = ekm_store::with_read_pool!(db, pool => {
        sqlx::query_scalar("SELECT position FROM events WHERE audit_org = $1 ORDER BY position")
            .bind(org)
            .fetch_all(pool)
            .await
            .unwrap()
    });
    db.events_at(&positions).await.unwrap()
}
