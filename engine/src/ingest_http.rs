//! Signed HTTP ingest (`[ingest]`): `POST /ingest/better-auth` and `POST /ingest/payload`, for
//! applications that send webhooks (e.g. Better Auth's `hooks.after`) instead of publishing to
//! NATS.
//!
//! A request is answered `202` only once JetStream has stored the event, so an application
//! that retries until it sees a 2xx never loses one; the event id doubles as `Nats-Msg-Id`, so
//! such retries are not stored twice. Answers, in the order checks run: `413` over
//! `max_body_bytes`; `401` for a missing, bad or out-of-tolerance signature (with no detail
//! that would help forge one); `400` with the §4 reason for an invalid envelope, or
//! `wrong_origin` when the body's origin is not the endpoint's; `503` with `Retry-After` when
//! NATS cannot take the event.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use actors::stats::Labelled;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures::StreamExt;
use protocol::signing::{Keyring, SigningScheme};
use protocol::user::{Event, Mappings};
use protocol::Origin;
use serde_json::json;

use crate::commands::publish::{publish, subject_for};
use crate::config::Config;

/// How long a request waits for JetStream to store its event before answering 503.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a client may take to send its body: a slow sender must not hold a connection.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct IngestState {
    /// Set once NATS is connected; until then requests get 503 and retry.
    pub js: Arc<OnceLock<async_nats::jetstream::Context>>,
    pub config: Arc<Config>,
    pub mappings: Arc<Mappings>,
    pub better_auth: Keyring,
    pub payload: Keyring,
    pub requests: Arc<Labelled>,
}

/// The two endpoints, with their body limit.
pub fn router(state: IngestState) -> Router {
    Router::new()
        .route(
            "/ingest/better-auth",
            post(|state, headers, body| ingest(Origin::BetterAuth, state, headers, body)),
        )
        .route(
            "/ingest/payload",
            post(|state, headers, body| ingest(Origin::Payload, state, headers, body)),
        )
        .with_state(state)
}

fn answer(status: StatusCode, error: &str) -> Response {
    (status, Json(json!({ "error": error }))).into_response()
}

async fn ingest(
    origin: Origin,
    State(state): State<IngestState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (result, response) = match read_body(body, state.config.ingest.max_body_bytes).await {
        Ok(body) => handle(origin, &state, &headers, body).await,
        Err(unread) => unread.answer(),
    };
    state.requests.add(&[origin.as_str(), result]);
    response
}

/// Why a body was not read.
enum Unread {
    TooLarge,
    Broken,
    TooSlow,
}

impl Unread {
    fn answer(self) -> (&'static str, Response) {
        match self {
            Unread::TooLarge => (
                "too_large",
                answer(StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            ),
            Unread::Broken => ("invalid", answer(StatusCode::BAD_REQUEST, "invalid_body")),
            Unread::TooSlow => (
                "invalid",
                answer(StatusCode::REQUEST_TIMEOUT, "body_timeout"),
            ),
        }
    }
}

/// The body, read within [`BODY_READ_TIMEOUT`] and at most `max` bytes: reading stops at the
/// first byte past the limit.
async fn read_body(body: Body, max: usize) -> Result<Bytes, Unread> {
    let read = async {
        let mut chunks = body.into_data_stream();
        let mut bytes = bytes::BytesMut::new();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|_| Unread::Broken)?;
            if bytes.len() + chunk.len() > max {
                return Err(Unread::TooLarge);
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes.freeze())
    };
    tokio::time::timeout(BODY_READ_TIMEOUT, read)
        .await
        .unwrap_or(Err(Unread::TooSlow))
}

async fn handle(
    origin: Origin,
    state: &IngestState,
    headers: &HeaderMap,
    body: Bytes,
) -> (&'static str, Response) {
    let keyring = match origin {
        Origin::BetterAuth => &state.better_auth,
        Origin::Payload => &state.payload,
    };
    if let Err(error) = verify(keyring, headers, &body, state.config.ingest.tolerance) {
        tracing::warn!(message = "Ingest request refused: signature.", origin = %origin, %error);
        return (
            "unauthorized",
            answer(StatusCode::UNAUTHORIZED, "invalid signature"),
        );
    }
    let event = match Event::parse(&body, state.config.nats.max_message_bytes, &state.mappings) {
        Ok(event) => event,
        Err(bad) => return ("invalid", answer(StatusCode::BAD_REQUEST, &bad.reason())),
    };
    if event.envelope.origin != origin {
        return (
            "wrong_origin",
            answer(StatusCode::BAD_REQUEST, "wrong_origin"),
        );
    }
    let user = event.key.as_ref().map(|k| k.as_str()).unwrap_or_default();
    let subject = subject_for(&state.config, origin, event.envelope.event_type, user);
    let Some(js) = state.js.get() else {
        return ("unavailable", nats_unavailable());
    };
    let stored = publish(js, &subject, &event.envelope.id, body);
    match tokio::time::timeout(PUBLISH_TIMEOUT, stored).await {
        Ok(Ok(_)) => (
            "accepted",
            (
                StatusCode::ACCEPTED,
                Json(json!({ "id": event.envelope.id, "subject": subject })),
            )
                .into_response(),
        ),
        outcome => {
            let error = match outcome {
                Ok(Err(error)) => error.to_string(),
                _ => format!("no acknowledgement within {PUBLISH_TIMEOUT:?}"),
            };
            tracing::warn!(message = "Ingest request not stored: NATS unavailable.", origin = %origin, event_id = %event.envelope.id, %error);
            ("unavailable", nats_unavailable())
        }
    }
}

/// 503 with `Retry-After: 1`: the sender keeps the event and tries again.
fn nats_unavailable() -> Response {
    let mut response = answer(StatusCode::SERVICE_UNAVAILABLE, "nats_unavailable");
    response
        .headers_mut()
        .insert("retry-after", axum::http::HeaderValue::from_static("1"));
    response
}

/// Checks the request's signature by the configured scheme: Standard Webhooks headers, or
/// `x-webhook-signature` (hex HMAC of the body) with `x-webhook-timestamp` in milliseconds.
fn verify(
    keyring: &Keyring,
    headers: &HeaderMap,
    body: &[u8],
    tolerance: Duration,
) -> Result<(), protocol::signing::VerifyError> {
    use protocol::signing::VerifyError;
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    };
    let now_ms = crate::adapters::clock::now_ms();
    let tolerance_secs = tolerance.as_secs() as i64;
    match keyring.scheme() {
        SigningScheme::StandardWebhooks => keyring.verify_standard(
            header("webhook-id"),
            header("webhook-timestamp"),
            header("webhook-signature"),
            body,
            now_ms / 1000,
            tolerance_secs,
        ),
        SigningScheme::HmacSha256Hex => {
            let sent_ms: i64 = header("x-webhook-timestamp")
                .parse()
                .map_err(|_| VerifyError::MissingHeader)?;
            let age_ms = i128::from(now_ms) - i128::from(sent_ms);
            if age_ms.abs() > i128::from(tolerance_secs) * 1000 {
                return Err(VerifyError::TimestampTooOld);
            }
            keyring.verify_hex(header("x-webhook-signature"), body)
        }
    }
}
