//! One webhook delivery (PROTOCOL.md §3): its body and the full header set.

use serde_json::{Map, Value};

use crate::envelope::{Envelope, EventType, Origin};
use crate::signing::{Keyring, SigningScheme};

/// The suffix of a delivery's id when the canonical user goes back to the event's own origin.
pub const RESYNC_SUFFIX: &str = ":resync";

/// The `webhook-id` of a delivery of `event_id` to `target`, given the event's origin.
pub fn webhook_id(event_id: &str, event_origin: Origin, target: Origin) -> String {
    if event_origin == target {
        format!("{event_id}{RESYNC_SUFFIX}")
    } else {
        event_id.to_string()
    }
}

/// The body of a delivery to `target`: an envelope whose `origin` is the other side as the
/// receiver sees it and whose `data` is the canonical user in the target's field names.
pub fn body(
    webhook_id: &str,
    target: Origin,
    event_type: EventType,
    timestamp_ms: i64,
    data: Map<String, Value>,
) -> Vec<u8> {
    Envelope {
        id: webhook_id.to_string(),
        origin: target.other(),
        event_type,
        timestamp: timestamp_ms,
        data,
    }
    .to_bytes()
}

/// The headers one delivery attempt carries, in a fixed order.
pub fn headers(
    keyring: &Keyring,
    webhook_id: &str,
    target: Origin,
    event_type: EventType,
    body: &[u8],
    now_ms: i64,
) -> Vec<(&'static str, String)> {
    let now_secs = now_ms.div_euclid(1000);
    let mut headers = vec![
        ("content-type", "application/json".to_string()),
        ("webhook-id", webhook_id.to_string()),
        ("webhook-timestamp", now_secs.to_string()),
        (
            "webhook-signature",
            keyring.sign_standard(webhook_id, now_secs, body),
        ),
        ("x-webhook-id", webhook_id.to_string()),
        ("x-webhook-timestamp", now_ms.to_string()),
        ("x-webhook-origin", target.other().as_str().to_string()),
        ("x-webhook-event", event_type.as_str().to_string()),
    ];
    if keyring.scheme() == SigningScheme::HmacSha256Hex {
        headers.push(("x-webhook-signature", keyring.sign_hex(body)));
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    #[test]
    fn header_set_of_section_3() {
        let keyring = Keyring::parse(
            SigningScheme::StandardWebhooks,
            &Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        )
        .expect("valid secret");
        let id = webhook_id("evt1", Origin::BetterAuth, Origin::Payload);
        let body = body(&id, Origin::Payload, EventType::Updated, 7, Map::new());
        let headers = headers(
            &keyring,
            &id,
            Origin::Payload,
            EventType::Updated,
            &body,
            1_700_000_000_123,
        );
        let get = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        assert_eq!(get("webhook-id"), "evt1");
        assert_eq!(get("x-webhook-id"), "evt1");
        assert_eq!(get("webhook-timestamp"), "1700000000");
        assert_eq!(get("x-webhook-timestamp"), "1700000000123");
        assert_eq!(get("x-webhook-origin"), "better-auth");
        assert_eq!(get("x-webhook-event"), "user.updated");
        assert!(get("webhook-signature").starts_with("v1,"));
        assert!(headers.iter().all(|(n, _)| *n != "x-webhook-signature"));
        keyring
            .verify_standard(
                &id,
                &get("webhook-timestamp"),
                &get("webhook-signature"),
                &body,
                1_700_000_000,
                300,
            )
            .expect("own signature verifies");
        let parsed: Value = serde_json::from_slice(&body).expect("json body");
        assert_eq!(parsed["origin"], "better-auth");
        assert_eq!(parsed["id"], "evt1");
    }

    #[test]
    fn resync_goes_back_to_the_origin_with_its_suffix() {
        assert_eq!(
            webhook_id("e", Origin::Payload, Origin::Payload),
            "e:resync"
        );
        assert_eq!(webhook_id("e", Origin::Payload, Origin::BetterAuth), "e");
    }

    #[test]
    fn hex_scheme_adds_x_webhook_signature() {
        let keyring =
            Keyring::parse(SigningScheme::HmacSha256Hex, &Secret::new("key")).expect("valid");
        let body = b"The quick brown fox jumps over the lazy dog";
        let headers = headers(
            &keyring,
            "e",
            Origin::BetterAuth,
            EventType::Created,
            body,
            0,
        );
        let hex = headers
            .iter()
            .find(|(n, _)| *n == "x-webhook-signature")
            .map(|(_, v)| v.as_str());
        assert_eq!(
            hex,
            Some("f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8")
        );
    }
}
