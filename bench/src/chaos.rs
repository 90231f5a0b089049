//! kill -9 under load (issue 20 §1): a Jepsen-style history, checked after the faults.
//!
//! 8 command clients and 4 data-plane clients drive a real `ekm serve` while a controller
//! SIGKILLs it at random moments (now and then while it is still starting) and starts it
//! again. Every request carries its own `X-Request-Id`, which the events and the access log
//! keep, so each client's history can be checked against what the server holds at the end:
//!
//! - an acknowledged command (2xx) has its event in the log exactly once;
//! - a refused command (4xx) has none;
//! - a command whose answer was lost to a kill (indeterminate) has at most one;
//! - every acknowledged encrypt decrypts, after the last restart, to its plaintext;
//! - the read models equal a rebuild from the events (`ekm projections rebuild`);
//! - `ekm audit verify` passes;
//! - the access log (durable, the default) holds a record of every acknowledged
//!   data-plane answer.
//!
//! `ekm-bench kill9` runs it for BENCHMARKS.md; `tests/e2e/process/kill9.rs` runs it
//! shorter in CI, on SQLite and on PostgreSQL.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::sync::watch;

/// What to run.
#[derive(Clone, Debug)]
pub struct Config {
    /// The `ekm` binary.
    pub ekm: PathBuf,
    /// The data directory (keys, and the SQLite database without `database_url`).
    pub data_dir: PathBuf,
    /// PostgreSQL, or SQLite in `data_dir` when `None`.
    pub database_url: Option<String>,
    /// SIGKILLs, those while the server is starting included.
    pub kills: usize,
    pub seed: u64,
    pub command_clients: usize,
    pub data_clients: usize,
    /// How long the server runs under load between a start and the next kill.
    pub uptime: (Duration, Duration),
    /// `--access-log`: `durable` (the default, whose promise is checked) or `async` (whose
    /// loss window the check sees).
    pub access_log: &'static str,
}

impl Config {
    /// 8 command clients, 4 data-plane clients, 0.2 to 1.2 s between kills.
    pub fn new(
        ekm: PathBuf,
        data_dir: PathBuf,
        database_url: Option<String>,
        kills: usize,
    ) -> Self {
        Config {
            ekm,
            data_dir,
            database_url,
            kills,
            seed: 1,
            command_clients: 8,
            data_clients: 4,
            uptime: (Duration::from_millis(200), Duration::from_millis(1200)),
            access_log: "durable",
        }
    }
}

/// What a run did and found. `violations` is empty when every check passed.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub kills: usize,
    /// Kills that landed before the server was ready (migrating, catching up).
    pub kills_while_starting: usize,
    pub commands_acknowledged: usize,
    pub commands_refused: usize,
    /// Answers lost to a kill: the command may or may not have been applied.
    pub commands_indeterminate: usize,
    /// Of those, the ones whose event is in the log.
    pub indeterminate_applied: usize,
    pub data_plane_acknowledged: usize,
    pub ciphertexts_checked: usize,
    pub access_records: usize,
    pub events_checked: usize,
    pub read_model_rows: usize,
    pub seconds: f64,
    /// Every broken promise, one line each.
    pub violations: Vec<String>,
    /// The servers' logged errors (the first 20), for whoever reads the violations.
    pub server_errors: Vec<String>,
}

impl Report {
    /// Acknowledged operations whose effect was checked: commands and data-plane answers.
    pub fn acknowledged(&self) -> usize {
        self.commands_acknowledged + self.data_plane_acknowledged
    }
}

