//! Errors of the actors crate.

/// A port could not do what was asked: for now (`Unavailable`, tried again), or for good for
/// this request (`Rejected`, `Corrupt`: the message it concerns becomes a dead letter).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    #[error("{service} unavailable: {message}")]
    Unavailable {
        service: &'static str,
        message: String,
    },
    #[error("{service} rejected the request: {message}")]
    Rejected {
        service: &'static str,
        message: String,
    },
    /// What the service holds cannot be read: trying again reads the same bytes.
    #[error("{service} holds data that cannot be decoded: {message}")]
    Corrupt {
        service: &'static str,
        message: String,
    },
}

impl PortError {
    pub fn unavailable(service: &'static str, message: impl ToString) -> Self {
        PortError::Unavailable {
            service,
            message: message.to_string(),
        }
    }

    pub fn rejected(service: &'static str, message: impl ToString) -> Self {
        PortError::Rejected {
            service,
            message: message.to_string(),
        }
    }

    pub fn corrupt(service: &'static str, message: impl ToString) -> Self {
        PortError::Corrupt {
            service,
            message: message.to_string(),
        }
    }

    /// Whether trying again later can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, PortError::Unavailable { .. })
    }
}
