//! Configuration errors: each names the key it is about and what is wrong with it.

use std::fmt;

/// A configuration that cannot be used. Never holds a secret value: only variable names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// The file could not be read.
    Read { path: String, error: String },
    /// The file or an override does not fit the schema (unknown key, wrong type, bad value).
    Parse {
        problems: Vec<Problem>,
        source: String,
    },
    /// A value is well-formed but not usable.
    Invalid { key: String, message: String },
}

/// One schema problem at one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path, e.g. `targets.payload.timeout`; empty for the top level.
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub(crate) fn from_figment(error: figment::Error, source: &str) -> ConfigError {
        let problems = error
            .into_iter()
            .map(|e| Problem {
                key: e.path.join("."),
                message: describe(&e.kind),
            })
            .collect();
        ConfigError::Parse {
            problems,
            source: source.to_string(),
        }
    }

    /// The keys this error is about.
    pub fn keys(&self) -> Vec<String> {
        match self {
            ConfigError::Read { .. } => Vec::new(),
            ConfigError::Parse { problems, .. } => problems.iter().map(|p| p.key.clone()).collect(),
            ConfigError::Invalid { key, .. } => vec![key.clone()],
        }
    }
}

fn describe(kind: &figment::error::Kind) -> String {
    use figment::error::Kind;
    match kind {
        Kind::UnknownField(field, expected) => {
            format!(
                "unknown key `{field}`; expected one of: {}",
                expected.join(", ")
            )
        }
        Kind::MissingField(field) => format!("missing key `{field}`"),
        Kind::InvalidType(actual, expected) => format!("expected {expected}, found {actual}"),
        Kind::UnknownVariant(actual, expected) => {
            format!(
                "unknown value {actual:?}; expected one of: {}",
                expected.join(", ")
            )
        }
        other => other.to_string(),
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Read { path, error } => {
                write!(f, "cannot read config file {path}: {error}")
            }
            ConfigError::Parse { problems, source } => {
                let mut first = true;
                for problem in problems {
                    if !first {
                        writeln!(f)?;
                    }
                    first = false;
                    if problem.key.is_empty() {
                        write!(f, "config ({source}): {}", problem.message)?;
                    } else {
                        write!(
                            f,
                            "config key `{}` ({source}): {}",
                            problem.key, problem.message
                        )?;
                    }
                }
                Ok(())
            }
            ConfigError::Invalid { key, message } => write!(f, "config key `{key}`: {message}"),
        }
    }
}

impl std::error::Error for ConfigError {}
