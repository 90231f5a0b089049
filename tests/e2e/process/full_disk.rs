//! A full disk and a read-only database (issue 20 §4): commands and the data plane answer
//! 503 `unavailable` (never 500, never an acknowledgement without its write), nothing
//! acknowledged is lost, and the server recovers when space or writes return, without a
//! restart.

use std::path::PathBuf;

use super::*;

/// Where the SQLite test's data directory lives, and how its space runs out.
enum SmallDisk {
    /// A 24 MiB tmpfs the test mounts (root): filled with a file up to ENOSPC.
    Tmpfs { mount: PathBuf, filler: PathBuf },
    /// Where mounting is not allowed: the server runs with a file-size limit
    /// (`RLIMIT_FSIZE`, SIGXFSZ ignored) that the test lowers to the files' present sizes,
    /// so that growing any of them fails with EFBIG, and raises again (`prlimit`).
    Rlimit { dir: PathBuf },
}

impl SmallDisk {
    fn new(root: &Path) -> SmallDisk {
        let mount = root.join("small");
        std::fs::create_dir_all(&mount).unwrap();
        // EKM_TEST_NO_MOUNT=1 takes the fallback on a machine that could mount (to test it).
        let mounted = std::env::var_os("EKM_TEST_NO_MOUNT").is_none()
            && Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs"])
                .arg(&mount)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        match mounted {
            true => SmallDisk::Tmpfs {
                filler: mount.join("filler"),
                mount,
            },
            false => {
                eprintln!("mount not allowed here: a file-size limit stands in for a full disk");
                SmallDisk::Rlimit { dir: mount }
            }
        }
    }

    fn data_dir(&self) -> PathBuf {
        match self {
            SmallDisk::Tmpfs { mount, .. } => mount.join("data"),
            SmallDisk::Rlimit { dir } => dir.join("data"),
        }
    }

    /// Takes the space away from the running server `pid`.
    fn fill(&self, pid: u32) {
        match self {
            SmallDisk::Tmpfs { filler, .. } => {
                use std::io::Write;
                let mut file = std::fs::File::create(filler).unwrap();
                let chunk = vec![0u8; 1 << 20];
                while file.write_all(&chunk).is_ok() {}
                // The last partial pages too.
                while file.write_all(&chunk[..4096]).is_ok() {}
                let _ = file.sync_all();
            }
            SmallDisk::Rlimit { dir } => {
                let largest = std::fs::read_dir(dir.join("data"))
                    .unwrap()
                    .filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .max()
                    .unwrap_or(0);
                prlimit(pid, &format!("{largest}:unlimited"));
            }
        }
    }

    /// Gives the space back.
    fn free(&self, pid: u32) {
        match self {
            SmallDisk::Tmpfs { filler, .. } => std::fs::remove_file(filler).unwrap(),
            SmallDisk::Rlimit { .. } => prlimit(pid, "unlimited:unlimited"),
        }
    }

    /// `ekm serve` on the small disk (under the file-size limit's shell where it applies).
    fn serve(&self) -> Server {
        match self {
            SmallDisk::Tmpfs { .. } => serve(&self.data_dir(), None),
            // The limit is set later, by `fill`; SIGXFSZ is ignored from the start (an
            // ignored signal stays ignored across exec), so EFBIG is an error, not a kill.
            SmallDisk::Rlimit { .. } => serve_wrapped(
                &self.data_dir(),
                None,
                &[],
                &[],
                &["sh", "-c", "trap '' XFSZ; exec \"$@\"", "sh"],
            ),
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        if let SmallDisk::Tmpfs { mount, .. } = self {
            let _ = Command::new("umount").arg("-l").arg(mount).status();
        }
    }
}

fn prlimit(pid: u32, limits: &str) {
    let status = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--fsize={limits}")])
        .status()
        .unwrap();
    assert!(status.success(), "prlimit {limits}");
}

/// What the writes in a fault phase answered.
#[derive(Debug, Default)]
struct Phase {
    created: Vec<String>,
    refused: usize,
    sealed: Vec<String>,
    data_refused: usize,
}

/// The organization the tests write in: its admin, and a service holding `data:use`.
struct Tenant {
    org: String,
    admin: String,
    service: String,
    thread: String,
}

impl Tenant {
    fn create(base: &str, operator: &str) -> Tenant {
        let (status, org) = call(
            "POST",
            &format!("{base}/v1/orgs"),
            operator,
            Some(json!({"name": "Acme", "plan": "enterprise", "tier": "managed"})),
        );
        assert_eq!(status, 201, "{org}");
        let org_id = org["id"].as_str().unwrap().to_owned();
        let admin = org["admin_token"].as_str().unwrap().to_owned();
        let (status, thread) = call(
            "POST",
            &format!("{base}/v1/scopes"),
            &admin,
            Some(json!({"kind": "thread", "name": "data", "parent_id": org_id})),
        );
        assert_eq!(status, 201, "{thread}");
        let (status, token) = call(
            "POST",
            &format!("{base}/v1/orgs/{org_id}/tokens"),
            &admin,
            Some(json!({"principal": "svc"})),
        );
        assert_eq!(status, 201, "{token}");
        let (status, grant) = call(
            "POST",
            &format!("{base}/v1/orgs/{org_id}/grants"),
            &admin,
            Some(json!({"principal": "svc", "permission": "data:use"})),
        );
        assert_eq!(status, 201, "{grant}");
        Tenant {
            org: org_id,
            admin,
            service: token["token"].as_str().unwrap().to_owned(),
            thread: thread["id"].as_str().unwrap().to_owned(),
        }
    }

