//! An in-process server on port 0 (`TestApp`), started as `ekm serve` starts one, and a small
//! HTTP client whose answers are read whole (`Response`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ekm_api::{App, AppState};
use ekm_projections::{Projector, ProjectorConfig};
use ekm_store::{Db, DbConfig, Tokens, OPERATOR_TOKEN_FILE};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::sync::watch;

use super::*;

pub struct TestApp {
    pub base: String,
    pub operator_token: String,
    pub client: reqwest::Client,
    pub app: App,
    pub db: Db,
    /// The re-key job (also running in the background, as in `ekm serve`): tests call
    /// `run_pending` to wait for it deterministically.
    pub rekeyer: Arc<ekm_service::rekey::Rekeyer>,
    shutdown: watch::Sender<bool>,
    pub config: DbConfig,
    data_dir: PathBuf,
    url: Option<String>,
    /// Held for its `Drop`: the test database is removed after the server stops. Peers
    /// (other instances on the same database) hold none.
    pub _test_db: Option<TestDb>,
}

/// How an in-process server is configured beyond its database.
#[derive(Clone)]
pub struct Options {
    pub key_cache_ttl: std::time::Duration,
    pub kms: ekm_service::keys::KmsOptions,
    /// Runs the master key health monitor at this interval.
    pub health_interval: Option<std::time::Duration>,
    /// Runs the re-key job in the background, as `ekm serve` does (tests of the job
    /// itself drive it by hand instead).
    pub rekey_in_background: bool,
    /// `ekm serve --max-projection-lag`.
    pub max_projection_lag: std::time::Duration,
    /// `ekm serve --access-log`.
    pub access_log: ekm_store::AccessLogMode,
    /// Runs the scheduler, as `ekm serve` does (a test of what holds before it fires turns
    /// it off).
    pub scheduler: bool,
    /// The default rate limits (`ekm serve --rate-limit-*`): off, unless a test of the
    /// limits sets them (the others drive more requests than a client would).
    pub rate_limits: ekm_api::rate_limit::RateDefaults,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            key_cache_ttl: std::time::Duration::from_secs(300),
            kms: ekm_service::keys::KmsOptions::default(),
            health_interval: None,
            rekey_in_background: true,
            max_projection_lag: std::time::Duration::from_secs(5),
            access_log: ekm_store::AccessLogMode::Durable,
            scheduler: true,
            rate_limits: ekm_api::rate_limit::RateDefaults::OFF,
        }
    }
}

impl TestApp {
    /// Finishes the pending re-keys, retrying one that fails for a moment (a KMS call to
    /// moto timing out under the load of the whole suite), as the background job would on
    /// its next wake. One that keeps failing (a customer key left unavailable on purpose)
    /// stays pending, as it does live. `Ok(0)`: nothing was left to do.
    pub async fn finish_rekeys(&self) {
        for _ in 0..10 {
            if let Ok(0) = self.rekeyer.run_pending().await {
                return;
            }
        }
    }

    pub async fn spawn(backend: Backend) -> TestApp {
        Self::spawn_on(TestDb::new(backend).await).await
    }

    pub async fn spawn_with(backend: Backend, options: Options) -> TestApp {
        let test_db = TestDb::new(backend).await;
        let config = test_db.config.clone();
        let data_dir = test_db.data_dir().to_path_buf();
        let url = test_db.url.clone();
        let mut app = Self::instance(config, data_dir, url, options).await;
        app._test_db = Some(test_db);
        app
    }

    pub async fn spawn_on(test_db: TestDb) -> TestApp {
        Self::spawn_on_with(test_db, Options::default()).await
    }

    pub async fn spawn_on_with(test_db: TestDb, options: Options) -> TestApp {
        let config = test_db.config.clone();
        let data_dir = test_db.data_dir().to_path_buf();
        let url = test_db.url.clone();
        let mut app = Self::instance(config, data_dir, url, options).await;
        app._test_db = Some(test_db);
        app
    }

    /// Another instance on the same database (PostgreSQL), with its own projector and key
    /// cache, sharing the data directory's master key file.
    pub async fn peer(&self) -> TestApp {
        self.peer_with(Options::default()).await
    }

    pub async fn peer_with(&self, options: Options) -> TestApp {
        Self::instance(
            self.config.clone(),
            self.data_dir.clone(),
            self.url.clone(),
            options,
        )
        .await
    }

