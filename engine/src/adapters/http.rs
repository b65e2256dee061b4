//! The HTTP transport: one pooled reqwest client per target.

use std::time::Duration;

use actors::delivery::ERROR_BODY_BYTES_MAX;
use actors::ports::{BoxFuture, HttpRequest, HttpResponse, HttpTransport, TransportError};
use protocol::Origin;

use crate::config::{TargetConfig, TargetsConfig};
use crate::redact;

use super::errors;

/// How much of an answer's body is read; the rest is discarded with its connection, so a
/// receiver answering without end cannot hold a delivery slot or fill memory.
pub const RESPONSE_BODY_BYTES_MAX: usize = 64 * 1024;

const _: () = assert!(ERROR_BODY_BYTES_MAX <= RESPONSE_BODY_BYTES_MAX);

/// One client per target: each has its own trust (a private CA), client certificate and pool.
#[derive(Debug, Clone)]
pub struct ReqwestTransport {
    payload: reqwest::Client,
    better_auth: reqwest::Client,
}

impl ReqwestTransport {
    pub fn new(targets: &TargetsConfig) -> anyhow::Result<Self> {
        Ok(ReqwestTransport {
            payload: client(&targets.payload, "targets.payload")?,
            better_auth: client(&targets.better_auth, "targets.better_auth")?,
        })
    }

    fn client(&self, side: Origin) -> &reqwest::Client {
        match side {
            Origin::Payload => &self.payload,
            Origin::BetterAuth => &self.better_auth,
        }
    }
}

/// A target's client: rustls, the system's roots or the target's `ca_file` alone, its client
/// certificate, and redirects never followed (a signed delivery goes only to the configured
/// URL; a 3xx is the receiver's answer). Its pool keeps an idle connection per delivery slot:
/// fewer, and every request past them would close its connection after use.
fn client(target: &TargetConfig, key: &str) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(target.max_concurrency.max(1))
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5));
    let tls = target.tls_files();
    if let Some(path) = tls.ca_file {
        let pem = read(key, "ca_file", path)?;
        let certificates = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| anyhow::anyhow!("{key}.ca_file: {path}: {e}"))?;
        builder = builder.tls_built_in_root_certs(false);
        for certificate in certificates {
            builder = builder.add_root_certificate(certificate);
        }
    }
    if let (Some(cert), Some(private_key)) = (tls.client_cert_file, tls.client_key_file) {
        let mut pem = read(key, "client_cert_file", cert)?;
        pem.push(b'\n');
        pem.extend(read(key, "client_key_file", private_key)?);
        let identity = reqwest::Identity::from_pem(&pem)
            .map_err(|e| anyhow::anyhow!("{key}.client_cert_file: {cert}: {e}"))?;
        builder = builder.identity(identity);
    }
    builder
        .build()
        .map_err(|e| anyhow::anyhow!("{key}: cannot build the HTTP client: {}", describe(&e)))
}

fn read(key: &str, field: &str, path: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("{key}.{field}: cannot read {path}: {e}"))
}

impl HttpTransport for ReqwestTransport {
    fn post(&self, request: HttpRequest) -> BoxFuture<'_, Result<HttpResponse, TransportError>> {
        Box::pin(async move {
            let mut builder = self
                .client(request.side)
                .post(&request.url)
                .timeout(request.timeout)
                .body(request.body);
            for (name, value) in &request.headers {
                builder = builder.header(*name, value);
            }
            let mut response = builder.send().await.map_err(|error| {
                if error.is_timeout() {
                    TransportError::Timeout
                } else if error.is_connect() {
                    TransportError::Connect(describe(&error))
                } else {
                    TransportError::Other(describe(&error))
                }
            })?;
            let status = response.status().as_u16();
            let header = |name| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            let retry_after = header(reqwest::header::RETRY_AFTER)
                .as_deref()
                .and_then(parse_retry_after);
            let location = header(reqwest::header::LOCATION).map(|l| redact::url(&l));
            let body = read_body(&mut response).await;
            let body_prefix = if (200..300).contains(&status) {
                String::new()
            } else {
                let cut = &body[..body.len().min(ERROR_BODY_BYTES_MAX)];
                String::from_utf8_lossy(cut).into_owned()
            };
            Ok(HttpResponse {
                status,
                retry_after,
                location,
                body_prefix,
            })
        })
    }
}

/// Up to [`RESPONSE_BODY_BYTES_MAX`] of the body. A body read to its end lets the connection
/// go back to the pool; a longer one is dropped unread with its connection.
async fn read_body(response: &mut reqwest::Response) -> Vec<u8> {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        if body.len() + chunk.len() > RESPONSE_BODY_BYTES_MAX {
            let room = RESPONSE_BODY_BYTES_MAX - body.len();
            body.extend_from_slice(&chunk[..room]);
            break;
        }
        body.extend_from_slice(&chunk);
    }
    body
}

/// The error and its causes, without the URL (it may hold credentials).
pub fn describe(error: &reqwest::Error) -> String {
    let text = errors::describe(error);
    match error.url() {
        Some(url) => text.replace(&redact::url(url.as_str()), "<target>"),
        None => text,
    }
}

/// `Retry-After` as delta-seconds or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate_parse(value)?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

fn httpdate_parse(value: &str) -> Option<std::time::SystemTime> {
    humantime::parse_rfc3339_weak(value).ok().or_else(|| {
        // IMF-fixdate, e.g. "Wed, 21 Oct 2015 07:28:00 GMT".
        let parts: Vec<&str> = value.split_whitespace().collect();
        if parts.len() != 6 {
            return None;
        }
        let month = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ]
        .iter()
        .position(|m| *m == parts[2])?
            + 1;
        let text = format!(
            "{}-{:02}-{:02} {}",
            parts[3],
            month,
            parts[1].parse::<u32>().ok()?,
            parts[4]
        );
        humantime::parse_rfc3339_weak(&text).ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("120"), Some(Duration::from_secs(120)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
