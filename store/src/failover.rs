//! PostgreSQL with a standby: several hosts in one URL, and following the primary when it
//! fails over (issue 19 §4).
//!
//! sqlx 0.8 reaches one host per pool (transact-rs/sqlx#3333), so EKM reads libpq's
//! multi-host form itself: `postgres://user@h1:5432,h2:5432/ekm?target_session_attrs=read-write`.
//! - At start, the hosts are tried in order, and the first that accepts writes
//!   (`read-write`, `primary`: `SHOW transaction_read_only` is `off`) is used; `any` (the
//!   default) takes the first that answers.
//! - A watch task asks the host in use every second whether it still accepts writes. When it
//!   does not answer, or answers read-only (demoted), the hosts are tried again, and the
//!   pools' connect options move to the new primary (`Pool::set_connect_options`).
//! - Connections opened before the move are closed when next handed out (their age says
//!   so): none lingers on a demoted server, where a write would fail.
//!
//! While no host accepts writes, commands fail (503 `unavailable`), and the data plane goes
//! on only until `--max-projection-lag` has passed without reading the head of the log
//! (`ekm-service`'s watchdog): no pause can commit anywhere meanwhile, and none committed
//! before can have been missed for longer than that bound.

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{Connection, PgPool};

use crate::error::StoreError;

/// How long one host may take to accept a probe connection.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the host in use is asked whether it still accepts writes.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// libpq's `target_session_attrs`, the values a server of EKM can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetSession {
    /// The first host that answers.
    Any,
    /// The first host that accepts writes (`read-write` and `primary` alike: EKM writes).
    ReadWrite,
}

/// The hosts of a PostgreSQL URL, each as sqlx's options, in the URL's order.
#[derive(Clone)]
pub struct Hosts {
    pub options: Vec<PgConnectOptions>,
    pub target: TargetSession,
}

impl std::fmt::Debug for Hosts {
    // sqlx's options hold the password: only hosts and ports are shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hosts: Vec<String> = self
            .options
            .iter()
            .map(|o| format!("{}:{}", o.get_host(), o.get_port()))
            .collect();
        f.debug_struct("Hosts")
            .field("hosts", &hosts)
            .field("target", &self.target)
            .finish()
    }
}

fn invalid(detail: impl Into<String>) -> StoreError {
    StoreError::Connect(sqlx::Error::Configuration(detail.into().into()))
}

impl Hosts {
    /// Reads `url`, in libpq's multi-host form or not. Refuses `target_session_attrs` that
    /// would pick a server EKM cannot write to.
    pub fn parse(url: &str) -> Result<Hosts, StoreError> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| invalid("the database URL needs a scheme: postgres://…"))?;
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let (userinfo, hostlist) = match authority.rfind('@') {
            Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
            None => (None, authority),
        };
        let (path, query) = match tail.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (tail, None),
        };
        let hosts: Vec<&str> = if hostlist.is_empty() {
            vec![""]
        } else {
            hostlist.split(',').collect()
        };
        let several = hosts.len() > 1;
        if several && hosts.iter().any(|h| h.is_empty()) {
            return Err(invalid("the database URL lists an empty host"));
        }
        // EKM writes: with several hosts it must find the one that accepts writes, so that
        // is the default, and `any` (which could settle on a standby) is refused.
        let mut target = if several {
            TargetSession::ReadWrite
        } else {
            TargetSession::Any
        };
        let mut kept = vec![];
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let key = pair.split_once('=').map_or(pair, |(key, _)| key);
            match (key, pair.split_once('=').map(|(_, value)| value)) {
                ("target_session_attrs", Some("read-write" | "primary")) => {
                    target = TargetSession::ReadWrite;
                }
                ("target_session_attrs", Some("any")) if !several => target = TargetSession::Any,
                ("target_session_attrs", value) => {
                    return Err(invalid(format!(
                        "target_session_attrs={}: EKM writes, so read-write or primary{}",
                        value.unwrap_or(""),
                        if several {
                            ""
                        } else {
                            " (or any, with one host)"
                        }
                    )))
                }
                // They would send every host of the list to the same place.
                ("host" | "hostaddr" | "port", _) if several => {
                    return Err(invalid(format!(
                        "{key}= in the query cannot be used with several hosts in the URL"
                    )))
                }
                _ => kept.push(pair),
            }
        }
        let options = hosts
            .iter()
            .map(|host| {
                let mut one = format!("{scheme}://");
                if let Some(userinfo) = userinfo {
                    one.push_str(userinfo);
                    one.push('@');
                }
                one.push_str(host);
                one.push_str(path);
                if !kept.is_empty() {
                    one.push('?');
                    one.push_str(&kept.join("&"));
                }
                PgConnectOptions::from_str(&one).map_err(StoreError::Connect)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Hosts { options, target })
    }

    /// More than one host, or a target that must be checked: worth watching.
    pub fn needs_watch(&self) -> bool {
        self.options.len() > 1 || self.target == TargetSession::ReadWrite
    }

    /// The first host, in order, that suits the target; `None` when none does.
    pub async fn find(&self) -> Option<usize> {
        for (index, options) in self.options.iter().enumerate() {
            if suits(options, self.target).await {
                return Some(index);
            }
        }
        None
    }
}

