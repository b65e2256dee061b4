//! The delivery actor: one per target. It signs and sends requests with at most
//! `max_concurrency` in flight and reports each attempt's outcome to the user actor that asked.
//!
//! It holds no per-user state, so a crash loses nothing: the user actor's line notices the
//! missing answer and retries.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use protocol::{Origin, UserKey};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde_json::{Map, Value};
use tokio::sync::Semaphore;

use crate::breaker::{Admit, Breaker, Change, Health};
use crate::messages::UserMsg;
pub use crate::messages::{DeliveryMsg, DeliveryOutcome, DeliveryRequest};
use crate::ports::{HttpRequest, Ports, TransportError};
use crate::settings::{PipelineSettings, TargetSettings};
use crate::sink::Sink;
use crate::stats::Stats;
use crate::sync::Known;

/// The body text kept from a rejecting answer.
pub const ERROR_BODY_BYTES_MAX: usize = 1024;

/// Per user, the requests to one target go out one after the other, in the order they were
/// handed over, even across a restart of the user actor that asked: a request of a crashed
/// user actor may still be in flight when its successor sends the next one. Shared by the
/// delivery actor's incarnations (it lives in the supervisor), so it survives their restarts.
#[derive(Debug, Default)]
pub struct UserLanes(std::sync::Mutex<HashMap<UserKey, Arc<tokio::sync::Mutex<()>>>>);

impl UserLanes {
    fn lane(&self, key: &UserKey) -> Arc<tokio::sync::Mutex<()>> {
        let Ok(mut lanes) = self.0.lock() else {
            return Arc::new(tokio::sync::Mutex::new(()));
        };
        lanes.entry(key.clone()).or_default().clone()
    }

    /// Forgets a user's lane once no request holds or awaits it.
    fn release(&self, key: &UserKey) {
        if let Ok(mut lanes) = self.0.lock() {
            if lanes
                .get(key)
                .is_some_and(|lane| Arc::strong_count(lane) == 1)
            {
                lanes.remove(key);
            }
        }
    }
}

pub struct DeliveryArgs {
    pub side: Origin,
    pub ports: Ports,
    pub stats: Arc<Stats>,
    pub settings: Arc<PipelineSettings>,
    pub lanes: Arc<UserLanes>,
    /// The target's breaker; it lives in the supervisor, so it outlives this actor.
    pub breaker: Arc<std::sync::Mutex<Breaker>>,
}

pub struct DeliveryState {
    args: DeliveryArgs,
    target: Arc<TargetSettings>,
    permits: Arc<Semaphore>,
}

#[derive(Debug, Default)]
pub struct DeliveryActor;

