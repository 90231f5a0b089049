//! `ekm operator-token rotate`: replaces the platform operator's token, working on the
//! database directly (no server needed). SQLite: the data-directory lock makes it wait for
//! no one and refuses beside a running server. PostgreSQL: runs beside live servers, which
//! refuse the old token within their token cache's bound (one second, ADR 0007).

use std::io::Write;
use std::process::ExitCode;

use ekm_store::{Tokens, OPERATOR_TOKEN_FILE};
use serde_json::json;

use crate::cli::{OperatorTokenCommand, RotateOperatorTokenArgs};
use crate::serve::{open, prepare_data_dir};

pub async fn operator_token(command: OperatorTokenCommand) -> anyhow::Result<ExitCode> {
    match command {
        OperatorTokenCommand::Rotate(args) => rotate(args).await,
    }
}

async fn rotate(args: RotateOperatorTokenArgs) -> anyhow::Result<ExitCode> {
    let (config, _lock) = prepare_data_dir(&args.db)?;
    let db = open(&config).await?;
    let rotated = Tokens::new(db.clone())
        .rotate_operator_token(&args.db.data_dir)
        .await
        .map_err(|e| anyhow::anyhow!(ekm_projections::error_chain(&e)));
    db.close().await;
    let rotated = rotated?;
    let path = args.db.data_dir.join(OPERATOR_TOKEN_FILE);
    // Ids and the path, never the token.
    tracing::info!(
        token_id = %rotated.token.id,
        revoked = ?rotated.revoked,
        path = %path.display(),
        "operator token rotated (mode 0600); the old one is refused"
    );
    let mut answer = json!({
        "token_id": rotated.token.id,
        "revoked": rotated.revoked,
        "file": path.display().to_string(),
    });
    if args.print {
        answer["token"] = json!(rotated.token.secret);
    }
    writeln!(std::io::stdout().lock(), "{answer:#}")?;
    Ok(ExitCode::SUCCESS)
}
