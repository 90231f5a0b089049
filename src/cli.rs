//! The command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::duration::parse_duration;

#[derive(Debug, Parser)]
#[command(
    name = "ekm",
    version,
    about = "Encryption Key Management and BYOK control plane"
)]
pub struct Cli {
    /// Log format on standard error.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "EKM_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (migrates the database first).
    Serve(ServeArgs),
    /// Apply pending database migrations and exit.
    Migrate(DbArgs),
    /// Read models: rebuild them from the events, or show how far each one is.
    #[command(subcommand)]
    Projections(ProjectionsCommand),
    /// The audit log: export it, or verify its hash chains.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Organizations, through the HTTP API of a running server.
    #[command(subcommand)]
    Org(OrgCommand),
    /// An organization's bearer tokens (org admins), through the HTTP API.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Permissions granted to an organization's principals (org admins), through the API.
    #[command(subcommand)]
    Grant(GrantCommand),
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Issue a token to a principal; the token is printed once.
    Create(TokenCreateArgs),
    /// List the organization's tokens (never their secrets).
    List(OrgArgs),
    /// Revoke a token: it stops working at once.
    Revoke(TokenRevokeArgs),
}

#[derive(Debug, Subcommand)]
pub enum GrantCommand {
    /// Grant a permission (encryption:manage, encryption:view, audit:read, data:use).
    Add(GrantArgs),
    /// Remove a grant.
    Remove(GrantArgs),
    /// List the organization's grants.
    List(OrgArgs),
}

#[derive(Debug, Args)]
pub struct OrgArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The organization's id.
    pub org: String,
}

#[derive(Debug, Args)]
pub struct TokenCreateArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The organization's id.
    pub org: String,
    /// Who the token is for (letters, digits, . - _ @).
    #[arg(long)]
    pub principal: String,
    /// user or service.
    #[arg(long, default_value = "service")]
    pub kind: String,
    /// member, it_admin or org_admin.
    #[arg(long, default_value = "member")]
    pub role: String,
    /// When it stops working (RFC 3339).
    #[arg(long)]
    pub expires_at: Option<String>,
}

#[derive(Debug, Args)]
pub struct TokenRevokeArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The organization's id.
    pub org: String,
    /// The token's id (tok_…), not its secret.
    pub id: String,
}

#[derive(Debug, Args)]
pub struct GrantArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The organization's id.
    pub org: String,
    #[arg(long)]
    pub principal: String,
    #[arg(long)]
    pub permission: String,
    /// Limit to this scope's subtree.
    #[arg(long)]
    pub scope: Option<String>,
}

#[derive(Debug, Args)]
pub struct OrgCreateArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(long)]
    pub name: String,
    /// standard or enterprise.
    #[arg(long, default_value = "standard")]
    pub plan: String,
    /// default or managed.
    #[arg(long, default_value = "default")]
    pub tier: String,
}

#[derive(Debug, Subcommand)]
pub enum OrgCommand {
    /// Create an organization (operator token); prints its first org_admin token once.
    Create(OrgCreateArgs),
    /// The organization's master key: the platform's, or the customer's own (BYOK).
    #[command(subcommand, name = "master-key")]
    MasterKey(MasterKeyCommand),
}

#[derive(Debug, Subcommand)]
pub enum MasterKeyCommand {
    /// Connect a customer master key (validated with a round trip first), or go back to the
    /// platform's key with `--provider local`.
    Set(MasterKeySetArgs),
    /// Show the provider, key, status and last health check.
    Show(MasterKeyShowArgs),
}

/// How to reach the API.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The server's base URL.
    #[arg(long, env = "EKM_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// A bearer token of the organization (an org admin's).
    #[arg(long, env = "EKM_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Print the raw JSON answer.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct MasterKeySetArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The organization's id.
    pub org: String,
    /// aws-kms, gcp-kms, azure-keyvault, or local (the platform's key).
    #[arg(long)]
    pub provider: String,
    /// AWS key ARN (or key id/alias with --region), GCP CryptoKey resource name, or Azure
    /// key URL.
    #[arg(long)]
    pub key_id: Option<String>,
    #[arg(long)]
    pub region: Option<String>,
    /// A VPC/private endpoint (or a test server).
    #[arg(long)]
    pub endpoint_url: Option<String>,
    /// Why (recorded in the audit log).
    #[arg(long)]
    pub reason: Option<String>,
}

#[derive(Debug, Args)]
pub struct MasterKeyShowArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The organization's id.
    pub org: String,
}