/// Runs the workload with `config.kills` SIGKILLs, then checks the history.
pub async fn run(config: &Config) -> anyhow::Result<Report> {
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(config.seed);
    let mut report = Report::default();
    let mut generation = 0;
    let mut server = Server::start(config, &mut generation).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let setup = Setup::create(&http, &server.base, &server.operator_token()?, config).await?;
    let (phase_tx, phase_rx) = watch::channel(Phase::Up(server.base.clone()));
    let ctx = Arc::new(Ctx { http, setup });

    let mut commands = vec![];
    for i in 0..config.command_clients {
        let ctx = ctx.clone();
        let rx = phase_rx.clone();
        commands.push(tokio::spawn(
            async move { command_client(i, &ctx, rx).await },
        ));
    }
    let mut data = vec![];
    for j in 0..config.data_clients {
        let ctx = ctx.clone();
        let rx = phase_rx.clone();
        let seed = config.seed.wrapping_mul(31).wrapping_add(j as u64);
        data.push(tokio::spawn(
            async move { data_client(j, &ctx, rx, seed).await },
        ));
    }

    while report.kills < config.kills {
        // The load runs for a while, then the power goes.
        let uptime = rng.random_range(config.uptime.0..=config.uptime.1);
        tokio::time::sleep(uptime).await;
        server.kill();
        phase_tx.send_replace(Phase::Down);
        report.kills += 1;
        // One start in four is killed again before it is ready: mid-migration, mid-catch-up.
        if report.kills < config.kills && rng.random_range(0..4) == 0 {
            let mut starting = Server::spawn(config, &mut generation)?;
            tokio::time::sleep(Duration::from_millis(rng.random_range(10..400))).await;
            let ready = starting.ready_now(&ctx.http).await;
            starting.kill();
            report.kills += 1;
            report.kills_while_starting += usize::from(!ready);
        }
        server = Server::start(config, &mut generation).await?;
        phase_tx.send_replace(Phase::Up(server.base.clone()));
    }
    // Let the clients finish what they have in flight, then stop them.
    tokio::time::sleep(rng.random_range(config.uptime.0..=config.uptime.1)).await;
    phase_tx.send_replace(Phase::Over);
    let mut ops = vec![];
    for handle in commands {
        ops.extend(handle.await?);
    }
    let mut sealed = vec![];
    let mut used = vec![];
    for handle in data {
        let outcome = handle.await?;
        report.violations.extend(outcome.violations);
        sealed.extend(outcome.sealed);
        used.extend(outcome.acknowledged);
    }
    server.stop()?;

    // The checks run on a server started once more, then on the stopped database.
    let server = Server::start(config, &mut generation).await?;
    check_ciphertexts(&ctx, &server.base, &sealed, &mut report).await?;
    let events = export(&ctx, &server.base, "/v1/audit/export").await?;
    let access = export(&ctx, &server.base, "/v1/audit/access/export").await?;
    server.stop()?;
    check_commands(&ops, &events, &mut report);
    check_access_log(&used, &access, &mut report);
    check_audit_chain(config, &mut report)?;
    check_rebuild(config, &mut report).await?;
    report.server_errors = server_errors(config, generation);
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// What the clients see of the server.
#[derive(Clone, Debug, PartialEq)]
enum Phase {
    Up(String),
    Down,
    Over,
}

/// The organization the load runs in.
struct Setup {
    org: String,
    admin: String,
    /// One team per command client: its commands never meet another client's.
    teams: Vec<String>,
    /// One thread per data-plane client, under a team of their own.
    threads: Vec<String>,
    /// A service token holding `data:use` on that team.
    service: String,
}

struct Ctx {
    http: reqwest::Client,
    setup: Setup,
}

impl Setup {
    async fn create(
        http: &reqwest::Client,
        base: &str,
        operator: &str,
        config: &Config,
    ) -> anyhow::Result<Setup> {
        let org = post_ok(
            http,
            base,
            operator,
            "/v1/orgs",
            json!({"name": "Chaos", "plan": "enterprise", "tier": "managed"}),
        )
        .await?;
        let org_id = text(&org, "id")?;
        let admin = text(&org, "admin_token")?;
        let mut teams = vec![];
        for i in 0..config.command_clients {
            let team = post_ok(
                http,
                base,
                &admin,
                "/v1/scopes",
                json!({"kind": "team", "name": format!("commands-{i}"), "parent_id": org_id}),
            )
            .await?;
            teams.push(text(&team, "id")?);
        }
        let data_team = post_ok(
            http,
            base,
            &admin,
            "/v1/scopes",
            json!({"kind": "team", "name": "data", "parent_id": org_id}),
        )
        .await?;
        let data_team = text(&data_team, "id")?;
        let mut threads = vec![];
        for j in 0..config.data_clients {
            let thread = post_ok(
                http,
                base,
                &admin,
                "/v1/scopes",
                json!({"kind": "thread", "name": format!("data-{j}"), "parent_id": data_team}),
            )
            .await?;
            threads.push(text(&thread, "id")?);
        }
        let token = post_ok(
            http,
            base,
            &admin,
            &format!("/v1/orgs/{org_id}/tokens"),
            json!({"principal": "chaos-service", "kind": "service"}),
        )
        .await?;
        post_ok(
            http,
            base,
            &admin,
            &format!("/v1/orgs/{org_id}/grants"),
            json!({"principal": "chaos-service", "permission": "data:use", "scope_id": data_team}),
        )
        .await?;
        Ok(Setup {
            org: org_id,
            admin,
            teams,
            threads,
            service: text(&token, "token")?,
        })
    }
}

/// A POST of the set-up: its JSON answer, or an error naming the path and the refusal.
pub async fn post_ok(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    path: &str,
    body: Value,
) -> anyhow::Result<Value> {
    let response = http
        .post(format!("{base}{path}"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or_default();
    if !status.is_success() {
        bail!("set-up: POST {path} answered {status}: {body}");
    }
    Ok(body)
}

fn text(value: &Value, field: &str) -> anyhow::Result<String> {
    value[field]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no {field} in {value}"))
}

/// How a request ended, as its client saw it.
#[derive(Clone, Debug, PartialEq)]
enum Outcome {
    /// 2xx, with the answer.
    Acknowledged(Value),
    /// 4xx: status and problem code.
    Refused(u16, String),
    /// The answer was lost (the connection died): applied or not.
    Indeterminate(String),
    /// A 5xx from a server that was up: status, problem code and body. Applied or not
    /// (`committed_unconfirmed` says applied); for anything but 503 and
    /// `committed_unconfirmed` a violation of its own (a server error, e.g. a 500).
    Failed(u16, String, String),
    /// The run is over; nothing was sent.
    Over,
}

/// One command a client sent, and what it saw.
#[derive(Clone, Debug)]
struct Op {
    request_id: String,
    /// The audit action its event has.
    action: &'static str,
    outcome: Outcome,
}

/// Waits for the server to be up; `None` once the run is over.
async fn up(rx: &mut watch::Receiver<Phase>) -> Option<String> {
    loop {
        match rx.borrow_and_update().clone() {
            Phase::Up(base) => return Some(base),
            Phase::Over => return None,
            Phase::Down => {}
        }
        if rx.changed().await.is_err() {
            return None;
        }
    }
}

/// Sends one request to whichever server is up, and classifies the answer. A lost answer
/// waits for the next phase (the server's restart), so a client does not spin against a
/// dead port.
async fn send(
    ctx: &Ctx,
    rx: &mut watch::Receiver<Phase>,
    token: &str,
    request_id: &str,
    path: &str,
    body: &Value,
) -> Outcome {
    let Some(base) = up(rx).await else {
        return Outcome::Over;
    };
    let sent = ctx
        .http
        .post(format!("{base}{path}"))
        .bearer_auth(token)
        .header("x-request-id", request_id)
        .json(body)
        .send()
        .await;
    let lost = |why: String| async move {
        let _ = rx.changed().await;
        Outcome::Indeterminate(why)
    };
    let response = match sent {
        Ok(response) => response,
        Err(error) => return lost(error.to_string()).await,
    };
    let status = response.status().as_u16();
    let text = match response.text().await {
        Ok(text) => text,
        Err(error) => return lost(format!("{status}, body cut off: {error}")).await,
    };
    let answer: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    match status {
        200..=299 => Outcome::Acknowledged(answer),
        400..=499 => Outcome::Refused(
            status,
            answer["code"].as_str().unwrap_or_default().to_owned(),
        ),
        _ => Outcome::Failed(
            status,
            answer["code"].as_str().unwrap_or_default().to_owned(),
            text.chars().take(300).collect(),
        ),
    }
}

/// A command client: in its own team, over and over, creates a thread, rotates, pauses,
/// resumes and revokes it; the first clients also rotate a data-plane thread each round.
async fn command_client(i: usize, ctx: &Ctx, mut rx: watch::Receiver<Phase>) -> Vec<Op> {
    let team = ctx.setup.teams[i].as_str();
    let mut ops = vec![];
    for round in 0.. {
        let created = step(
            ctx,
            &mut rx,
            &mut ops,
            format!("chaos-c{i}-{round}-create"),
            "scope.create",
            "/v1/scopes".into(),
            json!({"kind": "thread", "name": format!("t{round}"), "parent_id": team}),
        )
        .await;
        let thread = match created {
            Outcome::Acknowledged(answer) => answer["id"].as_str().unwrap_or_default().to_owned(),
            Outcome::Over => return ops,
            // Not created, or created with an id it never learnt: start a new round.
            _ => continue,
        };
        let steps = [
            ("scope.rotate", "rotate", json!({"reason": "chaos"})),
            ("scope.pause", "pause", json!({"reason": "chaos"})),
            ("scope.resume", "resume", json!({"reason": "chaos"})),
            (
                "scope.revoke",
                "revoke",
                json!({"reason": "chaos", "confirm": thread, "immediately": true}),
            ),
        ];
        for (action, verb, body) in steps {
            let request_id = format!("chaos-c{i}-{round}-{verb}");
            let path = format!("/v1/scopes/{thread}/{verb}");
            if step(ctx, &mut rx, &mut ops, request_id, action, path, body).await == Outcome::Over {
                return ops;
            }
        }
        if let Some(data_thread) = ctx.setup.threads.get(i) {
            let rotated = step(
                ctx,
                &mut rx,
                &mut ops,
                format!("chaos-c{i}-{round}-rotate-data"),
                "scope.rotate",
                format!("/v1/scopes/{data_thread}/rotate"),
                json!({"reason": "chaos"}),
            )
            .await;
            if rotated == Outcome::Over {
                return ops;
            }
        }
    }
    ops
}

/// Sends one command as the organization's admin and keeps it in `ops`.
async fn step(
    ctx: &Ctx,
    rx: &mut watch::Receiver<Phase>,
    ops: &mut Vec<Op>,
    request_id: String,
    action: &'static str,
    path: String,
    body: Value,
) -> Outcome {
    let outcome = send(ctx, rx, &ctx.setup.admin, &request_id, &path, &body).await;
    if outcome != Outcome::Over {
        ops.push(Op {
            request_id,
            action,
            outcome: outcome.clone(),
        });
    }
    outcome
}

/// What a data-plane client saw.
struct DataOutcome {
    /// Request ids of every acknowledged answer.
    acknowledged: Vec<String>,
    /// Every acknowledged encryption: the thread, the ciphertext and its plaintext.
    sealed: Vec<(String, String, Vec<u8>)>,
    violations: Vec<String>,
}

/// A data-plane client: encrypts 1 KiB, then decrypts one of its earlier ciphertexts at
/// random, and so on; a decryption must give back the plaintext.
async fn data_client(
    j: usize,
    ctx: &Ctx,
    mut rx: watch::Receiver<Phase>,
    seed: u64,
) -> DataOutcome {
    let mut rng = StdRng::seed_from_u64(seed);
    let token = ctx.setup.service.as_str();
    let thread = ctx.setup.threads[j].as_str();
    let mut out = DataOutcome {
        acknowledged: vec![],
        sealed: vec![],
        violations: vec![],
    };
    for n in 0.. {
        let request_id = format!("chaos-d{j}-{n}");
        if n % 2 == 0 || out.sealed.is_empty() {
            let mut plaintext = vec![0u8; 1024];
            rng.fill(&mut plaintext[..]);
            let body = json!({"plaintext": STANDARD.encode(&plaintext), "class": "messages"});
            let path = format!("/v1/scopes/{thread}/encrypt");
            match send(ctx, &mut rx, token, &request_id, &path, &body).await {
                Outcome::Acknowledged(answer) => {
                    out.acknowledged.push(request_id);
                    let ciphertext = answer["ciphertext"].as_str().unwrap_or_default();
                    out.sealed
                        .push((thread.to_owned(), ciphertext.to_owned(), plaintext));
                }
                Outcome::Refused(status, code) => out.violations.push(format!(
                    "{request_id}: encrypt refused with {status} {code}"
                )),
                Outcome::Indeterminate(_) => {}
                Outcome::Failed(status, _, body) => out
                    .violations
                    .push(format!("{request_id}: encrypt answered {status}: {body}")),
                Outcome::Over => return out,
            }
        } else {
            let index = rng.random_range(0..out.sealed.len());
            let (_, ciphertext, plaintext) = &out.sealed[index];
            let body = json!({"ciphertext": ciphertext, "class": "messages"});
            let path = format!("/v1/scopes/{thread}/decrypt");
            match send(ctx, &mut rx, token, &request_id, &path, &body).await {
                Outcome::Acknowledged(answer) => {
                    let opened = answer["plaintext"]
                        .as_str()
                        .and_then(|p| STANDARD.decode(p).ok());
                    if opened.as_deref() != Some(plaintext.as_slice()) {
                        out.violations.push(format!(
                            "{request_id}: a decryption gave back another plaintext"
                        ));
                    }
                    out.acknowledged.push(request_id);
                }
                Outcome::Refused(status, code) => out.violations.push(format!(
                    "{request_id}: an acknowledged ciphertext was refused: {status} {code}"
                )),
                Outcome::Indeterminate(_) => {}
                Outcome::Failed(status, _, body) => out
                    .violations
                    .push(format!("{request_id}: decrypt answered {status}: {body}")),
                Outcome::Over => return out,
            }
        }
    }
    out
}

/// After the last restart, every acknowledged ciphertext still opens to its plaintext.
async fn check_ciphertexts(
    ctx: &Ctx,
    base: &str,
    sealed: &[(String, String, Vec<u8>)],
    report: &mut Report,
) -> anyhow::Result<()> {
    for chunk in sealed.chunks(16) {
        let mut pending = vec![];
        for (thread, ciphertext, plaintext) in chunk {
            let request = ctx
                .http
                .post(format!("{base}/v1/scopes/{thread}/decrypt"))
                .bearer_auth(&ctx.setup.service)
                .json(&json!({"ciphertext": ciphertext, "class": "messages"}))
                .send();
            pending.push(async move {
                let response = request.await?;
                let status = response.status();
                let answer: Value = response.json().await.unwrap_or_default();
                let opened = answer["plaintext"]
                    .as_str()
                    .and_then(|p| STANDARD.decode(p).ok());
                let same = opened.as_deref() == Some(plaintext.as_slice());
                anyhow::Ok((status, same, answer))
            });
        }
        for (status, same, answer) in futures_util::future::join_all(pending)
            .await
            .into_iter()
            .collect::<anyhow::Result<Vec<_>>>()?
        {
            report.ciphertexts_checked += 1;
            if !status.is_success() || !same {
                report.violations.push(format!(
                    "an acknowledged ciphertext no longer opens after the restarts ({status} {answer})"
                ));
            }
        }
    }
    Ok(())
}

/// Every line of a JSON Lines export of the organization.
async fn export(ctx: &Ctx, base: &str, path: &str) -> anyhow::Result<Vec<Value>> {
    let response = ctx
        .http
        .get(format!("{base}{path}"))
        .query(&[("format", "jsonl"), ("org", ctx.setup.org.as_str())])
        .bearer_auth(&ctx.setup.admin)
        .send()
        .await?;
    let status = response.status();
    let body = response.text().await?;
    if !status.is_success() {
        bail!("GET {path} answered {status}: {body}");
    }
    body.lines()
        .map(|line| serde_json::from_str(line).with_context(|| format!("{path}: {line}")))
        .collect()
}

/// Each command against the events that carry its request id.
fn check_commands(ops: &[Op], entries: &[Value], report: &mut Report) {
    let mut by_request: HashMap<&str, Vec<&str>> = HashMap::new();
    for entry in entries.iter().filter(|e| e["kind"] == "event") {
        let request_id = entry["request_id"].as_str().unwrap_or_default();
        let action = entry["action"].as_str().unwrap_or_default();
        by_request.entry(request_id).or_default().push(action);
        report.events_checked += 1;
    }
    for op in ops {
        let actions = by_request
            .remove(op.request_id.as_str())
            .unwrap_or_default();
        let applied = actions.iter().filter(|a| **a == op.action).count();
        match &op.outcome {
            Outcome::Acknowledged(answer) => {
                report.commands_acknowledged += 1;
                // A pause of a paused scope (its earlier pause applied although its answer
                // was lost) answers `changed: false` and records nothing.
                let expected = usize::from(answer["changed"].as_bool().unwrap_or(true));
                if applied != expected {
                    report.violations.push(format!(
                        "{}: acknowledged with changed: {}, and its {} is in the log {applied} times",
                        op.request_id,
                        expected == 1,
                        op.action
                    ));
                }
            }
            Outcome::Refused(status, code) => {
                report.commands_refused += 1;
                if !actions.is_empty() {
                    report.violations.push(format!(
                        "{}: refused ({status} {code}), yet the log holds {actions:?}",
                        op.request_id
                    ));
                }
            }
            Outcome::Indeterminate(_) | Outcome::Failed(..) => {
                if let Outcome::Failed(status, code, body) = &op.outcome {
                    if *status != 503 && code != "committed_unconfirmed" {
                        report.violations.push(format!(
                            "{}: the server answered {status}: {body}",
                            op.request_id
                        ));
                    }
                }
                report.commands_indeterminate += 1;
                report.indeterminate_applied += usize::from(applied == 1);
                if applied > 1 {
                    report.violations.push(format!(
                        "{}: its answer was lost, and its {} is in the log {applied} times",
                        op.request_id, op.action
                    ));
                }
            }
            Outcome::Over => {}
        }
    }
    for (request_id, actions) in by_request {
        if request_id.starts_with("chaos-c") {
            report.violations.push(format!(
                "{request_id}: the log holds {actions:?} for a command nobody sent"
            ));
        }
    }
}

/// Durable mode: every acknowledged data-plane answer has its record.
fn check_access_log(acknowledged: &[String], records: &[Value], report: &mut Report) {
    let mut recorded: HashMap<&str, usize> = HashMap::new();
    for record in records.iter().filter(|r| r["request_id"].is_string()) {
        *recorded
            .entry(record["request_id"].as_str().unwrap_or_default())
            .or_default() += 1;
        report.access_records += 1;
    }
    for request_id in acknowledged {
        report.data_plane_acknowledged += 1;
        match recorded.get(request_id.as_str()) {
            Some(1) => {}
            Some(n) => report.violations.push(format!(
                "{request_id}: recorded {n} times in the access log"
            )),
            None => report.violations.push(format!(
                "{request_id}: acknowledged, but not in the access log"
            )),
        }
    }
}

/// The lines at level ERROR of every server's log.
fn server_errors(config: &Config, generations: usize) -> Vec<String> {
    (1..=generations)
        .flat_map(|g| {
            let path = config.data_dir.join(format!("chaos-serve-{g}.log"));
            let log = std::fs::read_to_string(path).unwrap_or_default();
            log.lines()
                .filter(|line| line.contains("ERROR"))
                .map(|line| format!("server {g}: {line}"))
                .collect::<Vec<_>>()
        })
        .take(20)
        .collect()
}

/// `ekm audit verify` on the stopped database.
fn check_audit_chain(config: &Config, report: &mut Report) -> anyhow::Result<()> {
    let verify = ekm(config, &["audit", "verify"]).output()?;
    if !verify.status.success() {
        report.violations.push(format!(
            "ekm audit verify failed: {}{}",
            String::from_utf8_lossy(&verify.stdout),
            String::from_utf8_lossy(&verify.stderr)
        ));
    }
    Ok(())
}

/// The read models as the killed servers left them equal a rebuild from the events.
async fn check_rebuild(config: &Config, report: &mut Report) -> anyhow::Result<()> {
    let live = read_models(config).await?;
    report.read_model_rows = live.len();
    let rebuilt = ekm(config, &["projections", "rebuild"]).output()?;
    if !rebuilt.status.success() {
        bail!(
            "ekm projections rebuild failed: {}",
            String::from_utf8_lossy(&rebuilt.stderr)
        );
    }
    let again = read_models(config).await?;
    if live.len() != again.len() {
        report.violations.push(format!(
            "{} live read-model rows against {} after a rebuild",
            live.len(),
            again.len()
        ));
    }
    let (missing, extra) = ekm_projections::row_differences(&live, &again);
    for row in missing.iter().take(5) {
        report
            .violations
            .push(format!("a rebuild lacks a live row: {row}"));
    }
    for row in extra.iter().take(5) {
        report
            .violations
            .push(format!("a rebuild has a row the live models lacked: {row}"));
    }
    Ok(())
}

async fn read_models(config: &Config) -> anyhow::Result<Vec<String>> {
    let db_config = match &config.database_url {
        Some(url) => ekm_store::DbConfig::Postgres { url: url.clone() },
        None => ekm_store::DbConfig::sqlite_in(&config.data_dir),
    };
    let db = ekm_store::Db::open(&db_config)
        .await
        .map_err(|e| anyhow::anyhow!(ekm_projections::error_chain(&e)))?;
    let rows = ekm_projections::read_model_rows(&db)
        .await
        .map_err(|e| anyhow::anyhow!(ekm_projections::error_chain(&e)));
    db.close().await;
    rows
}

/// An `ekm` command on the data directory and database of the run.
fn ekm(config: &Config, args: &[&str]) -> Command {
    let mut command = Command::new(&config.ekm);
    command
        .args(args)
        .arg("--data-dir")
        .arg(&config.data_dir)
        .env_remove("EKM_DATABASE_URL")
        .env("RUST_LOG", "warn");
    if let Some(url) = &config.database_url {
        command.args(["--database-url", url]);
    }
    command
}

/// One `ekm serve` process.
struct Server {
    child: Child,
    base: String,
    log: PathBuf,
    data_dir: PathBuf,
}

impl Server {
    /// Spawns the server on a free port, its standard error in `chaos-serve-N.log` of the
    /// data directory.
    fn spawn(config: &Config, generation: &mut usize) -> anyhow::Result<Server> {
        *generation += 1;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log = config
            .data_dir
            .join(format!("chaos-serve-{generation}.log"));
        let mut command = ekm(config, &["serve"]);
        command
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--access-log", config.access_log])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        for limit in [
            "EKM_RATE_LIMIT_DATA_PLANE_PRINCIPAL",
            "EKM_RATE_LIMIT_DATA_PLANE_ORGANIZATION",
            "EKM_RATE_LIMIT_COMMANDS_PRINCIPAL",
            "EKM_RATE_LIMIT_COMMANDS_ORGANIZATION",
        ] {
            command.env(limit, "off");
        }
        let child = command.spawn().context("spawn ekm serve")?;
        Ok(Server {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
            data_dir: config.data_dir.clone(),
        })
    }

    /// Spawns the server and waits until it is ready with its read models at the head.
    async fn start(config: &Config, generation: &mut usize) -> anyhow::Result<Server> {
        let mut server = Server::spawn(config, generation)?;
        let http = reqwest::Client::new();
        let started = Instant::now();
        loop {
            if server.ready_now(&http).await {
                return Ok(server);
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                let log = std::fs::read_to_string(&server.log).unwrap_or_default();
                bail!("ekm serve exited with {status} before it was ready: {log}");
            }
            if started.elapsed() > Duration::from_secs(120) {
                bail!("ekm serve was not ready within 120 s");
            }
            // Nothing to await in another process: poll its readiness.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Whether `/readyz` answers 200 with the read models at the head of the log.
    async fn ready_now(&self, http: &reqwest::Client) -> bool {
        let Ok(response) = http.get(format!("{}/readyz", self.base)).send().await else {
            return false;
        };
        if !response.status().is_success() {
            return false;
        }
        let body: Value = response.json().await.unwrap_or_default();
        let head = body["head_position"].as_i64().unwrap_or(0);
        body["applied_position"].as_i64().unwrap_or(-1) >= head
    }

    fn operator_token(&self) -> anyhow::Result<String> {
        let path = self.data_dir.join("operator.token");
        Ok(std::fs::read_to_string(&path)
            .with_context(|| format!("read {}", path.display()))?
            .trim()
            .to_owned())
    }

    /// SIGKILL, and reap it.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and wait for a clean exit.
    fn stop(mut self) -> anyhow::Result<()> {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        let status = self.child.wait()?;
        if !status.success() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            bail!("ekm serve stopped with {status}: {log}");
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A summary for people, one line per figure.
pub fn describe(report: &Report, backend: &str) -> String {
    format!(
        "{backend}: {} kills ({} while starting) in {:.0} s; commands: {} acknowledged, {} refused, \
         {} indeterminate ({} applied); data plane: {} acknowledged, {} ciphertexts reopened, \
         {} access records; {} events, {} read-model rows checked; {} violations",
        report.kills,
        report.kills_while_starting,
        report.seconds,
        report.commands_acknowledged,
        report.commands_refused,
        report.commands_indeterminate,
        report.indeterminate_applied,
        report.data_plane_acknowledged,
        report.ciphertexts_checked,
        report.access_records,
        report.events_checked,
        report.read_model_rows,
        report.violations.len()
    )
}
