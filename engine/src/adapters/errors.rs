//! Error texts from the clients' error chains: the whole cause (their top-level text is often
//! only a kind, such as "IO error"), never a password.

use std::error::Error;

use crate::redact;

/// The error and each of its causes that adds something, joined by `: `, with passwords in
/// URLs redacted; a failed TLS handshake reads `tls: <rustls' reason>`.
pub fn describe(error: &(dyn Error + 'static)) -> String {
    if let Some(tls) = tls_cause(error) {
        return redact::text(&format!("tls: {tls}"));
    }
    let mut causes: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(cause) = next {
        let text = cause.to_string();
        if !causes.iter().any(|c| c.contains(&text)) {
            causes.push(text);
        }
        next = cause.source();
    }
    redact::text(&causes.join(": "))
}

/// rustls' error anywhere in the chain, directly or inside the I/O errors that carry it (an
/// I/O error's `source` skips the error it wraps, so those are unwrapped by hand).
pub fn tls_cause<'a>(error: &'a (dyn Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(error);
    while let Some(cause) = next {
        if let Some(found) = unwrap_io(cause) {
            return Some(found);
        }
        next = cause.source();
    }
    None
}

fn unwrap_io<'a>(mut error: &'a (dyn Error + 'static)) -> Option<&'a rustls::Error> {
    for _ in 0..IO_WRAPPERS_MAX {
        if let Some(found) = error.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        let inner = error.downcast_ref::<std::io::Error>()?.get_ref()?;
        error = inner;
    }
    None
}

/// I/O errors wrapped in each other at most; the clients nest two or three.
const IO_WRAPPERS_MAX: usize = 8;