#[derive(Debug, Subcommand)]
pub enum ProjectionsCommand {
    /// Rebuild every read model from the event log, with progress. SQLite: stop the server
    /// first. PostgreSQL: may run beside live servers (built aside, then swapped in).
    Rebuild(JobArgs),
    /// Each projection's position and lag behind the event log.
    Status(JobArgs),
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Stream an organization's audit log to standard output.
    Export(ExportArgs),
    /// Check the hash chains against the stored events; exits 1 if any was tampered with.
    Verify(VerifyArgs),
}

#[derive(Debug, Args)]
pub struct JobArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// The organization's id.
    #[arg(long)]
    pub org: String,
    /// jsonl or csv.
    #[arg(long, default_value = "jsonl")]
    pub format: String,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// Only this organization (default: every organization).
    #[arg(long)]
    pub org: Option<String>,
    /// Print the reports as JSON.
    #[arg(long)]
    pub json: bool,
    /// The audit key file the seals were made with (default: DATA_DIR/audit.key). Never
    /// created here.
    #[arg(long, env = "EKM_AUDIT_KEY_FILE")]
    pub audit_key_file: Option<PathBuf>,
    /// A file kept by the auditor, outside the database: each organization's last verified
    /// head (position and seal). Compared on every run (a shorter history, or a different
    /// seal at the recorded position, fails) and updated for the organizations that verify.
    /// Created if missing.
    #[arg(long)]
    pub head_file: Option<PathBuf>,
}

/// Where the data lives: SQLite in the data directory, or PostgreSQL.
#[derive(Debug, Args)]
pub struct DbArgs {
    /// Data directory: the SQLite database (unless --database-url is given) and the
    /// operator token file.
    #[arg(long, env = "EKM_DATA_DIR", default_value = "ekm-data")]
    pub data_dir: PathBuf,
    /// PostgreSQL URL (postgres://user@host/db). Without it, SQLite in the data directory.
    #[arg(long, env = "EKM_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// Address to listen on.
    #[arg(long, env = "EKM_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// How often BYOK master keys are checked (500ms, 1s, 1m, ...).
    #[arg(long, env = "EKM_KEY_HEALTH_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub key_health_interval: Duration,
    /// The platform master key file (local provider). Created on first start with mode 0600;
    /// every instance sharing a database needs the same file.
    #[arg(long, env = "EKM_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,
    /// How long unwrapped keys stay cached (they are evicted at once on pause, revoke and
    /// rotation regardless).
    #[arg(long, env = "EKM_KEY_CACHE_TTL", default_value = "5m", value_parser = parse_duration)]
    pub key_cache_ttl: Duration,
    /// How long organization keys unwrapped through a customer's KMS keep serving while
    /// that KMS is unreachable (timeouts, throttling, 5xx), and how long such an outage lasts
    /// before the organization is recorded `unavailable`. The customer's own decisions
    /// (disable, delete, access removed) take effect at once regardless.
    #[arg(long, env = "EKM_KMS_GRACE_PERIOD", default_value = "5m", value_parser = parse_duration)]
    pub kms_grace_period: Duration,
    /// The endpoint URLs customer keys may name in `endpoint_url` (VPC endpoints, private
    /// links), comma-separated. Any other is refused: the platform's cloud credentials are
    /// sent to the endpoint.
    #[arg(long, env = "EKM_KMS_ALLOWED_ENDPOINTS", value_delimiter = ',')]
    pub kms_allowed_endpoints: Vec<String>,
    /// Time limit of each call to a customer's KMS (retried with backoff when transient).
    #[arg(long, env = "EKM_KMS_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub kms_timeout: Duration,
    /// How often the projection runner looks for events committed by other instances when
    /// no notification arrives.
    #[arg(long, env = "EKM_PROJECTION_POLL_INTERVAL", default_value = "500ms", value_parser = parse_duration)]
    pub projection_poll_interval: Duration,
    /// The audit key file (HMAC key of the audit seals). Created on first start with mode
    /// 0600; every instance sharing a database needs the same file; keep a copy for the
    /// auditors' `ekm audit verify`.
    #[arg(long, env = "EKM_AUDIT_KEY_FILE")]
    pub audit_key_file: Option<PathBuf>,
    /// Seal events that exist without seals although no server sealed them yet (a database
    /// seeded outside EKM, or upgraded from unkeyed seals). Without it a server refuses to
    /// seal history whose seals were reset (ADR 0024).
    #[arg(long)]
    pub seal_existing_history: bool,
    /// Never run migrations: refuse to start unless the database is current. For a role
    /// without DDL rights; the owner runs `ekm migrate` (docs/ops/postgres-roles.sql).
    #[arg(long, env = "EKM_NO_MIGRATE")]
    pub no_migrate: bool,
}
