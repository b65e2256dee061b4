//! Files and secrets the configuration names, checked when it is validated, so that a missing
//! CA or an unset password is an error naming its key before any connection is tried.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::{set, ConfigError, DedupConfig, NatsConfig, TlsFiles};
use protocol::Secret;

fn invalid(key: &str, message: String) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message,
    }
}

/// The certificates of a PEM file; an error when it is missing, unreadable or holds none.
pub fn certificates(key: &str, path: &str) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let bytes = std::fs::read(path)
        .map_err(|error| invalid(key, format!("cannot read {path}: {error}")))?;
    let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|error| invalid(key, format!("{path} is not valid PEM: {error}")))?;
    if certificates.is_empty() {
        return Err(invalid(
            key,
            format!("{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"),
        ));
    }
    Ok(certificates)
}

/// Checks that a PEM file holds a private key.
pub fn private_key(key: &str, path: &str) -> Result<(), ConfigError> {
    let bytes = std::fs::read(path)
        .map_err(|error| invalid(key, format!("cannot read {path}: {error}")))?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map(|_| ())
        .map_err(|error| {
            invalid(
                key,
                format!("{path} holds no usable PEM private key: {error}"),
            )
        })
}

/// A CA file, when set, holds certificates; a client certificate comes with its key.
pub fn check_tls(prefix: &str, files: TlsFiles<'_>) -> Result<(), ConfigError> {
    if let Some(path) = files.ca_file {
        certificates(&format!("{prefix}ca_file"), path)?;
    }
    match (files.client_cert_file, files.client_key_file) {
        (None, None) => Ok(()),
        (Some(cert), Some(key)) => {
            certificates(&format!("{prefix}client_cert_file"), cert)?;
            private_key(&format!("{prefix}client_key_file"), key)
        }
        (Some(_), None) => Err(invalid(
            &format!("{prefix}client_key_file"),
            "must be set with client_cert_file".into(),
        )),
        (None, Some(_)) => Err(invalid(
            &format!("{prefix}client_cert_file"),
            "must be set with client_key_file".into(),
        )),
    }
}

/// A secret from the environment variable `var`, which must be set and not empty.
pub fn secret_from_env(
    key: &str,
    var: &str,
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<Secret, ConfigError> {
    lookup(var)
        .filter(|v| !v.trim().is_empty())
        .map(Secret::new)
        .ok_or_else(|| invalid(key, format!("environment variable {var} is not set")))
}

/// How the engine proves itself to NATS.
#[derive(Debug, Clone, PartialEq)]
pub enum NatsAuth {
    None,
    UserPassword {
        user: String,
        password: Secret,
    },
    Token(Secret),
    /// The seed read from `nats.nkey_seed_file`.
    NKey(Secret),
    /// The path of `nats.creds_file` (read again by the client on every connect).
    Creds(String),
}

impl NatsConfig {
    /// The one authentication method the configuration names, with its secret resolved.
    pub fn auth(&self, lookup: &impl Fn(&str) -> Option<String>) -> Result<NatsAuth, ConfigError> {
        let named: Vec<&str> = [
            ("nats.user", set(&self.user).is_some()),
            ("nats.token_env", set(&self.token_env).is_some()),
            ("nats.nkey_seed_file", set(&self.nkey_seed_file).is_some()),
            ("nats.creds_file", set(&self.creds_file).is_some()),
        ]
        .into_iter()
        .filter_map(|(key, on)| on.then_some(key))
        .collect();
        if named.len() > 1 {
            return Err(invalid(
                named[1],
                format!(
                    "only one NATS authentication method at a time; {} is set too",
                    named[0]
                ),
            ));
        }
        if let (None, Some(_)) = (set(&self.user), set(&self.password_env)) {
            return Err(invalid(
                "nats.user",
                "must be set with nats.password_env".into(),
            ));
        }
        if let Some(user) = set(&self.user) {
            let Some(var) = set(&self.password_env) else {
                return Err(invalid(
                    "nats.password_env",
                    "must be set with nats.user".into(),
                ));
            };
            let password = secret_from_env("nats.password_env", var, lookup)?;
            return Ok(NatsAuth::UserPassword {
                user: user.to_string(),
                password,
            });
        }
        if let Some(var) = set(&self.token_env) {
            return Ok(NatsAuth::Token(secret_from_env(
                "nats.token_env",
                var,
                lookup,
            )?));
        }
        if let Some(path) = set(&self.nkey_seed_file) {
            return nkey_seed(path).map(NatsAuth::NKey);
        }
        if let Some(path) = set(&self.creds_file) {
            let text = std::fs::read_to_string(path).map_err(|error| {
                invalid("nats.creds_file", format!("cannot read {path}: {error}"))
            })?;
            if !text.contains("BEGIN NATS USER JWT") || !text.contains("BEGIN USER NKEY SEED") {
                return Err(invalid(
                    "nats.creds_file",
                    format!("{path} is not a .creds file (a user JWT and an NKey seed)"),
                ));
            }
            return Ok(NatsAuth::Creds(path.to_string()));
        }
        Ok(NatsAuth::None)
    }
}

/// The first line of the file that looks like a user NKey seed.
fn nkey_seed(path: &str) -> Result<Secret, ConfigError> {
    let key = "nats.nkey_seed_file";
    let text = std::fs::read_to_string(path)
        .map_err(|error| invalid(key, format!("cannot read {path}: {error}")))?;
    text.lines()
        .map(str::trim)
        .find(|line| line.starts_with("SU") && line.len() > 50)
        .map(|seed| Secret::new(seed.to_string()))
        .ok_or_else(|| invalid(key, format!("{path} holds no user NKey seed (SU...)")))
}

impl DedupConfig {
    /// The Redis password from `redis_password_env`, when one is named.
    pub fn redis_password(
        &self,
        lookup: &impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Secret>, ConfigError> {
        set(&self.redis_password_env)
            .map(|var| secret_from_env("dedup.redis_password_env", var, lookup))
            .transpose()
    }
}
