use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::*;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn env_with_secrets() -> HashMap<String, String> {
    [
        ("PAYLOAD_WEBHOOK_SECRET", SECRET),
        ("BETTER_AUTH_WEBHOOK_SECRET", SECRET),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn write(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(&path, text).expect("write temp config");
    path
}

fn load_text(text: &str) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().expect("tempdir");
    Config::load(Some(&write(dir.path(), text)), Vec::new())
}

#[test]
fn defaults_parse_and_validate() {
    let config = Config::defaults().expect("defaults parse");
    let env = env_with_secrets();
    config
        .validate(|k| env.get(k).cloned())
        .expect("defaults validate");
    assert_eq!(config.engine.user_idle_timeout, Duration::from_secs(300));
    assert_eq!(config.dedup.ttl, Duration::from_secs(48 * 3600));
    assert_eq!(config.targets.payload.fields["name"], "fullName");
}

/// Every key of the shared reference exists in our defaults, with the same value, and the
/// reference file itself loads.
#[test]
fn reference_keys_are_all_supported() {
    let reference_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/config/reference.toml");
    let reference_text = std::fs::read_to_string(&reference_path).unwrap_or_else(|e| {
        panic!(
            "{} must exist (a copy of the shared config reference): {e}",
            reference_path.display()
        )
    });
    let reference: toml::Table = toml::from_str(&reference_text).expect("reference parses");
    let ours: toml::Table = toml::from_str(DEFAULTS_TOML).expect("defaults parse");
    fn walk(prefix: &str, reference: &toml::Table, ours: &toml::Table) {
        for (key, value) in reference {
            let path = format!("{prefix}{key}");
            let Some(mine) = ours.get(key) else {
                panic!("config.toml lacks reference key {path}");
            };
            match (value, mine) {
                (toml::Value::Table(r), toml::Value::Table(o)) => walk(&format!("{path}."), r, o),
                _ => assert_eq!(value, mine, "default of {path} differs from the reference"),
            }
        }
    }
    walk("", &reference, &ours);
    Config::load(Some(&reference_path), Vec::new()).expect("reference loads");
}

#[test]
fn unknown_key_is_named() {
    let error = load_text("[engine]\nmax_in_flite = 3\n").expect_err("unknown key");
    assert_eq!(error.keys(), vec!["engine.max_in_flite".to_string()]);
    assert!(error.to_string().contains("engine.max_in_flite"), "{error}");
}

#[test]
fn bad_duration_is_named() {
    let error =
        load_text("[targets.payload]\ntimeout = \"10 parsecs\"\n").expect_err("bad duration");
    assert_eq!(error.keys(), vec!["targets.payload.timeout".to_string()]);
    assert!(error.to_string().contains("10 parsecs"), "{error}");
}

#[test]
fn bad_signing_is_named() {
    let error = load_text("[targets.better_auth]\nsigning = \"md5\"\n").expect_err("bad scheme");
    assert_eq!(
        error.keys(),
        vec!["targets.better_auth.signing".to_string()]
    );
    assert!(error.to_string().contains("md5"), "{error}");
}

#[test]
fn unset_secret_env_is_named() {
    let config = load_text("[targets.payload]\nsecret_env = \"NOPE_NOT_SET\"\n").expect("parses");
    let env = env_with_secrets();
    let error = config
        .validate(|k| env.get(k).cloned())
        .expect_err("unset secret");
    assert_eq!(error.keys(), vec!["targets.payload.secret_env".to_string()]);
    assert!(error.to_string().contains("NOPE_NOT_SET"), "{error}");
}

#[test]
fn malformed_secret_is_refused_without_showing_it() {
    let config = Config::defaults().expect("defaults");
    let mut env = env_with_secrets();
    env.insert(
        "PAYLOAD_WEBHOOK_SECRET".into(),
        "not-a-whsec-secret-xyz".into(),
    );
    let error = config
        .validate(|k| env.get(k).cloned())
        .expect_err("bad secret");
    assert_eq!(error.keys(), vec!["targets.payload.secret_env".to_string()]);
    assert!(
        !error.to_string().contains("not-a-whsec-secret-xyz"),
        "{error}"
    );
}

#[test]
fn env_overrides_change_values() {
    let config = Config::load(
        None,
        vec![
            (
                "SYNC_ENGINE__NATS__URL".to_string(),
                "nats://10.1.2.3:4222".to_string(),
            ),
            (
                "SYNC_ENGINE__TARGETS__PAYLOAD__RETRY__MAX_ATTEMPTS".to_string(),
                "3".to_string(),
            ),
            (
                "SYNC_ENGINE__ENGINE__CLOCK_SKEW".to_string(),
                "2s".to_string(),
            ),
            (
                "SYNC_ENGINE__TARGETS__BETTER_AUTH__ENABLED".to_string(),
                "false".to_string(),
            ),
            ("UNRELATED".to_string(), "x".to_string()),
        ],
    )
    .expect("overrides load");
    assert_eq!(config.nats.url, "nats://10.1.2.3:4222");
    assert_eq!(config.targets.payload.retry.max_attempts, 3);
    assert_eq!(config.engine.clock_skew, Duration::from_secs(2));
    assert!(!config.targets.better_auth.enabled);
}

#[test]
fn env_override_of_unknown_key_is_named() {
    let error = Config::load(
        None,
        vec![("SYNC_ENGINE__NATS__URLL".to_string(), "x".to_string())],
    )
    .expect_err("unknown override");
    assert_eq!(error.keys(), vec!["nats.urll".to_string()]);
}

#[test]
fn cross_field_rules() {
    let env = env_with_secrets();
    let cases = [
        (
            "[targets.payload.retry]\njitter = 1.5\n",
            "targets.payload.retry.jitter",
        ),
        (
            "[targets.payload.retry]\nmultiplier = 0.5\n",
            "targets.payload.retry.multiplier",
        ),
        (
            "[targets.payload.retry]\nmax_attempts = 0\n",
            "targets.payload.retry.max_attempts",
        ),
        (
            "[targets.better_auth]\nurl = \"ftp://x\"\n",
            "targets.better_auth.url",
        ),
        ("[store]\nurl = \"mysql://x\"\n", "store.url"),
        ("[engine]\nmax_in_flight = 0\n", "engine.max_in_flight"),
        ("[log]\nlevel = \"loud\"\n", "log.level"),
        ("[cluster]\nlease_ttl = \"1s\"\n", "cluster.lease_ttl"),
        ("[cluster]\npartitions = 16\n", "cluster.partitions"),
        (
            "[cluster]\npartitions = 2000\n[store]\nurl = \"postgres://h/db\"\n",
            "cluster.partitions",
        ),
        (
            "[cluster]\npartitions = 16\n[store]\nurl = \"postgres://h/db\"\n\
             [nats]\nbetter_auth_subjects = [\"user.created\", \"user.updated\"]\n",
            "nats.better_auth_subjects",
        ),
    ];
    for (text, key) in cases {
        let config = load_text(text).expect("parses");
        let error = config.validate(|k| env.get(k).cloned()).expect_err(text);
        assert_eq!(error.keys(), vec![key.to_string()], "{text}");
    }
}

#[test]
fn missing_file_is_an_error_naming_it() {
    let error =
        Config::load(Some(Path::new("/nonexistent/sync.toml")), Vec::new()).expect_err("missing");
    assert!(error.to_string().contains("/nonexistent/sync.toml"));
}

#[test]
fn an_idle_state_cache_past_a_tebibyte_is_named() {
    let config = load_text("[engine]\nidle_state_cache_mb = 2000000\n").expect("parses");
    let env = env_with_secrets();
    let error = config
        .validate(|k| env.get(k).cloned())
        .expect_err("too large");
    assert_eq!(error.keys(), vec!["engine.idle_state_cache_mb".to_string()]);
    let off = load_text("[engine]\nidle_state_cache_mb = 0\n").expect("parses");
    off.validate(|k| env.get(k).cloned())
        .expect("0 turns it off");
}
