//! Webhook signing checked against references outside this crate.
//!
//! Our own sign → verify round trip cannot catch a mistake shared by both halves (a wrong
//! separator, the wrong key bytes), so this file pins the output to vectors published by the
//! Standard Webhooks project, to vectors computed with the official Python package, and runs
//! the official Python receiver over signatures we produce. The proptests then cover what
//! fixed vectors cannot: tampering, tolerance edges and rotation.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine as _;
use proptest::prelude::*;
use protocol::secret::Secret;
use protocol::signing::{Keyring, SigningError, SigningScheme, VerifyError};

/// The tolerance PROTOCOL.md receivers and the official libraries use.
const TOLERANCE_SECS: i64 = 5 * 60;

struct Vector {
    secret: &'static str,
    msg_id: &'static str,
    timestamp_secs: i64,
    body: &'static str,
    signature: &'static str,
}

/// From the standard-webhooks/standard-webhooks repository:
/// - `libraries/python/tests/test_webhooks.py` (`test_sign_function`), the same values as
///   `libraries/javascript/src/webhook.test.ts` ("sign function works") and
///   `libraries/go/webhook_test.go` (`TestWebhookSign`);
/// - `libraries/rust/src/lib.rs` (`tests::test_sign`).
const REFERENCE_VECTORS: [Vector; 2] = [
    Vector {
        secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        msg_id: "msg_p5jXN8AQM9LWM0D4loKWxJek",
        timestamp_secs: 1614265330,
        body: r#"{"test": 2432232314}"#,
        signature: "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    },
    Vector {
        secret: "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
        msg_id: "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
        timestamp_secs: 1649367553,
        body: r#"{"email":"test@example.com","username":"test_user"}"#,
        signature: "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=",
    },
];

/// Computed with the official `standardwebhooks` package, version 1.1.0 from PyPI
/// (`pip install standardwebhooks`), on Python 3.11.7:
///
/// ```python
/// import base64
/// from datetime import datetime, timezone
/// from standardwebhooks import Webhook
///
/// cases = [
///     ("whsec_" + base64.b64encode(bytes(range(32))).decode(), "msg_2mZ8fYtq3w1Xl0dKcVbN7eR4sPa", 1700000000,
///      '{"type":"user.updated","data":{"email":"ada@example.com"}}'),
///     ("whsec_" + base64.b64encode(b"rotation-key-two-24bytes").decode(), "evt_01J9Z3K8Q2:resync", 1717171717,
///      '{"name":"Zoë Ñandú","city":"東京","note":"🎉 naïve café"}'),
///     ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_far_future", 253402300799,
///      '{"test": 2432232314}'),
///     ("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD", "msg_empty_body", 0, ''),
/// ]
/// for secret, msg_id, ts, body in cases:
///     sig = Webhook(secret).sign(msg_id, datetime.fromtimestamp(ts, tz=timezone.utc), body)
///     print(repr(secret), repr(msg_id), ts, repr(body), sig)
/// ```
///
/// 253402300799 is 9999-12-31T23:59:59Z, the largest second Python's `datetime` can hold.
const PYTHON_VECTORS: [Vector; 4] = [
    Vector {
        secret: "whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        msg_id: "msg_2mZ8fYtq3w1Xl0dKcVbN7eR4sPa",
        timestamp_secs: 1700000000,
        body: r#"{"type":"user.updated","data":{"email":"ada@example.com"}}"#,
        signature: "v1,bCqqmKurVdb2dpeF2QWMA6SPymEbg9j5d2OGGigspgQ=",
    },
    Vector {
        secret: "whsec_cm90YXRpb24ta2V5LXR3by0yNGJ5dGVz",
        msg_id: "evt_01J9Z3K8Q2:resync",
        timestamp_secs: 1717171717,
        body: r#"{"name":"Zoë Ñandú","city":"東京","note":"🎉 naïve café"}"#,
        signature: "v1,sthFZPmEE5OKsKNx7HE75ixzLGsK+eW0R2ACMjM47Jw=",
    },
    Vector {
        secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        msg_id: "msg_far_future",
        timestamp_secs: 253402300799,
        body: r#"{"test": 2432232314}"#,
        signature: "v1,gbcJjgO9h+Dx27AnUjgfMrv/UxeCu5BcY07sZH5UgE4=",
    },
    Vector {
        secret: "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
        msg_id: "msg_empty_body",
        timestamp_secs: 0,
        body: "",
        signature: "v1,zvo4H0iS8lALo9xe5YyhgBtuRyA62aDxwj5qUDUazEg=",
    },
];

fn standard_keyring(value: &str) -> Keyring {
    Keyring::parse(SigningScheme::StandardWebhooks, &Secret::new(value))
        .expect("test secrets are valid")
}

fn whsec(key: &[u8]) -> String {
    format!("whsec_{}", STANDARD.encode(key))
}

fn now_secs() -> i64 {
    let elapsed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970");
    i64::try_from(elapsed.as_secs()).expect("the clock is before the year 292 billion")
}

fn check_vector(vector: &Vector) {
    let keys = standard_keyring(vector.secret);
    let body = vector.body.as_bytes();
    let timestamp = vector.timestamp_secs.to_string();
    assert_eq!(
        keys.sign_standard(vector.msg_id, vector.timestamp_secs, body),
        vector.signature,
        "msg_id {}",
        vector.msg_id
    );
    let verify = |msg_id: &str, body: &[u8]| {
        keys.verify_standard(
            msg_id,
            &timestamp,
            vector.signature,
            body,
            vector.timestamp_secs,
            TOLERANCE_SECS,
        )
    };
    assert_eq!(
        verify(vector.msg_id, body),
        Ok(()),
        "msg_id {}",
        vector.msg_id
    );
    assert_eq!(
        verify(&format!("{}x", vector.msg_id), body),
        Err(VerifyError::NoMatchingSignature)
    );
    assert_eq!(
        verify(vector.msg_id, &[body, b" "].concat()),
        Err(VerifyError::NoMatchingSignature)
    );
}

#[test]
fn reference_vectors_from_the_standard_webhooks_repository() {
    for vector in &REFERENCE_VECTORS {
        check_vector(vector);
    }
}

#[test]
fn vectors_from_the_official_python_package() {
    // Guards against the literal being re-encoded (say, to NFD) and no longer being the bytes
    // Python signed: `len('{"name":"Zoë ..."}'.encode())` is 66.
    assert_eq!(PYTHON_VECTORS[1].body.len(), 66);
    for vector in &PYTHON_VECTORS {
        check_vector(vector);
    }
}

/// The rejection cases of the reference test suites (`libraries/python/tests/test_webhooks.py`,
/// `libraries/javascript/src/webhook.test.ts`, `libraries/rust/src/lib.rs`), replayed on the
/// first reference vector.
#[test]
fn reference_rejections() {
    let vector = &REFERENCE_VECTORS[0];
    let keys = standard_keyring(vector.secret);
    let verify = |msg_id: &str, timestamp: &str, header: &str, now_secs: i64| {
        keys.verify_standard(
            msg_id,
            timestamp,
            header,
            vector.body.as_bytes(),
            now_secs,
            TOLERANCE_SECS,
        )
    };
    let ts = vector.timestamp_secs;
    let timestamp = ts.to_string();
    let valid = vector.signature;

    // "multi sig payload is valid": foreign versions and wrong v1 entries around the valid one.
    let decoy = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=";
    let foreign = "v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=";
    let multi = format!("{decoy} {foreign} {valid} {decoy}");
    assert_eq!(verify(vector.msg_id, &timestamp, &multi, ts), Ok(()));
    assert_eq!(
        verify(
            vector.msg_id,
            &timestamp,
            &format!("{decoy} {foreign} {decoy}"),
            ts
        ),
        Err(VerifyError::NoMatchingSignature)
    );
    // "invalid signature": the last base64 character changed.
    assert_eq!(
        verify(
            vector.msg_id,
            &timestamp,
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA=",
            ts
        ),
        Err(VerifyError::NoMatchingSignature)
    );
    // "partial signature": a truncated header and an empty v1 entry.
    for partial in [&valid[..8], "v1,"] {
        assert_eq!(
            verify(vector.msg_id, &timestamp, partial, ts),
            Err(VerifyError::NoMatchingSignature),
            "{partial}"
        );
    }
    // "missing id / timestamp / signature".
    assert_eq!(
        verify("", &timestamp, valid, ts),
        Err(VerifyError::MissingHeader)
    );
    assert_eq!(
        verify(vector.msg_id, "", valid, ts),
        Err(VerifyError::MissingHeader)
    );
    assert_eq!(
        verify(vector.msg_id, &timestamp, "", ts),
        Err(VerifyError::MissingHeader)
    );
    // "invalid timestamp".
    assert_eq!(
        verify(vector.msg_id, "hello", valid, ts),
        Err(VerifyError::InvalidTimestamp)
    );
    // "old / new timestamp fails": one second beyond the tolerance either way.
    assert_eq!(
        verify(vector.msg_id, &timestamp, valid, ts + TOLERANCE_SECS + 1),
        Err(VerifyError::TimestampTooOld)
    );
    assert_eq!(
        verify(vector.msg_id, &timestamp, valid, ts - TOLERANCE_SECS - 1),
        Err(VerifyError::TimestampTooNew)
    );
    // "test_no_verify" of the Rust library.
    let rust = &REFERENCE_VECTORS[1];
    assert_eq!(
        standard_keyring(rust.secret).verify_standard(
            rust.msg_id,
            &rust.timestamp_secs.to_string(),
            "v1,R3PTzyfHASBKHH98a7yexTwaJ4yNIcGhFQc1yuN+BPU=",
            rust.body.as_bytes(),
            rust.timestamp_secs,
            TOLERANCE_SECS,
        ),
        Err(VerifyError::NoMatchingSignature)
    );
}

/// The reference libraries accept a secret without `whsec_`; PROTOCOL.md §3 does not, so that
/// a hex-scheme secret configured under the wrong scheme fails at startup instead of signing
/// with different key bytes than the receiver expects.
#[test]
fn standard_secrets_require_the_prefix() {
    assert_eq!(
        Keyring::parse(
            SigningScheme::StandardWebhooks,
            &Secret::new("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
        )
        .map(|keys| keys.len()),
        Err(SigningError::MissingPrefix { position: 1 })
    );
}

fn run_official_verify(input: &str) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the protocol crate lives inside the workspace")
        .join("protocol/tests/official_verify.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| {
            panic!(
                "cannot run python3 {} ({error}); this test needs python3 and \
                 `pip install standardwebhooks`",
                script.display()
            )
        });
    // A write error means the script exited early (say, on ImportError); its stderr explains
    // why better than the broken pipe does, so report the write error only if the run passed.
    let written = child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(input.as_bytes());
    let output = child.wait_with_output().expect("python3 ran to completion");
    if output.status.success() {
        written.expect("the script read all of its input");
    }
    output
}

