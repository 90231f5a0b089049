//! `ekm`: the one binary. `main` only parses the command line and hands over; the wiring
//! lives in `serve`, configuration in `cli`, logging in `telemetry`.

mod cli;
mod client;
mod doctor;
mod duration;
mod jobs;
mod listener;
mod operator_token;
mod progress;
mod serve;
mod telemetry;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Completions { shell } = cli.command {
        // Generated from the same definitions that parse the command line.
        let mut command = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut command, "ekm", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    telemetry::init(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(error = %error, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve::serve(*args).await.map(|()| ExitCode::SUCCESS),
            Command::Migrate(args) => serve::migrate(args).await.map(|()| ExitCode::SUCCESS),
            Command::Projections(command) => jobs::projections(command).await,
            Command::Audit(command) => jobs::audit(command).await,
            Command::Org(command) => client::org(command).await,
            Command::Token(command) => client::token(command).await,
            Command::Grant(command) => client::grant(command).await,
            Command::Scope(command) => client::scope(command).await,
            Command::MasterKey(command) => jobs::master_key(command).await,
            Command::OperatorToken(command) => operator_token::operator_token(command).await,
            Command::Doctor(args) => doctor::doctor(args).await,
            Command::Completions { .. } => Ok(ExitCode::SUCCESS),
        }
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}
