//! Signed HTTP ingest against the real NATS: what each kind of request is answered, and that an
//! accepted one reaches the other side through the stream.

use std::time::Duration;

use protocol::signing::{Keyring, SigningScheme};
use protocol::Secret;
use serde_json::{json, Value};
use tests::env::{now_ms, EnvOptions, TestEnv};
use tests::receiver::Receiver;
use tests::TEST_SECRET;
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(30);

/// Ingest on, verifying with the same secret the test's targets use.
fn options() -> EnvOptions {
    let extra = "[ingest]\nenabled = true\nsigning = \"standard-webhooks\"\n\
         better_auth_secret_env = \"TEST_BETTER_AUTH_SECRET\"\npayload_secret_env = \"TEST_PAYLOAD_SECRET\"\n\
         tolerance = \"5m\"\nmax_body_bytes = 2048\n"
        .to_string();
    EnvOptions {
        extra_toml: extra,
        ..EnvOptions::default()
    }
}

fn keyring() -> Keyring {
    Keyring::parse(SigningScheme::StandardWebhooks, &Secret::new(TEST_SECRET)).expect("secret")
}

fn envelope(id: &str, origin: &str, user: &str) -> Value {
    let data = if origin == "better-auth" {
        json!({"id": user, "email": format!("{user}@example.com"), "name": "Ingested"})
    } else {
        json!({"betterAuthUserId": user, "email": format!("{user}@example.com"), "fullName": "Ingested"})
    };
    json!({"id": id, "origin": origin, "type": "user.created", "timestamp": now_ms(), "data": data})
}

