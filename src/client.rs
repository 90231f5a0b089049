//! Commands that are clients of a running server's HTTP API (`ekm org …`). They print the
//! server's answer; a refusal's problem document goes to standard error and the exit code
//! is 1.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use serde_json::{json, Value};
use zeroize::Zeroizing;

use crate::cli::{ClientArgs, GrantCommand, MasterKeyCommand, OrgCommand, TokenCommand};

pub async fn org(command: OrgCommand) -> anyhow::Result<ExitCode> {
    match command {
        OrgCommand::Create(args) => {
            let body = json!({"name": args.name, "plan": args.plan, "tier": args.tier});
            call(
                &args.client,
                reqwest::Method::POST,
                "/v1/orgs",
                Some(body),
                Shape::Raw,
            )
            .await
        }
        OrgCommand::MasterKey(MasterKeyCommand::Set(args)) => {
            let mut body = json!({ "provider": args.provider });
            for (name, value) in [
                ("key_id", &args.key_id),
                ("region", &args.region),
                ("endpoint_url", &args.endpoint_url),
                ("reason", &args.reason),
            ] {
                if let Some(value) = value {
                    body[name] = json!(value);
                }
            }
            let path = format!("/v1/orgs/{}/master-key", args.org);
            call(
                &args.client,
                reqwest::Method::PUT,
                &path,
                Some(body),
                Shape::MasterKey,
            )
            .await
        }
        OrgCommand::AdminToken(args) => {
            let mut body = json!({ "reason": args.reason });
            if let Some(principal) = args.principal {
                body["principal"] = json!(principal);
            }
            let path = format!("/v1/orgs/{}/admin-tokens", args.org);
            call(
                &args.client,
                reqwest::Method::POST,
                &path,
                Some(body),
                Shape::Raw,
            )
            .await
        }
        OrgCommand::MasterKey(MasterKeyCommand::Show(args)) => {
            let path = format!("/v1/orgs/{}/master-key", args.org);
            call(
                &args.client,
                reqwest::Method::GET,
                &path,
                None,
                Shape::MasterKey,
            )
            .await
        }
    }
}

pub async fn token(command: TokenCommand) -> anyhow::Result<ExitCode> {
    match command {
        TokenCommand::Create(args) => {
            let mut body =
                json!({"principal": args.principal, "kind": args.kind, "role": args.role});
            if let Some(at) = args.expires_at {
                body["expires_at"] = json!(at);
            }
            let path = format!("/v1/orgs/{}/tokens", args.org);
            call(
                &args.client,
                reqwest::Method::POST,
                &path,
                Some(body),
                Shape::Raw,
            )
            .await
        }
        TokenCommand::List(args) => {
            let path = format!("/v1/orgs/{}/tokens", args.org);
            call(&args.client, reqwest::Method::GET, &path, None, Shape::Raw).await
        }
        TokenCommand::Revoke(args) => {
            let path = format!("/v1/orgs/{}/tokens/{}", args.org, args.id);
            call(
                &args.client,
                reqwest::Method::DELETE,
                &path,
                None,
                Shape::Raw,
            )
            .await
        }
    }
}

pub async fn grant(command: GrantCommand) -> anyhow::Result<ExitCode> {
    match command {
        GrantCommand::Add(add) => {
            let args = add.grant;
            let mut body = json!({"principal": args.principal, "permission": args.permission});
            if let Some(scope) = args.scope {
                body["scope_id"] = json!(scope);
            }
            if let Some(expires_at) = add.expires_at {
                body["expires_at"] = json!(expires_at);
            }
            let path = format!("/v1/orgs/{}/grants", args.org);
            call(
                &args.client,
                reqwest::Method::POST,
                &path,
                Some(body),
                Shape::Raw,
            )
            .await
        }
        GrantCommand::Remove(args) => {
            let mut path = format!(
                "/v1/orgs/{}/grants/{}/{}",
                args.org, args.principal, args.permission
            );
            if let Some(scope) = args.scope {
                path.push_str(&format!("?scope_id={scope}"));
            }
            call(
                &args.client,
                reqwest::Method::DELETE,
                &path,
                None,
                Shape::Raw,
            )
            .await
        }
        GrantCommand::List(args) => {
            let path = format!("/v1/orgs/{}/grants", args.org);
            call(&args.client, reqwest::Method::GET, &path, None, Shape::Raw).await
        }
    }
}

