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
    Serve(Box<ServeArgs>),
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
    /// Scopes (teams, threads, connectors), through the HTTP API: create, show, list,
    /// pause, resume, revoke, rotate, retire, and their past. Exit codes: 0 done, 1 the
    /// server refused (its problem document on standard error), 2 a usage error.
    #[command(subcommand)]
    Scope(ScopeCommand),
    /// Check a deployment and say what to fix: the database reachable and migrated, the
    /// master and audit keys present and matching, the clock, the customers' KMS endpoints
    /// allowed and reachable, the read models following the log. Exit 0: healthy; 1: a
    /// check failed. Changes nothing.
    Doctor(DoctorArgs),
    /// Print a completion script for a shell: `ekm completions bash > /etc/bash_completion.d/ekm`,
    /// `ekm completions zsh > "${fpath[1]}/_ekm"`, `ekm completions fish > ~/.config/fish/completions/ekm.fish`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// The platform master key: rotate it (on the database directly).
    #[command(subcommand, name = "master-key")]
    MasterKey(PlatformKeyCommand),
    /// The platform operator's token, on the database directly.
    #[command(subcommand, name = "operator-token")]
    OperatorToken(OperatorTokenCommand),
}

#[derive(Debug, Subcommand)]
pub enum PlatformKeyCommand {
    /// Make a new platform master key, re-wrap every organization key under it, and destroy
    /// the old key: copies of the database made before (backups, WAL archives, replicas)
    /// open nothing afterwards. PostgreSQL: runs beside servers, which load the new key from
    /// the file. SQLite: stop the server first.
    Rotate(RotateArgs),
}

#[derive(Debug, Args)]
pub struct RotateArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// The platform master key file (default: master.key in the data directory).
    #[arg(long, env = "EKM_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,
    #[command(flatten)]
    pub platform_key: PlatformKeyArgs,
    /// Where the new key goes: `file` (the master key file), or a KMS key as for
    /// --master-key. Default: where the current key is.
    #[arg(long)]
    pub to: Option<String>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Where the platform master key is kept when not in a file.