struct Request {
    path: &'static str,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// A request signed the Standard Webhooks way.
fn signed(path: &'static str, body: &Value) -> Request {
    let body = body.to_string().into_bytes();
    let id = "msg_ingest";
    let ts = now_ms() / 1000;
    let signature = keyring().sign_standard(id, ts, &body);
    Request {
        path,
        headers: vec![
            ("webhook-id".into(), id.into()),
            ("webhook-timestamp".into(), ts.to_string()),
            ("webhook-signature".into(), signature),
        ],
        body,
    }
}

async fn send(env: &TestEnv, request: &Request) -> (u16, Value) {
    let client = reqwest::Client::new();
    let mut builder = client
        .post(format!("http://{}{}", env.http, request.path))
        .header("content-type", "application/json")
        .body(request.body.clone());
    for (k, v) in &request.headers {
        builder = builder.header(k.as_str(), v.as_str());
    }
    let response = builder.send().await.expect("ingest request");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    (status, body)
}

fn header_mut<'a>(request: &'a mut Request, name: &str) -> &'a mut String {
    &mut request
        .headers
        .iter_mut()
        .find(|(k, _)| k == name)
        .expect("header present")
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_of_request_gets_its_answer_and_a_valid_one_reaches_the_target() {
    let payload = Receiver::start(TEST_SECRET).await;
    let better_auth = Receiver::start(TEST_SECRET).await;
    let mut env = TestEnv::new(&payload.url, &better_auth.url, options()).await;
    env.start_engine().await;

    let valid = signed(
        "/ingest/better-auth",
        &envelope("ing-1", "better-auth", "u1"),
    );
    let (status, body) = send(&env, &valid).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["id"], "ing-1");
    let delivered = payload.wait_accepted(WAIT, |r| !r.is_empty()).await;
    assert_eq!(delivered[0].webhook_id(), "ing-1");
    assert_eq!(delivered[0].data("betterAuthUserId"), "u1");

    let (status, _) = send(
        &env,
        &signed("/ingest/payload", &envelope("ing-2", "payload", "u2")),
    )
    .await;
    assert_eq!(status, 202);
    better_auth.wait_accepted(WAIT, |r| !r.is_empty()).await;

    let mut tampered_body = signed(
        "/ingest/better-auth",
        &envelope("ing-3", "better-auth", "u3"),
    );
    tampered_body.body = envelope("ing-3", "better-auth", "evil")
        .to_string()
        .into_bytes();
    let mut tampered_ts = signed(
        "/ingest/better-auth",
        &envelope("ing-4", "better-auth", "u4"),
    );
    *header_mut(&mut tampered_ts, "webhook-timestamp") = (now_ms() / 1000 - 1).to_string();
    let stale = {
        let body = envelope("ing-5", "better-auth", "u5")
            .to_string()
            .into_bytes();
        let ts = now_ms() / 1000 - 600;
        Request {
            path: "/ingest/better-auth",
            headers: vec![
                ("webhook-id".into(), "msg_stale".into()),
                ("webhook-timestamp".into(), ts.to_string()),
                (
                    "webhook-signature".into(),
                    keyring().sign_standard("msg_stale", ts, &body),
                ),
            ],
            body,
        }
    };
    let mut missing = signed(
        "/ingest/better-auth",
        &envelope("ing-6", "better-auth", "u6"),
    );
    missing.headers.retain(|(k, _)| k != "webhook-signature");
    let wrong_origin = signed("/ingest/payload", &envelope("ing-7", "better-auth", "u7"));
    let oversize = signed(
        "/ingest/better-auth",
        &json!({"id": "ing-8", "origin": "better-auth", "type": "user.created", "timestamp": now_ms(),
                "data": {"id": "u8", "email": "a@x", "name": "x".repeat(4096)}}),
    );
    let invalid = signed(
        "/ingest/better-auth",
        &json!({"id": "ing-9", "origin": "better-auth", "type": "user.renamed", "timestamp": now_ms(),
                "data": {"id": "u9"}}),
    );
    let cases = [
        ("tampered body", &tampered_body, 401, "invalid signature"),
        ("tampered timestamp", &tampered_ts, 401, "invalid signature"),
        ("stale timestamp", &stale, 401, "invalid signature"),
        ("missing header", &missing, 401, "invalid signature"),
        ("wrong origin", &wrong_origin, 400, "wrong_origin"),
        ("oversize", &oversize, 413, "too_large"),
        ("invalid envelope", &invalid, 400, "unknown_type"),
    ];
    for (what, request, expected, error) in cases {
        let (status, body) = send(&env, request).await;
        assert_eq!(status, expected, "{what}: {body}");
        assert_eq!(body["error"], error, "{what}");
    }
    // Nothing refused went anywhere.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(payload.received().len(), 1);
    assert_eq!(better_auth.received().len(), 1);
    let metric = |result: &str, origin: &str| {
        format!("sync_engine_ingest_requests_total{{origin=\"{origin}\",result=\"{result}\"}}")
    };
    assert_eq!(env.metric(&metric("accepted", "better-auth")).await, 1.0);
    assert_eq!(
        env.metric(&metric("unauthorized", "better-auth")).await,
        4.0
    );
    assert_eq!(env.metric(&metric("wrong_origin", "payload")).await, 1.0);
    assert_eq!(env.metric(&metric("too_large", "better-auth")).await, 1.0);
    assert_eq!(env.metric(&metric("invalid", "better-auth")).await, 1.0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_signed_by_the_official_standardwebhooks_package_is_accepted() {
    let payload = Receiver::start(TEST_SECRET).await;
    let better_auth = Receiver::start(TEST_SECRET).await;
    let mut env = TestEnv::new(&payload.url, &better_auth.url, options()).await;
    env.start_engine().await;
    let body = envelope("ing-py", "better-auth", "upy").to_string();
    let ts = now_ms() / 1000;
    let script = "import sys, datetime\nfrom standardwebhooks import Webhook\n\
        secret, msg_id, ts, body = sys.argv[1:5]\n\
        print(Webhook(secret).sign(msg_id, datetime.datetime.fromtimestamp(int(ts), tz=datetime.timezone.utc), body))";
    let output = std::process::Command::new("python3")
        .args(["-c", script, TEST_SECRET, "msg_py", &ts.to_string(), &body])
        .output()
        .expect("python3 must be installed, with `pip install standardwebhooks==1.1.0`");
    assert!(
        output.status.success(),
        "the official standardwebhooks package is needed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let signature = String::from_utf8_lossy(&output.stdout).trim().to_string();
    assert!(signature.starts_with("v1,"), "{signature}");
    let request = Request {
        path: "/ingest/better-auth",
        headers: vec![
            ("webhook-id".into(), "msg_py".into()),
            ("webhook-timestamp".into(), ts.to_string()),
            ("webhook-signature".into(), signature),
        ],
        body: body.into_bytes(),
    };
    let (status, body) = send(&env, &request).await;
    assert_eq!(status, 202, "{body}");
    payload.wait_accepted(WAIT, |r| !r.is_empty()).await;
    env.cleanup().await;
}

/// A TCP relay to NATS that the test can cut, standing in for a NATS outage.
struct Relay {
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start() -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let mut links = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                links.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect("127.0.0.1:4222").await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Relay { addr, task }
    }

    /// Stops listening and drops every relayed connection (the JoinSet goes with the task).
    fn cut(self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_nats_unreachable_a_request_gets_503_and_nothing_is_stored() {
    let relay = Relay::start().await;
    let payload = Receiver::start(TEST_SECRET).await;
    let better_auth = Receiver::start(TEST_SECRET).await;
    let mut env = TestEnv::new(&payload.url, &better_auth.url, options()).await;
    let config = std::fs::read_to_string(&env.config_path).expect("config");
    std::fs::write(
        &env.config_path,
        config.replace(
            "url = \"nats://127.0.0.1:4222\"",
            &format!("url = \"nats://{}\"", relay.addr),
        ),
    )
    .expect("patch config");
    env.start_engine().await;
    let (status, _) = send(
        &env,
        &signed(
            "/ingest/better-auth",
            &envelope("ing-up", "better-auth", "u1"),
        ),
    )
    .await;
    assert_eq!(status, 202, "through the relay while it is up");

    relay.cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = send(
        &env,
        &signed(
            "/ingest/better-auth",
            &envelope("ing-down", "better-auth", "u2"),
        ),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "nats_unavailable");
    // The stream, read directly, holds only the first event.
    let mut stream = env
        .js
        .get_stream(&env.stream_of(protocol::Origin::BetterAuth))
        .await
        .expect("stream");
    let info = stream.info().await.expect("stream info");
    assert_eq!(info.state.messages, 1, "the refused event was not stored");
    env.cleanup().await;
}
