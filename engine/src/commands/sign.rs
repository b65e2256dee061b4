//! `sync-engine sign`: the headers a delivery of a file would carry.

use std::io::Read;
use std::process::ExitCode;

use anyhow::Context;
use protocol::signing::{Keyring, SigningScheme};
use protocol::Secret;

use crate::cli::SignArgs;

pub fn run(args: &SignArgs) -> anyhow::Result<ExitCode> {
    let scheme = match args.signing.as_str() {
        "standard-webhooks" => SigningScheme::StandardWebhooks,
        "hmac-sha256-hex" => SigningScheme::HmacSha256Hex,
        other => {
            anyhow::bail!("--signing {other:?}: expected standard-webhooks or hmac-sha256-hex")
        }
    };
    if !protocol::envelope::is_valid_event_id(&args.id) {
        anyhow::bail!(
            "--id {:?}: 1-128 characters of A-Za-z0-9_:- (no dots)",
            args.id
        );
    }
    let value = std::env::var(&args.secret_env).map_err(|_| {
        anyhow::anyhow!(
            "--secret-env: environment variable {} is not set",
            args.secret_env
        )
    })?;
    let keyring = Keyring::parse(scheme, &Secret::new(value)).map_err(|error| {
        anyhow::anyhow!(
            "--secret-env: the secret in {} is not usable: {error}",
            args.secret_env
        )
    })?;
    let body = if args.file.as_os_str() == "-" {
        let mut body = Vec::new();
        std::io::stdin()
            .read_to_end(&mut body)
            .context("reading standard input")?;
        body
    } else {
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?
    };
    let now_ms = match args.timestamp {
        Some(secs) => secs.saturating_mul(1000),
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0),
    };
    let (event_type, origin) = describe_body(&body);
    let mut headers = protocol::delivery::headers(
        &keyring,
        &args.id,
        origin.other(),
        event_type,
        &body,
        now_ms,
    );
    // Without a parseable body the event and origin headers would be guesses; leave them out.
    if serde_json::from_slice::<protocol::Envelope>(&body).is_err() {
        headers.retain(|(name, _)| *name != "x-webhook-origin" && *name != "x-webhook-event");
    }
    for (name, value) in headers {
        println!("{name}: {value}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The type and origin the body declares, for the `x-webhook-*` headers.
fn describe_body(body: &[u8]) -> (protocol::EventType, protocol::Origin) {
    match serde_json::from_slice::<protocol::Envelope>(body) {
        Ok(envelope) => (envelope.event_type, envelope.origin),
        Err(_) => (protocol::EventType::Updated, protocol::Origin::BetterAuth),
    }
}
