//! Errors of the actors crate.

/// A port could not do what was asked. Actors treat every port error as transient: the
/// message is handed back to the source and comes again.
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

    /// Whether trying again later can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, PortError::Unavailable { .. })
    }
}