fn describe(output: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// One JSON line for `official_verify.py` per secret that should accept `signature`.
fn official_case(
    secret: &str,
    msg_id: &str,
    timestamp_secs: i64,
    body: &str,
    signature: &str,
) -> String {
    serde_json::json!({
        "secret": secret,
        "msg_id": msg_id,
        "timestamp": timestamp_secs.to_string(),
        "body": body,
        "signature": signature,
    })
    .to_string()
}

#[test]
fn official_python_receiver_accepts_our_signatures() {
    let now_secs = now_secs();
    let key_lengths = [1usize, 24, 25, 32, 100];
    let secrets: Vec<String> = key_lengths
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            let key: Vec<u8> = (0..len).map(|j| (j * 37 + i * 101 + 7) as u8).collect();
            // 25 bytes need padding; leave it off to check that both sides accept that form.
            if len == 25 {
                format!("whsec_{}", STANDARD_NO_PAD.encode(&key))
            } else {
                whsec(&key)
            }
        })
        .collect();
    let msg_ids = [
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "evt_01J9Z3K8Q2:resync",
        "a",
        "id.with.dots",
        &"x".repeat(128),
    ];
    let large_body = format!(r#"{{"blob":"{}"}}"#, "ab.c ".repeat(64 * 1024 / 5));
    let bodies = [
        "",
        "{}",
        r#"{"type":"user.updated","data":{"email":"ada@example.com","name":"Ada"}}"#,
        r#"{"name":"Zoë Ñandú","city":"東京","note":"🎉"}"#,
        "line one.\nline two.\r\n\ttabbed \"quoted\" \\ backslash",
        &large_body,
    ];
    let offsets_secs = [0, -60, 60];

    let mut lines = Vec::new();
    for i in 0..16 {
        let secret = &secrets[i % secrets.len()];
        let msg_id = msg_ids[i % msg_ids.len()];
        let body = bodies[i % bodies.len()];
        let timestamp_secs = now_secs + offsets_secs[i % offsets_secs.len()];
        let keys = standard_keyring(secret);
        let signature = keys.sign_standard(msg_id, timestamp_secs, body.as_bytes());
        lines.push(official_case(
            secret,
            msg_id,
            timestamp_secs,
            body,
            &signature,
        ));
    }
    // Rotation: one header carrying both signatures must satisfy a receiver holding either.
    for (msg_id, body) in [("evt_rotation_1", bodies[2]), ("evt_rotation_2", bodies[3])] {
        let (newest, oldest) = (&secrets[3], &secrets[1]);
        let keys = standard_keyring(&format!("{newest} {oldest}"));
        assert_eq!(keys.len(), 2);
        let signature = keys.sign_standard(msg_id, now_secs, body.as_bytes());
        assert_eq!(signature.split(' ').count(), 2, "{signature}");
        for secret in [newest, oldest] {
            lines.push(official_case(secret, msg_id, now_secs, body, &signature));
        }
    }
    assert_eq!(lines.len(), 20);

    let output = run_official_verify(&(lines.join("\n") + "\n"));
    assert!(
        output.status.success(),
        "the official standardwebhooks package rejected our signatures:\n{}",
        describe(&output)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("verified 20 signatures"),
        "{}",
        describe(&output)
    );
}