    async fn instance(
        config: DbConfig,
        data_dir: PathBuf,
        url: Option<String>,
        options: Options,
    ) -> TestApp {
        ekm_service::metrics::install();
        let db = Db::open(&config).await.expect("open database");
        Tokens::new(db.clone())
            .ensure_operator_token(&data_dir)
            .await
            .expect("operator token");
        let operator_token = std::fs::read_to_string(data_dir.join(OPERATOR_TOKEN_FILE))
            .expect("operator token file")
            .trim()
            .to_owned();
        let seal = seal_key(&data_dir);
        ekm_projections::register_seal_key(&db, &seal)
            .await
            .expect("the data directory's audit key");
        let projector = Arc::new(Projector::standard(
            db.clone(),
            ProjectorConfig {
                async_commit: true,
                ..ProjectorConfig::default()
            },
            seal.clone(),
        ));
        projector.init().await.expect("projector init");
        projector.catch_up().await.expect("catch up");
        let (shutdown, shutdown_rx) = watch::channel(false);
        tokio::spawn(projector.clone().run(shutdown_rx.clone()));
        let master =
            ekm_service::keys::local_master_key(&db, &data_dir.join(ekm_keys::MASTER_KEY_FILE))
                .await
                .expect("master key");
        let keys = ekm_service::keys::KeyService::with_kms(
            db.clone(),
            master,
            options.key_cache_ttl,
            options.kms.clone(),
        );
        let signing = Arc::new(signing_key(&data_dir));
        ekm_projections::register_signing_key(&db, &signing)
            .await
            .expect("the data directory's audit signing key");
        let app = App::new(db.clone(), projector, keys, seal, signing);
        let events_path = match &config {
            DbConfig::Sqlite { path } => Some(path.clone()),
            DbConfig::Postgres { .. } => None,
        };
        let access = ekm_store::AccessLog::open(
            &db,
            events_path.as_deref(),
            options.access_log,
            app.access_sealer(),
        )
        .await
        .expect("open the access log");
        app.set_access_log(access).expect("one access log");
        app.load_memory()
            .await
            .expect("load the scope tree into memory");
        let rekeyer = ekm_service::rekey::Rekeyer::new(app.clone());
        if options.rekey_in_background {
            tokio::spawn(rekeyer.clone().run(shutdown_rx.clone()));
        }
        tokio::spawn(
            app.clone()
                .watch_projections(options.max_projection_lag, shutdown_rx.clone()),
        );
        if options.scheduler {
            tokio::spawn(
                ekm_service::scheduler::Scheduler::new(app.clone()).run(shutdown_rx.clone()),
            );
        }
        if let Some(interval) = options.health_interval {
            tokio::spawn(
                ekm_service::health::HealthMonitor::new(app.clone(), interval)
                    .run(shutdown_rx.clone()),
            );
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let limits = ekm_api::limits::Limits {
            rate: options.rate_limits,
            ..Default::default()
        };
        let service = ekm_api::router_with_limits(AppState::new(app.clone()), limits)
            .into_make_service_with_connect_info::<SocketAddr>();
        let mut stop = shutdown_rx;
        tokio::spawn(async move {
            let _ = axum::serve(listener, service)
                .with_graceful_shutdown(async move {
                    let _ = stop.changed().await;
                })
                .await;
        });
        TestApp {
            base: format!("http://{address}"),
            operator_token,
            client: reqwest::Client::new(),
            app,
            db,
            rekeyer,
            shutdown,
            config,
            data_dir,
            url,
            _test_db: None,
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn database_url(&self) -> Option<&str> {
        self.url.as_deref()
    }

    /// `ekm ARGS` on this instance's database: its data directory, and its PostgreSQL URL
    /// when it has one (never the environment's).
    pub fn ekm(&self, args: &[&str]) -> std::process::Command {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ekm"));
        command
            .args(args)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .env_remove("EKM_DATABASE_URL");
        if let Some(url) = self.database_url() {
            command.args(["--database-url", url]);
        }
        command
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Response {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        Response::from(request.send().await.expect("request sent")).await
    }

    pub async fn get(&self, path: &str, token: &str) -> Response {
        self.call("GET", path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> Response {
        self.call("POST", path, Some(token), Some(body)).await
    }

    /// Creates an organization; returns its id and admin token.
    pub async fn org(&self, plan: &str) -> (String, String) {
        self.org_with(plan, "default").await
    }

    /// An organization whose admin is also granted `data:use` (admins hold it only by
    /// grant), so a flow can manage and encrypt with one token.
    pub async fn data_org(&self, plan: &str, tier: &str) -> (String, String) {
        let (org, admin) = self.org_with(plan, tier).await;
        self.grant(&admin, &org, "admin", "data:use", None).await;
        (org, admin)
    }

    pub async fn org_with(&self, plan: &str, tier: &str) -> (String, String) {
        let response = self
            .post(
                "/v1/orgs",
                &self.operator_token,
                json!({"name": "Acme", "plan": plan, "tier": tier}),
            )
            .await;
        assert_eq!(response.status, StatusCode::CREATED, "{}", response.body);
        (response.str("id"), response.str("admin_token"))
    }

    /// Grants `permission` to `principal` (as the org admin `token`).
    pub async fn grant(
        &self,
        token: &str,
        org: &str,
        principal: &str,
        permission: &str,
        scope: Option<&str>,
    ) {
        let mut body = json!({"principal": principal, "permission": permission});
        if let Some(scope) = scope {
            body["scope_id"] = json!(scope);
        }
        let granted = self
            .post(&format!("/v1/orgs/{org}/grants"), token, body)
            .await;
        assert!(granted.status.is_success(), "{}", granted.body);
    }

    /// Issues a token to a new principal; returns the secret.
    pub async fn token(&self, admin: &str, org: &str, principal: &str, role: &str) -> String {
        let issued = self
            .post(
                &format!("/v1/orgs/{org}/tokens"),
                admin,
                json!({"principal": principal, "kind": "service", "role": role}),
            )
            .await;
        assert_eq!(issued.status, StatusCode::CREATED, "{}", issued.body);
        issued.str("token")
    }

    /// Creates a scope; returns its id.
    pub async fn scope(&self, token: &str, kind: &str, name: &str, parent: &str) -> String {
        let response = self
            .post(
                "/v1/scopes",
                token,
                json!({"kind": kind, "name": name, "parent_id": parent}),
            )
            .await;
        assert_eq!(response.status, StatusCode::CREATED, "{}", response.body);
        response.str("id")
    }

    /// Sets the scope's decryption floor (versions below it stop decrypting; retire then
    /// destroys only below it).
    pub async fn floor(&self, token: &str, id: &str, version: u32) -> Response {
        let answer = self
            .call(
                "PUT",
                &format!("/v1/scopes/{id}/min-decryption-version"),
                Some(token),
                Some(json!({"version": version})),
            )
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        answer
    }

    pub async fn pause(&self, token: &str, id: &str) -> Response {
        self.post(
            &format!("/v1/scopes/{id}/pause"),
            token,
            json!({"reason": "investigation 4711"}),
        )
        .await
    }

    pub async fn resume(&self, token: &str, id: &str) -> Response {
        self.post(&format!("/v1/scopes/{id}/resume"), token, json!({}))
            .await
    }

    /// Revokes at once (`"immediately": true`), as most tests need.
    pub async fn revoke(&self, token: &str, id: &str) -> Response {
        self.post(
            &format!("/v1/scopes/{id}/revoke"),
            token,
            json!({"reason": "offboarding", "confirm": id, "immediately": true}),
        )
        .await
    }

    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        self.db.close().await;
    }

    /// Stops the server but keeps its database, to start another server on it later
    /// (`TestApp::spawn_on`).
    pub async fn stop_keeping_database(mut self) -> TestDb {
        let test_db = self
            ._test_db
            .take()
            .expect("the instance that owns the database");
        let _ = self.shutdown.send(true);
        self.db.close().await;
        test_db
    }
}

/// A response, read whole.
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub content_type: String,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Response {
    /// A response of a request the test built itself.
    pub async fn from_reqwest(response: reqwest::Response) -> Response {
        Self::from(response).await
    }

    async fn from(response: reqwest::Response) -> Response {
        let status = response.status();
        let headers = response.headers().clone();
        let content_type = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let text = response.text().await.expect("body");
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Response {
            status,
            content_type,
            headers,
            body,
        }
    }

    pub fn str(&self, key: &str) -> String {
        self.body[key]
            .as_str()
            .unwrap_or_else(|| panic!("`{key}` missing in {}", self.body))
            .to_owned()
    }

    /// Asserts a problem+json refusal with this status and code.
    pub fn assert_problem(&self, status: u16, code: &str) {
        assert_eq!(self.status.as_u16(), status, "{}", self.body);
        assert_eq!(
            self.content_type, "application/problem+json",
            "{}",
            self.body
        );
        assert_eq!(self.body["code"], code, "{}", self.body);
        assert_eq!(self.body["status"], status);
        assert!(self.body["type"]
            .as_str()
            .is_some_and(|t| t.ends_with(code)));
        assert!(self.body["title"].is_string() && self.body["detail"].is_string());
    }
}