impl Actor for DeliveryActor {
    type Msg = DeliveryMsg;
    type State = DeliveryState;
    type Arguments = DeliveryArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<DeliveryMsg>,
        args: DeliveryArgs,
    ) -> Result<DeliveryState, ActorProcessingErr> {
        let target = args
            .settings
            .target(args.side)
            .cloned()
            .ok_or_else(|| format!("no target configured for {}", args.side))?;
        let permits = Arc::new(Semaphore::new(target.max_concurrency.max(1)));
        Ok(DeliveryState {
            args,
            target: Arc::new(target),
            permits,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<DeliveryMsg>,
        message: DeliveryMsg,
        state: &mut DeliveryState,
    ) -> Result<(), ActorProcessingErr> {
        crate::ports::maybe_panic(state.args.ports.chaos.as_ref(), "delivery");
        let DeliveryMsg::Deliver(request) = message;
        let body = Bytes::from(render_body(&state.args.settings, &request));
        let ports = state.args.ports.clone();
        let target = state.target.clone();
        let permits = state.permits.clone();
        let lanes = state.args.lanes.clone();
        let stats = state.args.stats.clone();
        let breaker = state.args.breaker.clone();
        // Lanes are taken in the order requests arrive here (tokio's mutex is fair).
        let lane = lanes.lane(&request.key);
        // Requests run concurrently, each reporting back on its own; the actor only starts
        // them, so a slow receiver never blocks this mailbox.
        tokio::spawn(async move {
            let turn = lane.lock_owned().await;
            let Ok(_permit) = permits.acquire_owned().await else {
                return;
            };
            let now_ms = ports.clock.now_ms();
            let admitted = lock(&breaker).admit(now_ms);
            let outcome = match admitted {
                Admit::Wait(wait) => DeliveryOutcome::TargetOpen { wait },
                Admit::Send | Admit::Probe => {
                    let probe = admitted == Admit::Probe;
                    attempt(&ports, &target, &request, body, &stats, &breaker, probe).await
                }
            };
            drop(turn);
            lanes.release(&request.key);
            let _ = request.reply.cast(UserMsg::Delivered {
                side: request.side,
                token: request.token,
                outcome,
            });
        });
        Ok(())
    }
}

fn lock(breaker: &std::sync::Mutex<Breaker>) -> std::sync::MutexGuard<'_, Breaker> {
    breaker
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One signed request, its answer counted, classified, and told to the breaker.
async fn attempt(
    ports: &Ports,
    target: &TargetSettings,
    request: &DeliveryRequest,
    body: Bytes,
    stats: &Stats,
    breaker: &std::sync::Mutex<Breaker>,
    probe: bool,
) -> DeliveryOutcome {
    let now_ms = ports.clock.now_ms();
    let headers = protocol::delivery::headers(
        &target.keyring,
        &request.webhook_id,
        request.side,
        request.event_type,
        &body,
        now_ms,
    );
    let response = ports
        .http
        .post(HttpRequest {
            side: request.side,
            url: target.url.clone(),
            headers,
            body,
            timeout: target.timeout,
        })
        .await;
    let answered_ms = ports.clock.now_ms();
    let sink = Sink::for_side(request.side);
    let class = status_class(&response);
    stats.deliveries.add(&[sink.as_str(), class]);
    stats.delivery_latency.observe(
        sink.as_str(),
        answered_ms.saturating_sub(now_ms).max(0) as u64,
    );
    let health = match class {
        "5xx" | "error" => Health::Down,
        _ => Health::Alive,
    };
    let change = lock(breaker).record(health, probe, answered_ms);
    if let Some(change) = change {
        let gauge = match sink {
            Sink::Payload => &stats.payload_open,
            Sink::BetterAuth => &stats.better_auth_open,
        };
        match change {
            Change::Opened => {
                gauge.store(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(message = "Target down: circuit open; deliveries wait, one probe per interval.", %sink, probe_interval_ms = target.breaker.probe_interval.as_millis() as u64);
            }
            Change::Closed => {
                gauge.store(0, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(message = "Target answers again: circuit closed; deliveries resume.", %sink);
            }
        }
    }
    if probe && health == Health::Down {
        // A probe that finds the target still down costs its line nothing: while the circuit
        // is open no retry budget is spent, and nothing is dead-lettered for the outage.
        return DeliveryOutcome::TargetOpen {
            wait: target.breaker.probe_interval,
        };
    }
    classify(response, answered_ms)
}

/// The delivery body: the canonical user (or its deletion) in the target's field names.
fn render_body(settings: &PipelineSettings, request: &DeliveryRequest) -> Vec<u8> {
    let mapping = settings.mappings.side(request.side);
    let data = match &request.state {
        Known::Holds(fields) => mapping.from_canonical(fields),
        Known::Deleted | Known::Unknown => {
            let mut data = Map::new();
            data.insert(
                mapping.id_field().to_string(),
                Value::String(request.key.as_str().to_string()),
            );
            data
        }
    };
    protocol::delivery::body(
        &request.webhook_id,
        request.side,
        request.event_type,
        request.timestamp_ms,
        data,
    )
}

/// The status class a delivery attempt is counted under.
pub fn status_class(response: &Result<crate::ports::HttpResponse, TransportError>) -> &'static str {
    match response {
        Ok(r) if (200..300).contains(&r.status) => "2xx",
        Ok(r) if (300..400).contains(&r.status) => "3xx",
        Ok(r) if (400..500).contains(&r.status) => "4xx",
        Ok(_) => "5xx",
        Err(_) => "error",
    }
}

/// Sorts an answer into §3's classes.
pub fn classify(
    response: Result<crate::ports::HttpResponse, TransportError>,
    now_ms: i64,
) -> DeliveryOutcome {
    match response {
        Ok(r) if (200..300).contains(&r.status) => DeliveryOutcome::Accepted { at_ms: now_ms },
        // A redirect is never followed: the signed request goes only to the configured URL.
        Ok(r) if (300..400).contains(&r.status) => DeliveryOutcome::Permanent {
            error: format!(
                "http {}: redirect to {} not followed (deliveries go only to the configured url)",
                r.status,
                r.location.as_deref().unwrap_or("(no Location)")
            ),
        },
        Ok(r) if matches!(r.status, 408 | 425 | 429) || r.status >= 500 || r.status < 400 => {
            DeliveryOutcome::Transient {
                error: format!("http {}: {}", r.status, r.body_prefix),
                retry_after: r.retry_after,
            }
        }
        Ok(r) => DeliveryOutcome::Permanent {
            error: format!("http {}: {}", r.status, r.body_prefix),
        },
        Err(error) => DeliveryOutcome::Transient {
            error: error.to_string(),
            retry_after: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::HttpResponse;

    fn answer(status: u16) -> Result<HttpResponse, TransportError> {
        Ok(HttpResponse {
            status,
            retry_after: None,
            location: None,
            body_prefix: String::new(),
        })
    }

    #[test]
    fn classes_of_section_3() {
        assert!(matches!(
            classify(answer(200), 1),
            DeliveryOutcome::Accepted { at_ms: 1 }
        ));
        assert!(matches!(
            classify(answer(204), 1),
            DeliveryOutcome::Accepted { .. }
        ));
        for status in [408, 425, 429, 500, 502, 503] {
            assert!(
                matches!(
                    classify(answer(status), 1),
                    DeliveryOutcome::Transient { .. }
                ),
                "{status}"
            );
        }
        for status in [
            300, 301, 302, 303, 307, 308, 400, 401, 403, 404, 409, 410, 422,
        ] {
            assert!(
                matches!(
                    classify(answer(status), 1),
                    DeliveryOutcome::Permanent { .. }
                ),
                "{status}"
            );
        }
        assert!(matches!(
            classify(Err(TransportError::Timeout), 1),
            DeliveryOutcome::Transient { .. }
        ));
    }
}
