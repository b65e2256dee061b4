//! The command line of `sync-engine`: `check-config`, `sign` and `--help`.

use std::path::Path;

use tests::{sync_engine, text, with_default_secrets, TEST_SECRET};

fn check_config_with(file: Option<&Path>, extra_env: &[(&str, &str)]) -> (bool, String, String) {
    let mut command = sync_engine();
    with_default_secrets(&mut command).arg("check-config");
    if let Some(file) = file {
        command.arg("--config").arg(file);
    }
    for (k, v) in extra_env {
        command.env(k, v);
    }
    let output = command.output().expect("run sync-engine");
    let (stdout, stderr) = text(&output);
    (output.status.success(), stdout, stderr)
}

fn temp_config(text: &str) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), text).expect("write config");
    file
}

#[test]
fn check_config_passes_on_the_repository_config() {
    let (ok, stdout, stderr) = check_config_with(Some(Path::new("config.toml")), &[]);
    assert!(ok, "stderr: {stderr}");
    assert!(stdout.contains("[targets.payload]"), "{stdout}");
    assert!(
        stdout.contains("PAYLOAD_WEBHOOK_SECRET = [redacted]"),
        "{stdout}"
    );
    assert!(!stdout.contains(TEST_SECRET) && !stderr.contains(TEST_SECRET));
}

#[test]
fn check_config_names_an_unknown_key() {
    let file = temp_config("[nats]\nstreem = \"X\"\n");
    let (ok, _, stderr) = check_config_with(Some(file.path()), &[]);
    assert!(!ok);
    assert!(stderr.contains("`nats.streem`"), "{stderr}");
}

#[test]
fn check_config_names_a_bad_duration() {
    let file = temp_config("[targets.payload]\ntimeout = \"10 parsecs\"\n");
    let (ok, _, stderr) = check_config_with(Some(file.path()), &[]);
    assert!(!ok);
    assert!(stderr.contains("`targets.payload.timeout`"), "{stderr}");
    assert!(stderr.contains("10 parsecs"), "{stderr}");
}

#[test]
fn check_config_names_a_bad_signing_scheme() {
    let file = temp_config("[targets.better_auth]\nsigning = \"md5\"\n");
    let (ok, _, stderr) = check_config_with(Some(file.path()), &[]);
    assert!(!ok);
    assert!(stderr.contains("`targets.better_auth.signing`"), "{stderr}");
    assert!(stderr.contains("md5"), "{stderr}");
}

#[test]
fn check_config_names_an_unset_secret_variable() {
    let file = temp_config("[targets.payload]\nsecret_env = \"SYNC_TEST_SURELY_UNSET\"\n");
    let (ok, _, stderr) = check_config_with(Some(file.path()), &[]);
    assert!(!ok);
    assert!(stderr.contains("`targets.payload.secret_env`"), "{stderr}");
    assert!(stderr.contains("SYNC_TEST_SURELY_UNSET"), "{stderr}");
}

#[test]
fn env_override_changes_the_effective_value() {
    let (ok, stdout, stderr) = check_config_with(
        Some(Path::new("config.toml")),
        &[("SYNC_ENGINE__TARGETS__PAYLOAD__MAX_CONCURRENCY", "17")],
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("max_concurrency = 17"), "{stdout}");
}

#[test]
fn explicit_missing_config_file_fails() {
    let (ok, _, stderr) = check_config_with(Some(Path::new("/nonexistent/config.toml")), &[]);
    assert!(!ok);
    assert!(stderr.contains("/nonexistent/config.toml"), "{stderr}");
}

#[test]
fn sign_prints_the_headers_of_a_delivery() {
    let body = temp_config(
        r#"{"id":"evt_1","origin":"better-auth","type":"user.updated","timestamp":1,"data":{"id":"u1"}}"#,
    );
    let output = sync_engine()
        .env("SIGN_TEST_SECRET", TEST_SECRET)
        .args([
            "sign",
            "--secret-env",
            "SIGN_TEST_SECRET",
            "--id",
            "evt_1",
            "--timestamp",
            "1700000000",
        ])
        .arg(body.path())
        .output()
        .expect("run sign");
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stderr}");
    let body = std::fs::read(body.path()).expect("body");
    let keyring = protocol::signing::Keyring::parse(
        protocol::signing::SigningScheme::StandardWebhooks,
        &protocol::Secret::new(TEST_SECRET),
    )
    .expect("secret");
    let expected = keyring.sign_standard("evt_1", 1_700_000_000, &body);
    for line in [
        "webhook-id: evt_1".to_string(),
        "webhook-timestamp: 1700000000".to_string(),
        format!("webhook-signature: {expected}"),
        "x-webhook-timestamp: 1700000000000".to_string(),
        "x-webhook-origin: better-auth".to_string(),
        "x-webhook-event: user.updated".to_string(),
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "missing {line:?} in:\n{stdout}"
        );
    }
    assert!(!stdout.contains(TEST_SECRET));
}

#[test]
fn sign_refuses_an_unset_secret_variable() {
    let output = sync_engine()
        .args([
            "sign",
            "--secret-env",
            "SIGN_TEST_UNSET",
            "--id",
            "e1",
            "Cargo.toml",
        ])
        .output()
        .expect("run sign");
    assert!(!output.status.success());
    assert!(text(&output).1.contains("SIGN_TEST_UNSET"));
}

#[test]
fn every_command_has_help() {
    for command in [
        vec!["--help"],
        vec!["run", "--help"],
        vec!["check-config", "--help"],
        vec!["sign", "--help"],
        vec!["backfill", "--help"],
        vec!["reconcile", "--help"],
    ] {
        let output = sync_engine().args(&command).output().expect("run help");
        let (stdout, _) = text(&output);
        assert!(output.status.success(), "{command:?}");
        assert!(stdout.contains("Usage:"), "{command:?}: {stdout}");
    }
}