/// Whether the host of `options` answers, and accepts writes if `target` asks for that.
async fn suits(options: &PgConnectOptions, target: TargetSession) -> bool {
    let probe = async {
        let mut connection = PgConnection::connect_with(options).await.ok()?;
        let suits = match target {
            TargetSession::Any => true,
            TargetSession::ReadWrite => accepts_writes(&mut connection).await,
        };
        let _ = connection.close().await;
        Some(suits)
    };
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, probe).await,
        Ok(Some(true))
    )
}

async fn accepts_writes<'c, E>(executor: E) -> bool
where
    E: sqlx::Executor<'c, Database = sqlx::Postgres>,
{
    sqlx::query_scalar::<_, String>("SHOW transaction_read_only")
        .fetch_one(executor)
        .await
        .is_ok_and(|value| value == "off")
}

/// When the pools last moved to another host: connections older than that are closed when
/// next handed out. Shared by the pools' `before_acquire` and the watch.
#[derive(Debug)]
pub struct Fence {
    base: Instant,
    /// Microseconds after `base` of the last move, plus one (0: never moved).
    moved_at: AtomicU64,
}

impl Default for Fence {
    fn default() -> Self {
        Fence {
            base: Instant::now(),
            moved_at: AtomicU64::new(0),
        }
    }
}

impl Fence {
    /// Whether a connection `age` old was opened before the last move.
    pub fn stale(&self, age: Duration) -> bool {
        let moved_at = self.moved_at.load(Ordering::Acquire);
        if moved_at == 0 {
            return false;
        }
        let opened = self.base.elapsed().saturating_sub(age).as_micros() as u64;
        opened + 1 < moved_at
    }

    fn moved(&self) {
        let now = self.base.elapsed().as_micros() as u64;
        self.moved_at.store(now + 1, Ordering::Release);
    }
}

/// A new connection's check, with `ReadWrite`: a host that does not accept writes (a
/// standby, a demoted primary still up) is refused as if it could not be reached, so that
/// no connection to it is ever lent (libpq checks each connection the same way). Also
/// closes the race of a connect begun before the pools moved and finished after.
pub async fn check_writable(connection: &mut PgConnection) -> Result<(), sqlx::Error> {
    if accepts_writes(&mut *connection).await {
        return Ok(());
    }
    Err(sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::ConnectionRefused,
        "this PostgreSQL host does not accept writes (a standby, or a demoted primary)",
    )))
}

