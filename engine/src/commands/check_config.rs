//! `sync-engine check-config`: validate and print the effective configuration.

use std::process::ExitCode;

use crate::cli::ConfigArg;
use crate::config::{Config, NatsAuth};

use super::{config_path, load_config};

pub fn run(args: &ConfigArg) -> anyhow::Result<ExitCode> {
    let source = config_path(args)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "built-in defaults".to_string());
    match load_config(args) {
        Ok((config, secrets)) => {
            println!("# effective configuration ({source} + environment overrides)");
            print!("{}", config.to_toml());
            println!();
            println!("# secrets (values never shown)");
            print_secrets(&config, &secrets);
            eprintln!("configuration OK");
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => {
            eprintln!("error: {error}");
            eprintln!("configuration INVALID ({source})");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn print_secrets(config: &Config, secrets: &crate::config::Secrets) {
    let line = |key: &str, var: &str, keyring: Option<&protocol::signing::Keyring>| match keyring {
        Some(k) => println!("# {key}: {var} = [redacted] ({} active)", k.len()),
        None => println!("# {key}: {var} (not used: disabled)"),
    };
    line(
        "targets.payload.secret_env",
        &config.targets.payload.secret_env,
        secrets.payload.as_ref(),
    );
    line(
        "targets.better_auth.secret_env",
        &config.targets.better_auth.secret_env,
        secrets.better_auth.as_ref(),
    );
    line(
        "ingest.better_auth_secret_env",
        &config.ingest.better_auth_secret_env,
        secrets.ingest_better_auth.as_ref(),
    );
    line(
        "ingest.payload_secret_env",
        &config.ingest.payload_secret_env,
        secrets.ingest_payload.as_ref(),
    );
    let nats = match &secrets.nats {
        NatsAuth::None => "none".to_string(),
        NatsAuth::UserPassword { user, .. } => format!(
            "user {user}, password from {} = [redacted]",
            config.nats.password_env.as_deref().unwrap_or_default()
        ),
        NatsAuth::Token(_) => format!(
            "token from {} = [redacted]",
            config.nats.token_env.as_deref().unwrap_or_default()
        ),
        NatsAuth::NKey(_) => format!(
            "NKey seed from {} = [redacted]",
            config.nats.nkey_seed_file.as_deref().unwrap_or_default()
        ),
        NatsAuth::Creds(path) => format!("credentials file {path}"),
    };
    println!("# nats authentication: {nats}");
    if secrets.redis_password.is_some() {
        println!(
            "# dedup.redis_password_env: {} = [redacted]",
            config
                .dedup
                .redis_password_env
                .as_deref()
                .unwrap_or_default()
        );
    }
}