/// Without this, a script that passed everything (or verified nothing) would make the test
/// above pass vacuously.
#[test]
fn official_python_receiver_rejects_a_tampered_signature() {
    let now_secs = now_secs();
    let secret = whsec(b"tamper-check-key");
    let keys = standard_keyring(&secret);
    let signature = keys.sign_standard("msg_tampered", now_secs, b"{}");
    let good = official_case(&secret, "msg_tampered", now_secs, "{}", &signature);
    let bad = official_case(&secret, "msg_tampered", now_secs, "{ }", &signature);
    let output = run_official_verify(&format!("{good}\n{bad}\n"));
    assert!(!output.status.success(), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("line 2") && stderr.contains("No matching signature"),
        "{}",
        describe(&output)
    );
    assert!(!stderr.contains(&secret), "the script printed the secret");
}

fn arb_key() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 1..64)
}

fn arb_msg_id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_:.-]{1,64}"
}

fn arb_body() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..512)
}

/// Replaces the byte at `index` with `replacement`, which must differ from it.
fn replace_byte(s: &str, index: prop::sample::Index, replacement: u8) -> Option<String> {
    let mut bytes = s.as_bytes().to_vec();
    let i = index.index(bytes.len());
    if bytes[i] == replacement {
        return None;
    }
    bytes[i] = replacement;
    String::from_utf8(bytes).ok()
}