/// `ekm audit access`: the export endpoint, streamed to standard output as it arrives.
pub async fn access(args: crate::cli::AccessArgs) -> anyhow::Result<ExitCode> {
    let token = bearer_token(&args.client)?;
    let mut query = vec![("format", args.format.clone())];
    for (name, value) in [
        ("org", &args.org),
        ("scope", &args.scope),
        ("principal", &args.principal),
        ("operation", &args.operation),
        ("outcome", &args.outcome),
        ("from", &args.from),
        ("to", &args.to),
    ] {
        if let Some(value) = value {
            query.push((name, value.clone()));
        }
    }
    let url = format!(
        "{}/v1/audit/access/export",
        args.client.url.trim_end_matches('/')
    );
    let mut response = http_client(&args.client)?
        .get(&url)
        .query(&query)
        .bearer_auth(token.as_str())
        .send()
        .await
        .with_context(|| format!("cannot reach {}", args.client.url))?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        writeln!(std::io::stderr().lock(), "{text}")?;
        return Ok(ExitCode::FAILURE);
    }
    let mut stdout = std::io::stdout().lock();
    // A transfer cut short (the server's export failed) is an error, never a short file
    // that looks complete.
    while let Some(chunk) = response
        .chunk()
        .await
        .context("the export ended before it was complete")?
    {
        stdout.write_all(&chunk)?;
    }
    stdout.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// How an answer is printed without `--json`.
enum Shape {
    /// The JSON itself (pretty), fit for scripts and people alike.
    Raw,
    MasterKey,
}

async fn call(
    client: &ClientArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
    shape: Shape,
) -> anyhow::Result<ExitCode> {
    let answer = match request(client, method, path, body).await? {
        Ok(answer) => answer,
        Err(problem) => {
            return refused(&problem);
        }
    };
    let text = serde_json::to_string_pretty(&answer)?;
    let mut stdout = std::io::stdout().lock();
    match shape {
        Shape::MasterKey if !client.json => writeln!(stdout, "{}", summary(&answer))?,
        _ => writeln!(stdout, "{text}")?,
    }
    Ok(ExitCode::SUCCESS)
}

/// The bearer token: `--token` (with a warning: other users see it in `ps`), else the
/// first line of `--token-file`, else `EKM_TOKEN`. Never printed.
fn bearer_token(client: &ClientArgs) -> anyhow::Result<Zeroizing<String>> {
    if let Some(token) = &client.token {
        writeln!(
            std::io::stderr().lock(),
            "warning: --token is visible to other users of this machine (ps, /proc); \
             use EKM_TOKEN or --token-file instead"
        )?;
        return Ok(Zeroizing::new(token.trim().to_owned()));
    }
    if let Some(path) = &client.token_file {
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the token file {}", path.display()))?,
        );
        let token = text.lines().next().unwrap_or("").trim();
        if token.is_empty() {
            anyhow::bail!("the token file {} is empty", path.display());
        }
        return Ok(Zeroizing::new(token.to_owned()));
    }
    match std::env::var("EKM_TOKEN") {
        Ok(token) if !token.trim().is_empty() => Ok(Zeroizing::new(token.trim().to_owned())),
        _ => anyhow::bail!(
            "no token: set EKM_TOKEN, or pass --token-file FILE (--token works too, but \
             other users of the machine can read it)"
        ),
    }
}

/// An HTTP(S) client: rustls with the bundled public roots, plus `--ca-file` if given.
fn http_client(client: &ClientArgs) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder().use_rustls_tls();
    if let Some(path) = &client.ca_file {
        let pem = std::fs::read(path)
            .with_context(|| format!("cannot read --ca-file {}", path.display()))?;
        let certificates = reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("--ca-file {}: not PEM certificates", path.display()))?;
        if certificates.is_empty() {
            anyhow::bail!("--ca-file {}: no certificate in the file", path.display());
        }
        for certificate in certificates {
            builder = builder.add_root_certificate(certificate);
        }
    }
    builder.build().context("cannot build the HTTP client")
}