#[derive(Debug, Args)]
pub struct PlatformKeyArgs {
    /// Keep the platform master key in the database, wrapped by this KMS key, instead of a
    /// file: `aws-kms:ARN`, `gcp-kms:projects/…/cryptoKeys/…` or
    /// `azure-keyvault:https://….vault.azure.net/keys/…`. Credentials come from the
    /// environment, as for customer keys. A stolen data directory or database then holds no
    /// usable platform key.
    #[arg(long, env = "EKM_MASTER_KEY")]
    pub master_key: Option<String>,
    /// The endpoint of that KMS (a VPC endpoint, or a test server).
    #[arg(long, env = "EKM_MASTER_KEY_ENDPOINT")]
    pub master_key_endpoint: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum OperatorTokenCommand {
    /// Replace the operator token: the new one goes to DIR/operator.token (0600), the old
    /// one is refused. SQLite: stop the server first. PostgreSQL: runs beside live servers,
    /// which refuse the old token within a second.
    Rotate(RotateOperatorTokenArgs),
}

#[derive(Debug, Args)]
pub struct RotateOperatorTokenArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// Also print the new token on standard output (for a secret manager); by default it
    /// is only written to the file.
    #[arg(long)]
    pub print: bool,
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
    Add(GrantAddArgs),
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
pub struct GrantAddArgs {
    #[command(flatten)]
    pub grant: GrantArgs,
    /// When the grant stops counting (RFC 3339, in the future); granting again with
    /// another time, or none, replaces it.
    #[arg(long)]
    pub expires_at: Option<String>,
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
pub enum ScopeCommand {
    /// Create a scope under PARENT (an organization or a scope).
    Create {
        #[command(flatten)]
        client: ClientArgs,
        /// team, thread, mcp_connector, …
        #[arg(long)]
        kind: String,
        #[arg(long)]
        name: String,
        /// The parent scope's id (the organization's id for a top-level scope).
        #[arg(long)]
        parent: String,
    },
    /// One scope: its own and effective state, the cause, its key versions.
    Show {
        #[command(flatten)]
        client: ClientArgs,
        id: String,
    },
    /// The children of a scope, every page.
    List {
        #[command(flatten)]
        client: ClientArgs,
        id: String,
    },
    /// A scope and everything below it, indented.
    Tree {
        #[command(flatten)]
        client: ClientArgs,
        id: String,
    },
    /// Pause a scope and its subtree (reversible).
    Pause {
        #[command(flatten)]
        client: ClientArgs,
        id: String,
        /// Why: kept in the audit log.
        #[arg(long)]
        reason: String,
    },
    /// Resume a paused scope.
    Resume {
        #[command(flatten)]
        client: ClientArgs,
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Revoke a scope and its subtree, for good, once a waiting period has passed (the
    /// organization's revoke window, P7D unless its policy says otherwise). Until then it is
    /// pending_revocation and refused like paused; cancel-revocation undoes it.
    Revoke {
        #[command(flatten)]
        client: ClientArgs,
        id: String,
        #[arg(long)]
        reason: String,
        /// The scope's id typed again.
        #[arg(long)]
        confirm: String,
        /// The waiting period, an ISO 8601 duration from PT0S to P90D (e.g. P7D, PT12H).
        #[arg(long, conflicts_with = "immediately")]
        after: Option<String>,
        /// Revoke now, without a waiting period (for emergencies).
        #[arg(long)]
        immediately: bool,
        /// Only show what would be revoked.
        #[arg(long)]
        dry_run: bool,
    },
    /// Cancel a pending revocation: the scope returns to the state it had.
    CancelRevocation {
        #[command(flatten)]
        client: ClientArgs,
        id: String,
        /// Why: kept in the audit log.
        #[arg(long)]
        reason: String,
    },
    /// Add a key version; new encryptions use it.
    Rotate {
        #[command(flatten)]
        client: ClientArgs,
        id: String,
    },
    /// Stop (or, lower, allow again) decryption with the key versions below VERSION; retire
    /// destroys only versions below it.
    MinDecryptionVersion {
        #[command(flatten)]
        client: ClientArgs,
        id: String,
        version: u32,
    },
    /// The scope's key versions: state, last use and decrypts of the last 30 days.
    KeyVersions {
        #[command(flatten)]
        client: ClientArgs,
        id: String,
    },
    /// Retire (destroy) the key versions below BELOW.
    Retire {
        #[command(flatten)]
        client: ClientArgs,
        id: String,
        #[arg(long)]
        below: u32,
    },
    /// The scope as it was at a time (RFC 3339) or an event position.
    State {
        #[command(flatten)]
        client: ClientArgs,
        id: String,
        #[arg(
            long,
            conflicts_with = "position",
            required_unless_present = "position"
        )]
        at: Option<String>,
        #[arg(long)]
        position: Option<i64>,
    },
    /// Who could decrypt the scope's data at a time (RFC 3339).
    #[command(name = "access-at")]
    AccessAt {
        #[command(flatten)]
        client: ClientArgs,
        id: String,
        #[arg(long)]
        at: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum OrgCommand {
    /// Create an organization (operator token); prints its first org_admin token once.
    Create(OrgCreateArgs),
    /// The organization's master key: the platform's, or the customer's own (BYOK).
    #[command(subcommand, name = "master-key")]
    MasterKey(MasterKeyCommand),
    /// Break-glass (operator token): issue a new org_admin token to an organization left
    /// without an admin; audited with the reason. Prints the token once.
    #[command(name = "admin-token")]
    AdminToken(OrgAdminTokenArgs),
}

#[derive(Debug, Args)]
pub struct OrgAdminTokenArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The organization's id.
    pub org: String,
    /// Why (required; kept in the organization's audit log).
    #[arg(long)]
    pub reason: String,
    /// Who the token is for (default: break-glass-admin).
    #[arg(long)]
    pub principal: Option<String>,
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
    /// A bearer token on the command line, where every user of the machine can read it
    /// (`ps`): prefer the EKM_TOKEN environment variable or --token-file. Warns when used.
    #[arg(long, conflicts_with = "token_file")]
    pub token: Option<String>,
    /// A file whose first line is the bearer token (keep it 0600). Without it and without
    /// --token, the token is read from the EKM_TOKEN environment variable.
    #[arg(long, env = "EKM_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Print the raw JSON answer.
    #[arg(long)]
    pub json: bool,
    /// For an https URL: trust the certificates in this PEM file (a private CA or the
    /// server's self-signed certificate) besides the bundled public roots.
    #[arg(long, env = "EKM_CA_FILE")]
    pub ca_file: Option<PathBuf>,
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
    Rebuild(RebuildArgs),
    /// Each projection's position and lag behind the event log.
    Status(JobArgs),
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Stream an organization's audit log to standard output (JSON Lines: signed, see
    /// docs/audit-format.md).
    Export(ExportArgs),
    /// Check the hash chains against the stored events, or (with --file) a signed export
    /// against the public signing key, with no database; exits 1 if anything was tampered
    /// with.
    Verify(VerifyArgs),
    /// Print the public audit signing key (base64), for `ekm audit verify --public-key`;
    /// with --rotate, replace it first.
    SigningKey(SigningKeyArgs),
    /// Stream the data plane's access log from a running server (`GET
    /// /v1/audit/access/export`): every matching record, as JSON Lines or CSV. Exits 1 with
    /// the server's problem document on standard error if it refuses.
    Access(AccessArgs),
    /// List the audit log from a running server (`GET /v1/audit`, every page): one line per
    /// entry, or the entries' JSON with --json. Exits 1 with the server's problem document
    /// on standard error if it refuses.
    Query(AuditQueryArgs),
}

#[derive(Debug, Args)]
pub struct AuditQueryArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The organization (default: the token's).
    #[arg(long)]
    pub org: Option<String>,
    /// A scope id: its entries and its subtree's.
    #[arg(long)]
    pub scope: Option<String>,
    /// `user:…`, `service:…`, `operator:…` or `system:…`.
    #[arg(long)]
    pub actor: Option<String>,
    /// scope.pause, scope.revoke, grant.add, …
    #[arg(long)]
    pub action: Option<String>,
    /// From this time on (RFC 3339).
    #[arg(long)]
    pub from: Option<String>,
    /// Before this time (RFC 3339).
    #[arg(long)]
    pub to: Option<String>,
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// The master key file the servers use (default: DATA_DIR/master.key). Never created.
    #[arg(long, env = "EKM_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,
    /// The audit key file the servers use (default: DATA_DIR/audit.key). Never created.
    #[arg(long, env = "EKM_AUDIT_KEY_FILE")]
    pub audit_key_file: Option<PathBuf>,
    /// The servers' `--kms-allowed-endpoints`.
    #[arg(long, env = "EKM_KMS_ALLOWED_ENDPOINTS", value_delimiter = ',')]
    pub kms_allowed_endpoints: Vec<String>,
    /// Print the checks as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct AccessArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The organization (default: the token's).
    #[arg(long)]
    pub org: Option<String>,
    /// A scope id: its records and its subtree's.
    #[arg(long)]
    pub scope: Option<String>,
    /// Only this principal's uses.
    #[arg(long)]
    pub principal: Option<String>,
    /// encrypt, decrypt, datakey or rewrap.
    #[arg(long)]
    pub operation: Option<String>,
    /// `ok`, or a refusal's code (scope_paused, forbidden, ...).
    #[arg(long)]
    pub outcome: Option<String>,
    /// From this time on (RFC 3339).
    #[arg(long)]
    pub from: Option<String>,
    /// Before this time (RFC 3339).
    #[arg(long)]
    pub to: Option<String>,
    /// jsonl or csv.
    #[arg(long, default_value = "jsonl", value_parser = ["jsonl", "csv"])]
    pub format: String,
}

#[derive(Debug, Args)]
pub struct SigningKeyArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// The audit signing key file (default: DATA_DIR/audit-signing.key). Never created here.
    #[arg(long, env = "EKM_AUDIT_SIGNING_KEY_FILE")]
    pub audit_signing_key_file: Option<PathBuf>,
    /// Replace the signing key (after a compromise, or by policy): a new key file replaces the
    /// old one, whose seed is gone; the database keeps the old public key, retired, for
    /// older exports. Stop every instance first (SQLite refuses while a server runs), then
    /// copy the new file to each one. On PostgreSQL, run as the owner role (ADR 0019).
    #[arg(long)]
    pub rotate: bool,
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
pub struct RebuildArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// Serve the rebuild's progress as Prometheus metrics on this address while it runs
    /// (`ekm_rebuild_applied_position`, `ekm_rebuild_head_position`, `ekm_rebuild_running`).
    #[arg(long, env = "EKM_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// With `--metrics-listen`: keep serving this long after the rebuild ends, so that a
    /// scrape sees how it ended (at least the scrape interval).
    #[arg(long, value_parser = parse_duration)]
    pub metrics_linger: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// The organization's id.
    #[arg(long)]
    pub org: String,
    /// jsonl (signed checkpoints, verifiable offline) or csv (for spreadsheets, unsigned).
    #[arg(long, default_value = "jsonl")]
    pub format: String,
    /// The audit signing key file (default: DATA_DIR/audit-signing.key). Never created here.
    #[arg(long, env = "EKM_AUDIT_SIGNING_KEY_FILE")]
    pub audit_signing_key_file: Option<PathBuf>,
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
    #[arg(long, conflicts_with = "file")]
    pub head_file: Option<PathBuf>,
    /// Verify this signed export (`ekm audit export`, `GET /v1/audit/export`) instead of the
    /// database: needs --public-key and nothing else. Names the first altered, missing,
    /// inserted or reordered line.
    #[arg(long, requires = "public_key", conflicts_with = "org")]
    pub file: Option<PathBuf>,
    /// A file holding the public audit signing key as base64 text (`ekm audit signing-key`,
    /// `GET /v1/audit/signing-key`).
    #[arg(long, requires = "file")]
    pub public_key: Option<PathBuf>,
    /// The servers' `--access-log-retention`: a pinned access-log stream may be gone only
    /// if its month ended before it (else it was cut).
    #[arg(long, env = "EKM_ACCESS_LOG_RETENTION", default_value = "400d", value_parser = parse_days)]
    pub access_log_retention: u32,
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
    /// The platform's own scope kinds and their allowed parents, a JSON file:
    /// `{"kinds": [{"name": "project", "parents": ["organization", "team"]}]}`. A built-in
    /// name (team, thread, mcp_connector, agent) gains the parents listed. Validated at
    /// start-up; every instance sharing a database needs the same file.
    #[arg(long, env = "EKM_SCOPE_KINDS")]
    pub scope_kinds: Option<PathBuf>,
    /// Also serve `GET /metrics` (Prometheus text format) on this address, without a token:
    /// keep it private. On the main address it needs the operator token.
    #[arg(long, env = "EKM_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// How often BYOK master keys are checked (500ms, 1s, 1m, ...).
    #[arg(long, env = "EKM_KEY_HEALTH_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub key_health_interval: Duration,
    /// The platform master key file (local provider). Created on first start with mode 0600;
    /// every instance sharing a database needs the same file.
    #[arg(long, env = "EKM_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,
    #[command(flatten)]
    pub platform_key: PlatformKeyArgs,
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
    /// Transient failures in a row (timeouts, throttling, 5xx) after which calls to a
    /// customer's KMS key stop for a while and fail at once (the circuit breaker); cached
    /// keys keep serving within the grace period meanwhile. 0 turns the breaker off.
    #[arg(long, env = "EKM_KMS_BREAKER_FAILURES", default_value_t = 5)]
    pub kms_breaker_failures: u32,
    /// How long an open breaker holds calls back before one probe goes through; it doubles
    /// with each failed probe, up to 30 s. A successful health check closes it at once.
    #[arg(long, env = "EKM_KMS_BREAKER_COOLDOWN", default_value = "1s", value_parser = parse_duration)]
    pub kms_breaker_cooldown: Duration,
    /// The endpoint URLs customer keys may name in `endpoint_url` (VPC endpoints, private
    /// links), comma-separated, each `scheme://host[:port]` in canonical form; one DNS label
    /// may hold one `*` (`https://*.p.googleapis.com`), or the port may be `*`. Scheme, host
    /// and port are matched; any other endpoint is refused: the platform's cloud credentials
    /// are sent to it. A pattern that does not parse stops `ekm serve`.
    #[arg(long, env = "EKM_KMS_ALLOWED_ENDPOINTS", value_delimiter = ',')]
    pub kms_allowed_endpoints: Vec<String>,
    /// Time limit of each call to a customer's KMS (retried with backoff when transient).
    #[arg(long, env = "EKM_KMS_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub kms_timeout: Duration,
    /// Where scope reads and the data plane's enforcement answer from: `memory` (the scope
    /// tree every instance holds, loaded at start and fed by the projection runner) or `sql`
    /// (the read models, as before; kept for comparison).
    #[arg(long, env = "EKM_SCOPE_READS", default_value = "memory", value_parser = ["memory", "sql"])]
    pub scope_reads: String,
    /// How often the projection runner looks for events committed by other instances when
    /// no notification arrives.
    #[arg(long, env = "EKM_PROJECTION_POLL_INTERVAL", default_value = "500ms", value_parser = parse_duration)]
    pub projection_poll_interval: Duration,
    /// How long the read models may stay behind the event log before the data plane refuses
    /// (503 unavailable) and /readyz fails: a projection runner stuck on an event must not
    /// leave a pause committed after it unenforced.
    #[arg(long, env = "EKM_MAX_PROJECTION_LAG", default_value = "5s", value_parser = parse_duration)]
    pub max_projection_lag: Duration,
    /// Time a client has to send a request's headers, counted from when the connection is
    /// ready for a request: also how long an idle keep-alive connection stays open, and the
    /// limit of a TLS handshake.
    #[arg(long, env = "EKM_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,
    /// Time from a request's headers to its answer, reading the body included (408 when the
    /// body is late, 503 when the answer is).
    #[arg(long, env = "EKM_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// Connections served at once; more wait to be accepted until one closes.
    #[arg(long, env = "EKM_MAX_CONNECTIONS", default_value = "1024", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,
    /// Requests in flight at once; more are answered 503 `overloaded` with Retry-After
    /// (`/healthz` never is).
    #[arg(long, env = "EKM_MAX_CONCURRENT_REQUESTS", default_value = "512", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_concurrent_requests: u32,
    /// Requests in flight per expensive endpoint (audit verify, audit export, scope search).
    #[arg(long, env = "EKM_MAX_EXPENSIVE_REQUESTS", default_value = "2", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_expensive_requests: u32,
    /// Rate limit of each principal on the data plane (encrypt, decrypt, datakey, rewrap),
    /// for organizations that set none (`PUT /v1/orgs/{org}/limits`): a token bucket,
    /// `PER_SECOND:BURST`, or `off`. Over it: 429 `rate_limited` with Retry-After.
    #[arg(long, env = "EKM_RATE_LIMIT_DATA_PLANE_PRINCIPAL", default_value = "5000:10000", value_parser = parse_rate)]
    pub rate_limit_data_plane_principal: Rate,
    /// Rate limit of each organization on the data plane (all its principals together).
    #[arg(long, env = "EKM_RATE_LIMIT_DATA_PLANE_ORGANIZATION", default_value = "20000:40000", value_parser = parse_rate)]
    pub rate_limit_data_plane_organization: Rate,
    /// Rate limit of each principal on commands (every other POST, PUT and DELETE).
    #[arg(long, env = "EKM_RATE_LIMIT_COMMANDS_PRINCIPAL", default_value = "100:1000", value_parser = parse_rate)]
    pub rate_limit_commands_principal: Rate,
    /// Rate limit of each organization on commands.
    #[arg(long, env = "EKM_RATE_LIMIT_COMMANDS_ORGANIZATION", default_value = "500:5000", value_parser = parse_rate)]
    pub rate_limit_commands_organization: Rate,
    /// After SIGTERM or SIGINT, how long requests in progress may still run before their
    /// connections are closed and the process exits.
    #[arg(long, env = "EKM_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
    /// Serve HTTPS with this PEM certificate chain (needs --tls-key).
    #[arg(long, env = "EKM_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "EKM_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The audit key file (HMAC key of the audit seals). Created on first start with mode
    /// 0600; every instance sharing a database needs the same file; keep a copy for the
    /// auditors' `ekm audit verify`.
    #[arg(long, env = "EKM_AUDIT_KEY_FILE")]
    pub audit_key_file: Option<PathBuf>,
    /// The audit signing key file (Ed25519 seed; signs the checkpoints of audit exports).
    /// Created on first start with mode 0600; every instance sharing a database needs the
    /// same file; its public half is `GET /v1/audit/signing-key`.
    #[arg(long, env = "EKM_AUDIT_SIGNING_KEY_FILE")]
    pub audit_signing_key_file: Option<PathBuf>,
    /// Seal events that exist without seals although no server sealed them yet (a database
    /// seeded outside EKM, or upgraded from unkeyed seals). Without it a server refuses to
    /// seal history whose seals were reset (ADR 0018).
    #[arg(long)]
    pub seal_existing_history: bool,
    /// Never run migrations: refuse to start unless the database is current. For a role
    /// without DDL rights; the owner runs `ekm migrate` (docs/ops/postgres-roles.sql).
    #[arg(long, env = "EKM_NO_MIGRATE")]
    pub no_migrate: bool,
    /// The data plane's access log (ADR 0026): `durable` commits each use's record before
    /// the answer; `async` answers at once and commits within the writer's next batch (a
    /// crash loses what was queued, at most about a second of records). `off` records
    /// nothing and exists for benchmarks only.
    #[arg(long, env = "EKM_ACCESS_LOG", default_value = "durable", value_parser = ["durable", "async", "off"])]
    pub access_log: String,
    /// How long access-log records are kept, in days (`400` or `400d`; at least 30). On
    /// PostgreSQL whole monthly partitions are dropped once all their records are older.
    #[arg(long, env = "EKM_ACCESS_LOG_RETENTION", default_value = "400d", value_parser = parse_days)]
    pub access_log_retention: u32,
}

/// A number of days, `400` or `400d`, from 30 to 36,500.
fn parse_days(input: &str) -> Result<u32, String> {
    let number = input.trim().strip_suffix('d').unwrap_or(input.trim());
    number
        .parse::<u32>()
        .ok()
        .filter(|days| (ekm_store::access_log::MIN_RETENTION_DAYS..=36_500).contains(days))
        .ok_or_else(|| format!("`{input}`: expected a number of days from 30 to 36500, as in 400d"))
}

/// A rate limit flag: a token bucket, or none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate(pub Option<ekm_domain::RateBucket>);

/// `PER_SECOND:BURST` (e.g. `100:1000`), or `off`.
pub fn parse_rate(text: &str) -> Result<Rate, String> {
    if text.trim().eq_ignore_ascii_case("off") {
        return Ok(Rate(None));
    }
    ekm_domain::RateBucket::parse("rate limit", text)
        .map(|bucket| Rate(Some(bucket)))
        .map_err(|e| e.to_string())
}
