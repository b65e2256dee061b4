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

use std::sync::Arc;
use std::time::Duration;

use actors::stats::Labelled;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use protocol::signing::{Keyring, SigningScheme};
use protocol::user::{Event, Mappings};
use protocol::Origin;
use serde_json::json;

use crate::commands::publish::{publish, subject_for};
use crate::config::Config;

/// How long a request waits for JetStream to store its event before answering 503.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct IngestState {
    pub js: async_nats::jetstream::Context,
    pub config: Arc<Config>,
    pub mappings: Arc<Mappings>,
    pub better_auth: Keyring,
    pub payload: Keyring,
    pub requests: Arc<Labelled>,
}

/// The two endpoints, with their body limit.
pub fn router(state: IngestState) -> Router {
    // One byte over the limit is enough to tell "too large"; axum stops reading there.
    let limit = state.config.ingest.max_body_bytes.saturating_add(1);
    Router::new()
        .route(
            "/ingest/better-auth",
            post(|state, headers, body| ingest(Origin::BetterAuth, state, headers, body)),
        )
        .route(
            "/ingest/payload",
            post(|state, headers, body| ingest(Origin::Payload, state, headers, body)),
        )
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

fn answer(status: StatusCode, error: &str) -> Response {
    (status, Json(json!({ "error": error }))).into_response()
}

async fn ingest(
    origin: Origin,
    State(state): State<IngestState>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let (result, response) = handle(origin, &state, &headers, body).await;
    state.requests.add(&[origin.as_str(), result]);
    response
}

async fn handle(
    origin: Origin,
    state: &IngestState,
    headers: &HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> (&'static str, Response) {
    let max = state.config.ingest.max_body_bytes;
    let body = match body {
        Ok(body) if body.len() <= max => body,
        Ok(_) => {
            return (
                "too_large",
                answer(StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            )
        }
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return (
                "too_large",
                answer(StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            )
        }
        Err(_) => return ("invalid", answer(StatusCode::BAD_REQUEST, "invalid_json")),
    };
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
    let stored = publish(&state.js, &subject, &event.envelope.id, body);
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
            let mut response = answer(StatusCode::SERVICE_UNAVAILABLE, "nats_unavailable");
            response
                .headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
            ("unavailable", response)
        }
    }
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