/// The master key answer in a few lines.
fn summary(answer: &Value) -> String {
    let field = |name: &str| match &answer[name] {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut lines = vec![
        format!("organization  {}", field("org_id")),
        format!("provider      {}", field("provider")),
        format!("key           {}", field("key_id")),
        format!("tier          {}", field("tier")),
        format!("status        {}", field("status")),
    ];
    if !answer["reason"].is_null() {
        lines.push(format!("reason        {}", field("reason")));
    }
    if let Some(check) = answer["last_check"].as_object() {
        lines.push(format!(
            "last check    {} ({})",
            check.get("at").and_then(Value::as_str).unwrap_or("-"),
            if check.get("ok").and_then(Value::as_bool) == Some(true) {
                "ok"
            } else {
                "failed"
            }
        ));
    }
    lines.join("\n")
}

/// `ekm scope …`: the scope endpoints, printed as short lines (or the JSON with `--json`).
pub async fn scope(command: crate::cli::ScopeCommand) -> anyhow::Result<ExitCode> {
    use crate::cli::ScopeCommand as C;
    let post = reqwest::Method::POST;
    let (client, answer, shape) = match &command {
        C::Create {
            client,
            kind,
            name,
            parent,
        } => {
            let body = json!({"kind": kind, "name": name, "parent_id": parent});
            let answer = request(client, post, "/v1/scopes", Some(body)).await?;
            (client, answer, Print::Scope)
        }
        C::Show { client, id } => {
            let path = format!("/v1/scopes/{}", encode(id));
            (
                client,
                request(client, reqwest::Method::GET, &path, None).await?,
                Print::Scope,
            )
        }
        C::List { client, id } => {
            let answer = children(client, id).await?;
            (client, answer, Print::List)
        }
        C::Tree { client, id } => {
            let path = format!("/v1/scopes/{}", encode(id));
            let answer = match request(client, reqwest::Method::GET, &path, None).await? {
                Ok(root) => tree(client, root).await?,
                refused => refused,
            };
            (client, answer, Print::Tree)
        }
        C::Pause { client, id, reason } => {
            let path = format!("/v1/scopes/{}/pause", encode(id));
            let answer = request(client, post, &path, Some(json!({"reason": reason}))).await?;
            (client, answer, Print::Scope)
        }
        C::Resume { client, id, reason } => {
            let path = format!("/v1/scopes/{}/resume", encode(id));
            let body = match reason {
                Some(reason) => json!({"reason": reason}),
                None => json!({}),
            };
            (
                client,
                request(client, post, &path, Some(body)).await?,
                Print::Scope,
            )
        }
        C::Revoke {
            client,
            id,
            reason,
            confirm,
            after,
            immediately,
            dry_run,
        } => {
            let mut path = format!("/v1/scopes/{}/revoke", encode(id));
            if *dry_run {
                path.push_str("?dry_run=true");
            }
            let mut body = json!({"reason": reason, "confirm": confirm});
            if let Some(after) = after {
                body["after"] = json!(after);
            }
            if *immediately {
                body["immediately"] = json!(true);
            }
            let shape = if *dry_run { Print::Raw } else { Print::Scope };
            (
                client,
                request(client, post, &path, Some(body)).await?,
                shape,
            )
        }
        C::CancelRevocation { client, id, reason } => {
            let path = format!("/v1/scopes/{}/cancel-revocation", encode(id));
            let body = json!({"reason": reason});
            (
                client,
                request(client, post, &path, Some(body)).await?,
                Print::Scope,
            )
        }
        C::Rotate { client, id } => {
            let path = format!("/v1/scopes/{}/rotate", encode(id));
            (
                client,
                request(client, post, &path, Some(json!({}))).await?,
                Print::Scope,
            )
        }
        C::MinDecryptionVersion {
            client,
            id,
            version,
        } => {
            let path = format!("/v1/scopes/{}/min-decryption-version", encode(id));
            let body = json!({"version": version});
            (
                client,
                request(client, reqwest::Method::PUT, &path, Some(body)).await?,
                Print::Scope,
            )
        }
        C::KeyVersions { client, id } => {
            let path = format!("/v1/scopes/{}/key-versions", encode(id));
            (
                client,
                request(client, reqwest::Method::GET, &path, None).await?,
                Print::KeyVersions,
            )
        }
        C::Retire { client, id, below } => {
            let path = format!("/v1/scopes/{}/retire", encode(id));
            let body = json!({"below": below});
            (
                client,
                request(client, post, &path, Some(body)).await?,
                Print::Scope,
            )
        }
        C::State {
            client,
            id,
            at,
            position,
        } => {
            let query = match (at, position) {
                (Some(at), _) => format!("at={}", encode(at)),
                (None, Some(position)) => format!("position={position}"),
                (None, None) => anyhow::bail!("give --at or --position"),
            };
            let path = format!("/v1/scopes/{}/state?{query}", encode(id));
            (
                client,
                request(client, reqwest::Method::GET, &path, None).await?,
                Print::Scope,
            )
        }
        C::AccessAt { client, id, at } => {
            let path = format!("/v1/scopes/{}/access-at?at={}", encode(id), encode(at));
            (
                client,
                request(client, reqwest::Method::GET, &path, None).await?,
                Print::AccessAt,
            )
        }
    };
    let answer = match answer {
        Ok(answer) => answer,
        Err(problem) => {
            return refused(&problem);
        }
    };
    let mut out = std::io::stdout().lock();
    if client.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&answer)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    match shape {
        Print::Raw => writeln!(out, "{}", serde_json::to_string_pretty(&answer)?)?,
        Print::KeyVersions => {
            writeln!(
                out,
                "decryption floor {}",
                text(&answer["min_decryption_version"])
            )?;
            for v in answer["items"].as_array().into_iter().flatten() {
                let current = if v["current"] == Value::Bool(true) {
                    "  current"
                } else {
                    ""
                };
                writeln!(
                    out,
                    "{}  {}{current}  last used {}  decrypts (30 days) {}",
                    text(&v["version"]),
                    text(&v["state"]),
                    text(&v["last_used_at"]),
                    text(&v["decrypts_30d"]),
                )?;
            }
        }
        Print::Scope => writeln!(out, "{}", scope_lines(&answer))?,
        Print::List => {
            for item in answer.as_array().into_iter().flatten() {
                writeln!(out, "{}", scope_line(item))?;
            }
        }
        Print::Tree => print_tree(&mut out, &answer, 0)?,
        Print::AccessAt => {
            writeln!(
                out,
                "effective state  {}{}",
                text(&answer["effective_state"]),
                cause_text(&answer)
            )?;
            for p in answer["principals"].as_array().into_iter().flatten() {
                let tokens: Vec<String> = p["tokens"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|t| text(&t["token_id"]))
                    .collect();
                writeln!(
                    out,
                    "{}  {} on {}  tokens: {}",
                    text(&p["principal"]),
                    text(&p["permission"]),
                    text(&p["granted_on"]),
                    if tokens.is_empty() {
                        "none valid".to_owned()
                    } else {
                        tokens.join(", ")
                    }
                )?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

enum Print {
    Raw,
    KeyVersions,
    Scope,
    List,
    Tree,
    AccessAt,
}

/// Percent-encodes a path segment or a query value (ids and cursors pass unchanged).
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One request: the answer, or the server's problem document.
async fn request(
    client: &ClientArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Answer {
    let token = bearer_token(client)?;
    let url = format!("{}{path}", client.url.trim_end_matches('/'));
    let mut request = http_client(client)?
        .request(method, &url)
        .bearer_auth(token.as_str());
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("cannot reach {}", client.url))?;
    let status = response.status();
    let answer: Value = response
        .json()
        .await
        .with_context(|| format!("{url} answered {status} without JSON"))?;
    Ok(if status.is_success() {
        Ok(answer)
    } else {
        Err(answer)
    })
}

/// A refusal: the server's problem document on standard error, exit 1.
fn refused(problem: &Value) -> anyhow::Result<ExitCode> {
    writeln!(
        std::io::stderr().lock(),
        "{}",
        serde_json::to_string_pretty(problem)?
    )?;
    Ok(ExitCode::FAILURE)
}

/// An answer, or the server's problem document.
type Answer = anyhow::Result<Result<Value, Value>>;

/// Every item of a list, following the cursors: `path` holds its query (`?limit=…`).
async fn every_page(client: &ClientArgs, path: &str) -> Answer {
    let mut items = vec![];
    let mut cursor: Option<String> = None;
    loop {
        let page_path = match &cursor {
            Some(cursor) => format!("{path}&cursor={}", encode(cursor)),
            None => path.to_owned(),
        };
        let page = match request(client, reqwest::Method::GET, &page_path, None).await? {
            Ok(page) => page,
            refused => return Ok(refused),
        };
        items.extend(page["items"].as_array().cloned().unwrap_or_default());
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return Ok(Ok(Value::Array(items))),
        }
    }
}

/// Every child of `id`.
async fn children(client: &ClientArgs, id: &str) -> Answer {
    every_page(
        client,
        &format!("/v1/scopes/{}/children?limit=500", encode(id)),
    )
    .await
}

/// `root` with its subtree under `"children"`, depth first.
fn tree(
    client: &ClientArgs,
    mut root: Value,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Answer> + '_>> {
    Box::pin(async move {
        let id = text(&root["id"]);
        let kids = match children(client, &id).await? {
            Ok(Value::Array(kids)) => kids,
            Ok(_) => vec![],
            refused => return Ok(refused),
        };
        let mut built = vec![];
        for kid in kids {
            match tree(client, kid).await? {
                Ok(kid) => built.push(kid),
                refused => return Ok(refused),
            }
        }
        root["children"] = Value::Array(built);
        Ok(Ok(root))
    })
}

fn print_tree(out: &mut impl Write, node: &Value, depth: usize) -> std::io::Result<()> {
    writeln!(out, "{}{}", "  ".repeat(depth), scope_line(node))?;
    for kid in node["children"].as_array().into_iter().flatten() {
        print_tree(out, kid, depth + 1)?;
    }
    Ok(())
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn scope_line(scope: &Value) -> String {
    format!(
        "{}  {:<13} {:<8} {}",
        text(&scope["id"]),
        text(&scope["kind"]),
        text(&scope["effective_state"]),
        text(&scope["name"])
    )
}

fn cause_text(scope: &Value) -> String {
    match &scope["cause"] {
        Value::Null => String::new(),
        cause => format!(
            " (by {} {}{}{})",
            text(&cause["scope_kind"]),
            text(&cause["scope_id"]),
            match &cause["reason"] {
                Value::String(reason) => format!(": {reason}"),
                _ => String::new(),
            },
            match &cause["due_at"] {
                Value::String(due) => format!("; revoked at {due} unless cancelled"),
                _ => String::new(),
            }
        ),
    }
}

fn scope_lines(scope: &Value) -> String {
    let versions: Vec<String> = scope["key_versions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| {
            let floor = scope["min_decryption_version"].as_u64().unwrap_or(1);
            let state = if v["retired"] == Value::Bool(true) {
                " (retired)"
            } else if v["version"].as_u64().is_some_and(|n| n < floor) {
                // Below the decryption floor: decrypts nothing until the floor is lowered.
                " (disabled)"
            } else {
                ""
            };
            format!("{}{state}", text(&v["version"]))
        })
        .collect();
    let mut lines = vec![
        format!("id               {}", text(&scope["id"])),
        format!("kind             {}", text(&scope["kind"])),
        format!("name             {}", text(&scope["name"])),
        format!("own state        {}", text(&scope["own_state"])),
        format!(
            "effective state  {}{}",
            text(&scope["effective_state"]),
            cause_text(scope)
        ),
        format!("version          {}", text(&scope["version"])),
        format!("key versions     {}", versions.join(", ")),
    ];
    if let Some(floor) = scope["min_decryption_version"].as_u64().filter(|f| *f > 1) {
        lines.push(format!("decryption floor {floor}"));
    }
    if let Value::Bool(changed) = scope["changed"] {
        lines.push(format!("changed          {changed}"));
    }
    if let Value::Object(as_of) = &scope["as_of"] {
        lines.push(format!(
            "as of            position {}, {}",
            text(&as_of["position"]),
            text(&as_of["at"])
        ));
    }
    lines.join("\n")
}

/// `ekm audit query`: every page of `GET /v1/audit` with the filters given.
pub async fn audit_query(args: crate::cli::AuditQueryArgs) -> anyhow::Result<ExitCode> {
    let mut filters = String::new();
    for (name, value) in [
        ("org", &args.org),
        ("scope", &args.scope),
        ("actor", &args.actor),
        ("action", &args.action),
        ("from", &args.from),
        ("to", &args.to),
    ] {
        if let Some(value) = value {
            filters.push_str(&format!("&{name}={}", encode(value)));
        }
    }
    let path = format!("/v1/audit?limit=500{filters}");
    let entries = match every_page(&args.client, &path).await? {
        Ok(Value::Array(entries)) => entries,
        Ok(_) => vec![],
        Err(problem) => return refused(&problem),
    };
    let mut out = std::io::stdout().lock();
    if args.client.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&entries)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    for e in &entries {
        let reason = match &e["reason"] {
            Value::String(reason) => format!(" ({reason})"),
            _ => String::new(),
        };
        writeln!(
            out,
            "{:>20}  {}  {:<20} {:<28} {}{reason}",
            text(&e["position"]),
            text(&e["recorded_at"]),
            text(&e["action"]),
            text(&e["actor"]),
            text(&e["summary"]),
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
