//! What each fuzz target checks, shared by `cargo fuzz` (nightly) and the corpus replay in
//! `cargo test` (stable, `tests/tests/fuzz_corpus.rs`). Every input must give an answer or a
//! clear error, never a panic, and what is accepted must survive its own round trip.

use std::time::Duration;

use protocol::signing::{Keyring, SigningScheme};
use protocol::user::{is_valid_user_id, Event, Mappings};
use protocol::Secret;

/// The largest message the engine reads (`engine.max_message_bytes` defaults to 1 MiB).
const MESSAGE_BYTES_MAX: usize = 1 << 20;

/// An event envelope from NATS or the ingest endpoint.
pub fn envelope(data: &[u8]) {
    let mappings = Mappings::default();
    let Ok(event) = Event::parse(data, MESSAGE_BYTES_MAX, &mappings) else {
        return;
    };
    if let Some(key) = &event.key {
        assert!(
            is_valid_user_id(key.as_str()),
            "an invalid id passed: {key:?}"
        );
    }
    let again = Event::parse(&event.envelope.to_bytes(), MESSAGE_BYTES_MAX, &mappings)
        .expect("a parsed event parses again once serialized");
    assert_eq!(again, event, "an event changed in its round trip");
}

/// A Standard Webhooks request: the first bytes choose how the rest splits into the
/// `webhook-id`, `webhook-timestamp` and `webhook-signature` headers and the body.
pub fn signature(data: &[u8]) {
    let keyring = keyring();
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(4, '\n');
    let msg_id = parts.next().unwrap_or_default();
    let timestamp = parts.next().unwrap_or_default();
    let header = parts.next().unwrap_or_default();
    let body = parts.next().unwrap_or_default().as_bytes();
    let now_secs = 1_767_225_600;
    let tolerance = Duration::from_secs(300).as_secs() as i64;
    // Whatever the headers hold: an answer, never a panic.
    let _ = keyring.verify_standard(msg_id, timestamp, header, body, now_secs, tolerance);
    if msg_id.is_empty() {
        return;
    }
    let signed = keyring.sign_standard(msg_id, now_secs, body);
    let stamp = now_secs.to_string();
    keyring
        .verify_standard(msg_id, &stamp, &signed, body, now_secs, tolerance)
        .expect("a request signed with the key verifies");
    let mut tampered = body.to_vec();
    tampered.push(b'!');
    assert!(
        keyring
            .verify_standard(msg_id, &stamp, &signed, &tampered, now_secs, tolerance)
            .is_err(),
        "a changed body verified"
    );
}

fn keyring() -> Keyring {
    Keyring::parse(
        SigningScheme::StandardWebhooks,
        &Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
    )
    .expect("a valid fuzzing secret")
}

/// A user's stored state, as the store or the router's parked copy hands it back.
pub fn state(data: &[u8]) {
    let Ok(state) = actors::state_codec::decode(data) else {
        return;
    };
    let bytes = actors::state_codec::encode(&state).expect("a decoded state encodes");
    let again = actors::state_codec::decode(&bytes).expect("an encoded state decodes");
    assert_eq!(again, state, "a state changed in its round trip");
}

/// A configuration file, then its validation, then the form `check-config` prints.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = engine::config::Config::parse(text, "fuzz.toml", Vec::new()) else {
        return;
    };
    let _ = config.validate(|_| None);
    let printed = config.to_toml();
    let again = engine::config::Config::parse(&printed, "printed.toml", Vec::new())
        .expect("the printed configuration loads again");
    assert_eq!(
        again.to_toml(),
        printed,
        "the printed configuration changed on reload"
    );
}
