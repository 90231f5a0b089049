//! kill -9 under load (issue 20 §1): `ekm-bench`'s tool, shorter. 8 command clients and 4
//! data-plane clients; the server SIGKILLed at random moments (some while starting) and
//! started again; then every acknowledged command's event is in the log exactly once, none
//! for a refused one, every acknowledged ciphertext still opens, every acknowledged
//! data-plane answer has its access-log record, the read models equal a rebuild and the
//! audit chain verifies.

use ekm_bench::chaos::{self, Config};

use super::*;

fn survives_kill_9_under_load(backend: Backend, kills: usize, seed: u64) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let test_db = runtime.block_on(TestDb::new(backend));
    let mut config = Config::new(
        EKM.into(),
        test_db.data_dir().to_path_buf(),
        test_db.url.clone(),
        kills,
    );
    config.seed = seed;
    let report = runtime.block_on(chaos::run(&config)).unwrap();
    eprintln!("{}", chaos::describe(&report, &format!("{backend:?}")));
    assert!(
        report.violations.is_empty(),
        "{} violations:\n{}\nserver errors:\n{}",
        report.violations.len(),
        report.violations.join("\n"),
        report.server_errors.join("\n")
    );
    assert!(report.kills >= kills, "{} kills", report.kills);
    // The history is worth checking: commands of every kind went through, some answers were
    // lost to kills, and the data plane worked between them.
    assert!(report.commands_acknowledged >= 100, "{report:?}");
    assert!(report.commands_indeterminate >= 1, "{report:?}");
    assert!(report.data_plane_acknowledged >= 100, "{report:?}");
    assert!(report.ciphertexts_checked >= 50, "{report:?}");
    assert!(report.read_model_rows > 0, "{report:?}");
}

#[test]
fn acknowledged_work_survives_30_kills_under_load_on_sqlite() {
    survives_kill_9_under_load(Backend::Sqlite, 30, 20);
}

#[test]
fn acknowledged_work_survives_10_kills_under_load_on_postgres() {
    survives_kill_9_under_load(Backend::Postgres, 10, 21);
}

/// The check can fail: with the access log `async`, records queued when the server is
/// killed are lost (the documented window), and the tool names the acknowledged answers
/// that have none.
#[test]
fn the_check_finds_the_records_an_async_access_log_loses_to_kill_9() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let test_db = runtime.block_on(TestDb::new(Backend::Sqlite));
    let mut config = Config::new(EKM.into(), test_db.data_dir().to_path_buf(), None, 5);
    config.access_log = "async";
    let report = runtime.block_on(chaos::run(&config)).unwrap();
    eprintln!("{}", chaos::describe(&report, "async"));
    let missing = report
        .violations
        .iter()
        .filter(|v| v.ends_with("acknowledged, but not in the access log"))
        .count();
    assert!(missing > 0, "{report:?}");
    assert_eq!(
        missing,
        report.violations.len(),
        "{:?}\n{:?}",
        report.violations,
        report.server_errors
    );
}