    /// Commands and data-plane requests until `refusals` in a row were refused: each
    /// answer is a success or 503 `unavailable` with `Retry-After`, nothing else.
    fn write_until_refused(&self, base: &str, phase: &mut Phase, refusals: usize) {
        let mut in_a_row = 0;
        for i in 0..2_000 {
            let (status, body, retry_after) = call_with_retry_after(
                "POST",
                &format!("{base}/v1/scopes"),
                &self.admin,
                Some(json!({"kind": "team", "name": format!("t{i}"), "parent_id": self.org})),
            );
            match status {
                201 => {
                    phase.created.push(body["id"].as_str().unwrap().to_owned());
                    in_a_row = 0;
                }
                503 => {
                    assert_eq!(body["code"], "unavailable", "{body}");
                    assert!(retry_after, "503 without Retry-After: {body}");
                    phase.refused += 1;
                    in_a_row += 1;
                }
                other => panic!("a command answered {other}: {body}"),
            }
            let (status, body, retry_after) = call_with_retry_after(
                "POST",
                &format!("{base}/v1/scopes/{}/encrypt", self.thread),
                &self.service,
                Some(json!({"plaintext": "c2VjcmV0", "class": "messages"})),
            );
            match status {
                200 => phase
                    .sealed
                    .push(body["ciphertext"].as_str().unwrap().to_owned()),
                503 => {
                    assert!(retry_after, "503 without Retry-After: {body}");
                    phase.data_refused += 1;
                }
                other => panic!("an encrypt answered {other}: {body}"),
            }
            if in_a_row >= refusals {
                return;
            }
        }
        panic!("writes never refused: {phase:?}");
    }

    /// `n` commands and encryptions while all is well: each succeeds.
    fn write_some(&self, base: &str, phase: &mut Phase, n: usize) {
        for i in 0..n {
            let (status, body) = call(
                "POST",
                &format!("{base}/v1/scopes"),
                &self.admin,
                Some(json!({"kind": "team", "name": format!("before{i}"), "parent_id": self.org})),
            );
            assert_eq!(status, 201, "{body}");
            phase.created.push(body["id"].as_str().unwrap().to_owned());
            let (status, body) = call(
                "POST",
                &format!("{base}/v1/scopes/{}/encrypt", self.thread),
                &self.service,
                Some(json!({"plaintext": "c2VjcmV0", "class": "messages"})),
            );
            assert_eq!(status, 200, "{body}");
            phase
                .sealed
                .push(body["ciphertext"].as_str().unwrap().to_owned());
        }
    }

