//! PostgreSQL over TLS (issue 19, section 3): a cluster of the test's own, started from the
//! installed binaries with a certificate signed by a CA made in the test, that refuses
//! connections without TLS. EKM reaches it with `sslmode=verify-full` and `sslrootcert` in
//! the database URL, and refuses a server whose certificate another CA signed or that names
//! another host.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use ekm_store::{Db, DbConfig};

use crate::harness::{free_port, give_to_postgres, postgres_bin, run_postgres_tool};

/// A TLS-only PostgreSQL cluster in a temporary directory, stopped on drop.
struct TlsCluster {
    dir: tempfile::TempDir,
    pg_ctl: PathBuf,
    port: u16,
    /// The CA that signed the server's certificate (PEM file).
    ca: PathBuf,
}

/// A CA, and a server certificate it signed for `host`: (CA PEM, certificate PEM, key PEM).
fn certificates(host: &str) -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server = rcgen::CertificateParams::new(vec![host.to_owned()])
        .unwrap()
        .signed_by(&server_key, &ca, &ca_key)
        .unwrap();
    (ca.pem(), server.pem(), server_key.serialize_pem())
}

impl TlsCluster {
    fn start() -> TlsCluster {
        let initdb = postgres_bin("initdb").expect("initdb installed");
        let pg_ctl = postgres_bin("pg_ctl").expect("pg_ctl installed");
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        give_to_postgres(dir.path()).unwrap();
        let data_text = data.to_string_lossy().to_string();
        run_postgres_tool(
            &initdb,
            &[
                "-D",
                &data_text,
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
            ],
        )
        .unwrap();
        let (ca, cert, key) = certificates("localhost");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca).unwrap();
        std::fs::write(data.join("server.crt"), cert).unwrap();
        std::fs::write(data.join("server.key"), key).unwrap();
        std::fs::set_permissions(
            data.join("server.key"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        // TLS or nothing over TCP.
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all all 127.0.0.1/32 trust\n\
             hostnossl all all 127.0.0.1/32 reject\n",
        )
        .unwrap();
        give_to_postgres(&data).unwrap();
        let port = free_port();
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c ssl=on \
             -c ssl_cert_file=server.crt -c ssl_key_file=server.key",
            dir.path().display()
        );
        let log = dir.path().join("log").to_string_lossy().to_string();
        run_postgres_tool(
            &pg_ctl,
            &["-D", &data_text, "-o", &options, "-w", "-l", &log, "start"],
        )
        .unwrap();
        TlsCluster {
            dir,
            pg_ctl,
            port,
            ca: ca_file,
        }
    }

    fn url(&self, host: &str, query: &str) -> String {
        format!("postgres://postgres@{host}:{}/postgres?{query}", self.port)
    }

    fn verify_full(&self) -> String {
        self.url(
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={}", self.ca.display()),
        )
    }
}

impl Drop for TlsCluster {
    fn drop(&mut self) {
        let data = self.dir.path().join("data").to_string_lossy().to_string();
        let _ = run_postgres_tool(&self.pg_ctl, &["-D", &data, "-m", "immediate", "stop"]);
    }
}

async fn open(url: &str) -> Result<Db, String> {
    Db::open(&DbConfig::Postgres {
        url: url.to_owned(),
    })
    .await
    .map_err(|e| ekm_projections::error_chain(&e))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_is_reached_over_verified_tls_and_refused_when_the_certificate_is_wrong() {
    let cluster = TlsCluster::start();

    // verify-full with the CA that signed the server's certificate: connected, over TLS.
    let db = open(&cluster.verify_full()).await.expect("verify-full");
    let ekm_store::Db::Postgres(pg) = &db else {
        unreachable!()
    };
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&pg.pool)
        .await
        .unwrap();
    assert!(ssl, "the connection is encrypted");
    db.close().await;

    // Without TLS the server refuses.
    let plain = open(&cluster.url("localhost", "sslmode=disable")).await;
    assert!(plain.is_err(), "a connection without TLS was accepted");

    // Another CA: refused, and the error says why.
    let other = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(other.path(), certificates("localhost").0).unwrap();
    let error = open(&cluster.url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", other.path().display()),
    ))
    .await
    .expect_err("a certificate from another CA was accepted");
    assert!(error.to_lowercase().contains("certificate"), "{error}");

    // The right CA, but the server's name is not the one connected to: refused under
    // verify-full.
    let by_address = |mode: &str| {
        cluster.url(
            "127.0.0.1",
            &format!("sslmode={mode}&sslrootcert={}", cluster.ca.display()),
        )
    };
    let error = open(&by_address("verify-full"))
        .await
        .expect_err("a certificate for another host was accepted");
    assert!(error.to_lowercase().contains("certificate"), "{error}");
    // verify-ca answers instead of panicking (it asked rustls for a default provider, and the
    // binary has two). It still checks the name: sqlx 0.8.6's name-ignoring verifier knows
    // rustls's `NotValidForName` but not the `NotValidForNameContext` that rustls 0.23.46
    // gives, so verify-ca is as strict as verify-full here (ARCHITECTURE.md).
    let error = open(&by_address("verify-ca"))
        .await
        .expect_err("verify-ca checks the name with this sqlx and rustls");
    assert!(error.contains("not valid for name"), "{error}");
    open(&cluster.url(
        "localhost",
        &format!("sslmode=verify-ca&sslrootcert={}", cluster.ca.display()),
    ))
    .await
    .expect("verify-ca with the right name and CA")
    .close()
    .await;

    // `ekm serve` on it, end to end: ready, and refused with the wrong CA.
    let data_dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut serve = Command::new(env!("CARGO_BIN_EXE_ekm"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(data_dir.path())
        .args(["--database-url", &cluster.verify_full()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let mut ready = false;
    for _ in 0..300 {
        if let Ok(response) = client
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await
        {
            ready = response.status() == 200;
            if ready {
                break;
            }
        }
        // Polling a process's port until it listens: there is no event to await.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = serve.kill();
    let _ = serve.wait();
    assert!(ready, "ekm serve did not become ready over TLS");

    let refused = Command::new(env!("CARGO_BIN_EXE_ekm"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(tempfile::tempdir().unwrap().path())
        .args([
            "--database-url",
            &cluster.url(
                "localhost",
                &format!("sslmode=verify-full&sslrootcert={}", other.path().display()),
            ),
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr).to_lowercase();
    assert!(stderr.contains("certificate"), "{stderr}");
}