proptest! {
    #[test]
    fn any_single_byte_change_of_the_id_fails(
        key in arb_key(),
        msg_id in arb_msg_id(),
        timestamp_secs in 0i64..10_000_000_000,
        body in arb_body(),
        index in any::<prop::sample::Index>(),
        replacement in 0x21u8..0x7f,
    ) {
        let keys = standard_keyring(&whsec(&key));
        let signature = keys.sign_standard(&msg_id, timestamp_secs, &body);
        let changed = replace_byte(&msg_id, index, replacement);
        prop_assume!(changed.is_some());
        let changed = changed.unwrap_or_default();
        prop_assert_eq!(
            keys.verify_standard(&changed, &timestamp_secs.to_string(), &signature, &body, timestamp_secs, TOLERANCE_SECS),
            Err(VerifyError::NoMatchingSignature)
        );
    }

    #[test]
    fn any_single_byte_change_of_the_timestamp_fails(
        key in arb_key(),
        msg_id in arb_msg_id(),
        timestamp_secs in -10_000_000_000i64..10_000_000_000,
        body in arb_body(),
        index in any::<prop::sample::Index>(),
        replacement in 0x20u8..0x7f,
    ) {
        let keys = standard_keyring(&whsec(&key));
        let signature = keys.sign_standard(&msg_id, timestamp_secs, &body);
        let changed = replace_byte(&timestamp_secs.to_string(), index, replacement);
        prop_assume!(changed.is_some());
        let changed = changed.unwrap_or_default();
        // Whatever the change did (a different second, a malformed value, a time outside the
        // tolerance), the request must not verify.
        prop_assert!(
            keys.verify_standard(&msg_id, &changed, &signature, &body, timestamp_secs, TOLERANCE_SECS).is_err(),
            "{} verified in place of {}", changed, timestamp_secs
        );
    }

    #[test]
    fn any_single_byte_change_of_the_body_fails(
        key in arb_key(),
        msg_id in arb_msg_id(),
        timestamp_secs in 0i64..10_000_000_000,
        body in prop::collection::vec(any::<u8>(), 1..512),
        index in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let keys = standard_keyring(&whsec(&key));
        let signature = keys.sign_standard(&msg_id, timestamp_secs, &body);
        let mut changed = body.clone();
        changed[index.index(body.len())] ^= flip;
        prop_assert_eq!(
            keys.verify_standard(&msg_id, &timestamp_secs.to_string(), &signature, &changed, timestamp_secs, TOLERANCE_SECS),
            Err(VerifyError::NoMatchingSignature)
        );
        prop_assert_eq!(
            keys.verify_hex(&keys.sign_hex(&body), &changed),
            Err(VerifyError::NoMatchingSignature)
        );
    }

    #[test]
    fn timestamps_pass_inside_the_tolerance_and_fail_outside(
        key in arb_key(),
        age_secs in -2_000i64..2_000,
        tolerance_secs in 0i64..1_000,
        now_secs in -10_000_000_000i64..10_000_000_000,
    ) {
        let keys = standard_keyring(&whsec(&key));
        let timestamp_secs = now_secs - age_secs;
        let signature = keys.sign_standard("msg", timestamp_secs, b"{}");
        let expected = if age_secs > tolerance_secs {
            Err(VerifyError::TimestampTooOld)
        } else if -age_secs > tolerance_secs {
            Err(VerifyError::TimestampTooNew)
        } else {
            Ok(())
        };
        prop_assert_eq!(
            keys.verify_standard("msg", &timestamp_secs.to_string(), &signature, b"{}", now_secs, tolerance_secs),
            expected
        );
    }

    #[test]
    fn during_rotation_either_key_verifies(
        newest in arb_key(),
        oldest in arb_key(),
        stranger in arb_key(),
        msg_id in arb_msg_id(),
        body in arb_body(),
    ) {
        prop_assume!(newest != oldest && stranger != newest && stranger != oldest);
        let both = standard_keyring(&format!("{} {}", whsec(&newest), whsec(&oldest)));
        let only_newest = standard_keyring(&whsec(&newest));
        let only_oldest = standard_keyring(&whsec(&oldest));
        let only_stranger = standard_keyring(&whsec(&stranger));
        let ts = 1_700_000_000i64;
        let timestamp = ts.to_string();
        let verify = |keys: &Keyring, header: &str| {
            keys.verify_standard(&msg_id, &timestamp, header, &body, ts, TOLERANCE_SECS)
        };

        // A receiver holding both accepts a sender that has moved to either key.
        prop_assert_eq!(verify(&both, &only_newest.sign_standard(&msg_id, ts, &body)), Ok(()));
        prop_assert_eq!(verify(&both, &only_oldest.sign_standard(&msg_id, ts, &body)), Ok(()));
        // A sender holding both satisfies a receiver holding either.
        let header = both.sign_standard(&msg_id, ts, &body);
        prop_assert_eq!(verify(&only_newest, &header), Ok(()));
        prop_assert_eq!(verify(&only_oldest, &header), Ok(()));
        prop_assert_eq!(verify(&only_stranger, &header), Err(VerifyError::NoMatchingSignature));
        // The hex header carries the newest key's signature, and a receiver with both accepts
        // either key's.
        prop_assert_eq!(both.sign_hex(&body), only_newest.sign_hex(&body));
        prop_assert_eq!(both.verify_hex(&only_oldest.sign_hex(&body), &body), Ok(()));
        prop_assert_eq!(
            only_stranger.verify_hex(&both.sign_hex(&body), &body),
            Err(VerifyError::NoMatchingSignature)
        );
    }

    #[test]
    fn sign_then_verify_round_trips(
        key in arb_key(),
        msg_id in arb_msg_id(),
        timestamp_secs in any::<i64>(),
        body in arb_body(),
        hex_secret in "[!-~]{1,40}",
    ) {
        let keys = standard_keyring(&whsec(&key));
        let signature = keys.sign_standard(&msg_id, timestamp_secs, &body);
        prop_assert_eq!(
            keys.verify_standard(&msg_id, &timestamp_secs.to_string(), &signature, &body, timestamp_secs, 0),
            Ok(())
        );
        let hex_keys = Keyring::parse(SigningScheme::HmacSha256Hex, &Secret::new(hex_secret))
            .expect("a non-blank secret is a valid hex-scheme key");
        let hex = hex_keys.sign_hex(&body);
        prop_assert_eq!(hex.len(), 64);
        prop_assert_eq!(&hex, &hex.to_lowercase());
        prop_assert_eq!(hex_keys.verify_hex(&hex, &body), Ok(()));
        prop_assert_eq!(hex_keys.verify_hex(&hex.to_uppercase(), &body), Ok(()));
    }

    #[test]
    fn arbitrary_input_never_panics(
        value in ".{0,200}",
        msg_id in ".{0,40}",
        timestamp in ".{0,24}",
        header in ".{0,200}",
        body in arb_body(),
        now_secs in any::<i64>(),
        tolerance_secs in any::<i64>(),
    ) {
        for scheme in SigningScheme::ALL {
            if let Ok(keys) = Keyring::parse(scheme, &Secret::new(value.clone())) {
                prop_assert!((1..=protocol::signing::SECRETS_MAX).contains(&keys.len()));
            }
        }
        let keys = standard_keyring("whsec_a2V5");
        let _ = keys.verify_standard(&msg_id, &timestamp, &header, &body, now_secs, tolerance_secs);
        let _ = keys.verify_hex(&header, &body);
    }
}
