//! A webhook receiver for tests: a real local HTTP server that verifies every Standard Webhooks
//! signature, records what arrived, and answers as the test scripts it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use protocol::signing::{Keyring, SigningScheme};
use protocol::Secret;
use serde_json::Value;

/// One request as received.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: BTreeMap<String, String>,
    pub body: Value,
    pub raw: Vec<u8>,
    /// Whether the Standard Webhooks signature verified.
    pub verified: bool,
    /// What this receiver answered.
    pub status: u16,
    pub at: Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }

    pub fn webhook_id(&self) -> &str {
        self.header("webhook-id")
    }

    /// A field of the delivered user (`data`).
    pub fn data(&self, field: &str) -> Value {
        self.body["data"][field].clone()
    }
}

type Script = Box<dyn FnMut(&Received) -> u16 + Send>;

fn app(inner: Arc<Inner>) -> Router {
    Router::new()
        .route("/hook", post(receive))
        .with_state(inner)
}

/// A rustls server configuration from PEM files, verifying clients against `client_ca`.
fn server_tls(
    cert_file: &std::path::Path,
    key_file: &std::path::Path,
    client_ca: Option<&std::path::Path>,
) -> rustls::ServerConfig {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .expect("server certificate file")
        .collect::<Result<_, _>>()
        .expect("server certificate PEM");
    let key = PrivateKeyDer::from_pem_file(key_file).expect("server key PEM");
    let builder = rustls::ServerConfig::builder();
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca).expect("client CA file") {
                roots.add(cert.expect("client CA PEM")).expect("client CA");
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    builder
        .with_single_cert(chain, key)
        .expect("server certificate and key")
}

struct Inner {
    keyring: Keyring,
    log: Mutex<Vec<Received>>,
    script: Mutex<Script>,
}

/// A running receiver. Dropping it stops the server.
pub struct Receiver {
    pub url: String,
    inner: Arc<Inner>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Inner {
    fn new(secret: &str) -> Arc<Inner> {
        let keyring = Keyring::parse(SigningScheme::StandardWebhooks, &Secret::new(secret))
            .expect("test secret is a valid whsec_ secret");
        Arc::new(Inner {
            keyring,
            log: Mutex::new(Vec::new()),
            script: Mutex::new(Box::new(|_| 200)),
        })
    }
}

impl Receiver {
    /// Starts on a free loopback port; answers 200 to every verified request, 401 otherwise.
    pub async fn start(secret: &str) -> Receiver {
        let inner = Inner::new(secret);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr: SocketAddr = listener.local_addr().expect("local addr");
        let app = app(inner.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            url: format!("http://{addr}/hook"),
            inner,
            server,
        }
    }

    /// The same over HTTPS with the given server certificate; with `client_ca`, a client must
    /// present a certificate that CA signed (mutual TLS), else the handshake fails.
    pub async fn start_tls(
        secret: &str,
        cert_file: &std::path::Path,
        key_file: &std::path::Path,
        client_ca: Option<&std::path::Path>,
    ) -> Receiver {
        let inner = Inner::new(secret);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr: SocketAddr = listener.local_addr().expect("local addr");
        let acceptor =
            tokio_rustls::TlsAcceptor::from(Arc::new(server_tls(cert_file, key_file, client_ca)));
        let app = app(inner.clone());
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let service = hyper_util::service::TowerToHyperService::new(app.clone());
                tokio::spawn(async move {
                    // A client that fails the handshake (wrong CA, no certificate) is dropped.
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        Receiver {
            url: format!("https://{addr}/hook"),
            inner,
            server,
        }
    }

    /// Replaces how the receiver answers verified requests (status code per request).
    pub fn script(&self, script: impl FnMut(&Received) -> u16 + Send + 'static) {
        *self.inner.script.lock().expect("script lock") = Box::new(script);
    }

    /// Everything received so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.inner.log.lock().expect("log lock").clone()
    }

    /// Requests this receiver accepted (2xx), in arrival order.
    pub fn accepted(&self) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| (200..300).contains(&r.status))
            .collect()
    }

    /// Waits until `accepted()` satisfies `done`, or fails after `timeout`.
    pub async fn wait_accepted(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let accepted = self.accepted();
            if done(&accepted) {
                return accepted;
            }
            assert!(
                Instant::now() < deadline,
                "receiver {} did not get what was expected within {timeout:?}; accepted {} request(s), last: {:?}",
                self.url,
                accepted.len(),
                accepted.last().map(|r| r.body.to_string())
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

async fn receive(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let headers: BTreeMap<String, String> = headers
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let get = |name: &str| headers.get(name).map(String::as_str).unwrap_or("");
    let now_secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let verified = inner
        .keyring
        .verify_standard(
            get("webhook-id"),
            get("webhook-timestamp"),
            get("webhook-signature"),
            &body,
            now_secs,
            300,
        )
        .is_ok();
    let mut received = Received {
        headers: headers.clone(),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        raw: body.to_vec(),
        verified,
        status: 0,
        at: Instant::now(),
    };
    let status = if verified {
        (inner.script.lock().expect("script lock"))(&received)
    } else {
        401
    };
    received.status = status;
    inner.log.lock().expect("log lock").push(received);
    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}
