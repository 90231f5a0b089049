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
        GrantCommand::Add(args) => {
            let mut body = json!({"principal": args.principal, "permission": args.permission});
            if let Some(scope) = args.scope {
                body["scope_id"] = json!(scope);
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
    let text = serde_json::to_string_pretty(&answer)?;
    if !status.is_success() {
        let mut stderr = std::io::stderr().lock();
        writeln!(stderr, "{text}")?;
        return Ok(ExitCode::FAILURE);
    }
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