/// Follows the primary: every `WATCH_EVERY`, asks the host in use (through `pools[0]`)
/// whether it accepts writes. If not, asks it again on a connection of its own (a busy pool
/// is not a failed host), and only if that fails too finds the host that accepts writes and
/// moves every pool to it. The host in use stays while it answers as it should: an old
/// primary that comes back writable does not take the instances back (deploy.md: fence it,
/// or rewind it as a standby). Ends when the pools are closed.
pub async fn watch(hosts: Hosts, mut current: usize, pools: Vec<PgPool>, fence: Arc<Fence>) {
    let Some(probe_pool) = pools.first().cloned() else {
        return;
    };
    let mut warned: Option<Instant> = None;
    loop {
        tokio::time::sleep(WATCH_EVERY).await;
        if probe_pool.is_closed() {
            return;
        }
        let healthy = match hosts.target {
            TargetSession::ReadWrite => {
                tokio::time::timeout(PROBE_TIMEOUT, accepts_writes(&probe_pool))
                    .await
                    .unwrap_or(false)
            }
            TargetSession::Any => {
                tokio::time::timeout(PROBE_TIMEOUT, sqlx::query("SELECT 1").execute(&probe_pool))
                    .await
                    .is_ok_and(|r| r.is_ok())
            }
        };
        if healthy || suits(&hosts.options[current], hosts.target).await {
            warned = None;
            continue;
        }
        let Some(found) = hosts.find().await else {
            // Once, then every 30 s while it lasts.
            if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(30)) {
                tracing::warn!(
                    hosts = hosts.options.len(),
                    "no PostgreSQL host answers as required (accepting writes); commands fail (503) until one does"
                );
                warned = Some(Instant::now());
            }
            continue;
        };
        warned = None;
        if found == current {
            continue;
        }
        let options = &hosts.options[found];
        tracing::warn!(
            from = current,
            to = found,
            host = options.get_host(),
            port = options.get_port(),
            "the PostgreSQL primary moved; following it"
        );
        for pool in &pools {
            pool.set_connect_options(options.clone());
        }
        fence.moved();
        current = found;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn one_host_reads_as_sqlx_reads_it() {
        let hosts =
            Hosts::parse("postgres://ekm:secret@db.example:6432/ekm?sslmode=require").unwrap();
        assert_eq!(hosts.options.len(), 1);
        assert_eq!(hosts.target, TargetSession::Any);
        assert_eq!(hosts.options[0].get_host(), "db.example");
        assert_eq!(hosts.options[0].get_port(), 6432);
        assert!(!hosts.needs_watch());
    }

    #[test]
    fn several_hosts_keep_their_order_ports_and_parameters() {
        let hosts = Hosts::parse(
            "postgresql://ekm@10.0.0.1:5432,10.0.0.2:5433,[::1]:5434/ekm?target_session_attrs=read-write&application_name=ekm",
        )
        .unwrap();
        assert_eq!(hosts.target, TargetSession::ReadWrite);
        let listed: Vec<(String, u16)> = hosts
            .options
            .iter()
            .map(|o| (o.get_host().to_owned(), o.get_port()))
            .collect();
        assert_eq!(
            listed,
            vec![
                ("10.0.0.1".to_owned(), 5432),
                ("10.0.0.2".to_owned(), 5433),
                ("[::1]".to_owned(), 5434)
            ]
        );
        assert!(hosts
            .options
            .iter()
            .all(|o| o.get_database() == Some("ekm") && o.get_username() == "ekm"));
        assert!(hosts.needs_watch());
    }

    #[test]
    fn a_target_ekm_cannot_write_to_is_refused() {
        for attrs in ["read-only", "standby", "prefer-standby", "nonsense", "any"] {
            let url = format!("postgres://a,b/ekm?target_session_attrs={attrs}");
            assert!(Hosts::parse(&url).is_err(), "{attrs}");
        }
        // Several hosts need the writer, with or without saying so; one host may take any
        let several = Hosts::parse("postgres://a:1,b:2/ekm").unwrap();
        assert_eq!(several.target, TargetSession::ReadWrite);
        let one = Hosts::parse("postgres://a/ekm?target_session_attrs=any").unwrap();
        assert_eq!(one.target, TargetSession::Any);
        assert!(Hosts::parse("postgres://a,,b/ekm").is_err());
        assert!(Hosts::parse("not a url").is_err());
        // Query parameters that would send every host to one place
        for key in ["host=c", "hostaddr=10.0.0.9", "port=5439"] {
            assert!(
                Hosts::parse(&format!("postgres://a,b/ekm?{key}")).is_err(),
                "{key}"
            );
        }
    }

    #[test]
    fn the_hosts_debug_output_holds_no_password() {
        let hosts = Hosts::parse("postgres://ekm:hunter2@a:1,b:2/ekm").unwrap();
        let shown = format!("{hosts:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("a:1") && shown.contains("b:2"), "{shown}");
    }

    #[test]
    fn a_connection_is_stale_when_opened_before_the_last_move() {
        // A fence made ten seconds ago, so that "before the move" is a real span
        let fence = Fence {
            base: Instant::now() - Duration::from_secs(10),
            moved_at: AtomicU64::new(0),
        };
        assert!(!fence.stale(Duration::from_secs(3600)));
        fence.moved();
        assert!(fence.stale(Duration::from_secs(1)));
        assert!(!fence.stale(Duration::ZERO));
    }

    proptest! {
        #[test]
        fn parsing_never_panics(url in "\\PC{0,80}") {
            let _ = Hosts::parse(&url);
        }
    }
}