    /// Writes work again (polled: the server retries on its own, nothing to await).
    fn writes_again(&self, base: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = call(
                "POST",
                &format!("{base}/v1/scopes"),
                &self.admin,
                Some(json!({"kind": "team", "name": "after", "parent_id": self.org})),
            );
            if status == 201 {
                return body["id"].as_str().unwrap().to_owned();
            }
            assert_eq!(status, 503, "{body}");
            assert!(std::time::Instant::now() < deadline, "no recovery: {body}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every acknowledged scope exists, every acknowledged ciphertext opens, and the log
    /// holds exactly the acknowledged creations.
    fn nothing_acknowledged_is_lost(&self, server: &Server, created: &[String], sealed: &[String]) {
        let base = server.base.as_str();
        let log = || {
            server
                .log_text()
                .lines()
                .filter(|l| l.contains("WARN") && !l.contains("tower_http"))
                .take(8)
                .collect::<Vec<_>>()
                .join("\n")
        };
        for id in created {
            let (status, body) = call("GET", &format!("{base}/v1/scopes/{id}"), &self.admin, None);
            assert_eq!(status, 200, "{id}: {body}\n{}", log());
        }
        for ciphertext in sealed {
            let (status, body) = call(
                "POST",
                &format!("{base}/v1/scopes/{}/decrypt", self.thread),
                &self.service,
                Some(json!({"ciphertext": ciphertext, "class": "messages"})),
            );
            assert_eq!(status, 200, "{body}\n{}", log());
        }
        let (status, children) = call(
            "GET",
            &format!("{base}/v1/scopes/{}/children?limit=500", self.org),
            &self.admin,
            None,
        );
        assert_eq!(status, 200, "{children}\n{}", log());
        let teams = children["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["kind"] == "team")
            .count();
        assert_eq!(
            teams,
            created.len(),
            "teams in the tree against acknowledged"
        );
    }
}

/// SQLite on a disk that fills up: 503 and no loss, then recovery when space returns.
#[test]
fn sqlite_answers_unavailable_on_a_full_disk_and_recovers_when_space_returns() {
    let root = tempfile::tempdir().unwrap();
    let disk = SmallDisk::new(root.path());
    let server = disk.serve();
    let operator = read_token(&disk.data_dir());
    let tenant = Tenant::create(&server.base, &operator);
    let mut phase = Phase::default();
    // A few writes while there is room.
    tenant.write_some(&server.base, &mut phase, 3);
    let before = phase.created.len();

    disk.fill(server.child.id());
    tenant.write_until_refused(&server.base, &mut phase, 5);
    assert!(phase.refused >= 5, "{phase:?}");
    let (status, _) = call("GET", &format!("{}/healthz", server.base), "", None);
    assert_eq!(status, 200, "the process is alive");

    disk.free(server.child.id());
    phase.created.push(tenant.writes_again(&server.base));
    assert!(phase.created.len() > before);
    tenant.nothing_acknowledged_is_lost(&server, &phase.created, &phase.sealed);
    let (status, ready) = call("GET", &format!("{}/readyz", server.base), "", None);
    assert_eq!(status, 200, "{ready}");

    // And after a restart.
    let (code, log) = server.terminate();
    assert_eq!(code, 0, "{log}");
    let again = disk.serve();
    tenant.nothing_acknowledged_is_lost(&again, &phase.created, &phase.sealed);
    assert_eq!(again.terminate().0, 0);
    let verify = Command::new(EKM)
        .args(["audit", "verify", "--data-dir"])
        .arg(disk.data_dir())
        .env_remove("EKM_DATABASE_URL")
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
}

/// PostgreSQL made read-only (`default_transaction_read_only` on the database, sessions
/// ended so the pool reconnects): the same 503s, no loss, recovery when it is writable.
#[test]
fn postgres_answers_unavailable_while_read_only_and_recovers() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let test_db = runtime.block_on(TestDb::new(Backend::Postgres));
    let url = test_db.url.clone().unwrap();
    let name = url.rsplit('/').next().unwrap().to_owned();
    let server = serve(test_db.data_dir(), Some(&url));
    let operator = read_token(test_db.data_dir());
    let tenant = Tenant::create(&server.base, &operator);
    let mut phase = Phase::default();
    tenant.write_some(&server.base, &mut phase, 3);

    let admin_sql = |sql: String| {
        runtime.block_on(async {
            let mut conn: sqlx::PgConnection =
                sqlx::Connection::connect(&crate::harness::postgres_admin_url())
                    .await
                    .unwrap();
            sqlx::Executor::execute(&mut conn, sql.as_str())
                .await
                .unwrap();
        })
    };
    let end_sessions = format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = '{name}' AND pid <> pg_backend_pid()"
    );
    admin_sql(format!(
        "ALTER DATABASE {name} SET default_transaction_read_only = on"
    ));
    admin_sql(end_sessions.clone());
    tenant.write_until_refused(&server.base, &mut phase, 5);

    admin_sql(format!(
        "ALTER DATABASE {name} RESET default_transaction_read_only"
    ));
    admin_sql(end_sessions);
    phase.created.push(tenant.writes_again(&server.base));
    tenant.nothing_acknowledged_is_lost(&server, &phase.created, &phase.sealed);
    assert_eq!(server.terminate().0, 0);
}
