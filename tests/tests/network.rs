//! Every connection the engine opens, on a real network's terms: HTTPS targets (a private CA,
//! mutual TLS, a CA that does not verify), redirects never followed, NATS with TLS and
//! user/password or a token, NATS refusing credentials or down at startup, Redis over TLS with
//! a password, PostgreSQL over TLS for the store and the mirror, and the engine's own HTTP
//! edges. The servers with TLS or authentication are the test's own (`tests::servers`); no
//! secret a test uses may appear in anything the engine printed.

use std::path::Path;
use std::time::{Duration, Instant};

use protocol::{EventType, Origin};
use serde_json::{json, Value};
use tests::env::{eventually, now_ms, EnvOptions, TestEnv};
use tests::receiver::Receiver;
use tests::relay::Relay;
use tests::servers::{NatsServer, PostgresCluster, RedisServer, TestPki};
use tests::TEST_SECRET;

const BA: Origin = Origin::BetterAuth;
const WAIT: Duration = Duration::from_secs(30);

/// A path as a TOML string.
fn toml_path(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

/// Publishes `n` Better Auth users `u0..` for Payload.
async fn publish_users(env: &TestEnv, n: usize) {
    let t = now_ms();
    for i in 0..n {
        env.publish(
            &format!("evt-{i}"),
            BA,
            EventType::Created,
            t + i as i64,
            json!({"id": format!("u{i}"), "email": format!("u{i}@example.com"), "name": format!("User {i}")}),
        )
        .await;
    }
}

/// Fails when any of `secrets` appears in `text`, naming where.
fn assert_no_secret(what: &str, text: &str, secrets: &[&str]) {
    for secret in secrets {
        assert!(
            !text.contains(secret),
            "{what} shows a secret the test used ({} characters long)",
            secret.len()
        );
    }
}

/// Waits for the first dead letter and returns it.
async fn first_dead_letter(env: &TestEnv) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(letter) = env.dead_letters().into_iter().next() {
            return letter;
        }
        assert!(
            Instant::now() < deadline,
            "no dead letter within {WAIT:?}:\n{}",
            env.engine_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_target_behind_mutual_tls_with_a_private_ca_gets_verified_deliveries() {
    let pki = TestPki::new();
    let payload = Receiver::start_tls(
        TEST_SECRET,
        &pki.server_cert_file,
        &pki.server_key_file,
        Some(&pki.ca_file),
    )
    .await;
    let better_auth = Receiver::start(TEST_SECRET).await;
    let options = EnvOptions {
        payload_toml: format!(
            "ca_file = {}\nclient_cert_file = {}\nclient_key_file = {}\n",
            toml_path(&pki.ca_file),
            toml_path(&pki.client_cert_file),
            toml_path(&pki.client_key_file)
        ),
        ..Default::default()
    };
    let mut env = TestEnv::new(&payload.url, &better_auth.url, options).await;
    assert!(payload.url.starts_with("https://"));
    env.start_engine().await;
    publish_users(&env, 3).await;
    let got = payload.wait_accepted(WAIT, |r| r.len() >= 3).await;
    assert!(got.iter().all(|r| r.verified), "every delivery verifies");
    let mut users: Vec<String> = got
        .iter()
        .map(|r| {
            r.data("betterAuthUserId")
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    users.sort();
    assert_eq!(users, ["u0", "u1", "u2"]);
    assert!(env.dead_letters().is_empty());
    env.cleanup().await;

    // Without its client certificate the engine is refused, and says why.
    let options = EnvOptions {
        max_attempts: 1,
        payload_toml: format!("ca_file = {}\n", toml_path(&pki.ca_file)),
        ..Default::default()
    };
    let mut env = TestEnv::new(&payload.url, &better_auth.url, options).await;
    env.start_engine().await;
    publish_users(&env, 1).await;
    let letter = first_dead_letter(&env).await;
    let error = letter["last_error"].as_str().unwrap_or_default();
    println!("without a client certificate: {error}");
    assert!(error.contains("CertificateRequired"), "{error}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_does_not_verify_is_a_clear_tls_error_and_never_plain_text() {
    let pki = TestPki::new();
    let payload = Receiver::start_tls(
        TEST_SECRET,
        &pki.server_cert_file,
        &pki.server_key_file,
        None,
    )
    .await;
    let better_auth = Receiver::start(TEST_SECRET).await;
    let options = EnvOptions {
        max_attempts: 2,
        payload_toml: format!("ca_file = {}\n", toml_path(&pki.other_ca_file)),
        ..Default::default()
    };
    let mut env = TestEnv::new(&payload.url, &better_auth.url, options).await;
    env.start_engine().await;
    publish_users(&env, 1).await;
    let letter = first_dead_letter(&env).await;
    let error = letter["last_error"].as_str().unwrap_or_default();
    assert_eq!(letter["reason"], "delivery_failed", "{letter}");
    assert!(
        error.contains("tls: invalid peer certificate"),
        "last_error names the TLS failure: {error}"
    );
    assert!(
        payload.received().is_empty(),
        "nothing reached the receiver"
    );
    let log = env.engine_log();
    assert!(log.contains("tls: invalid peer certificate"), "{log}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_system_trust_store_is_used_and_honours_ssl_cert_file() {
    let pki = TestPki::new();
    let payload = Receiver::start_tls(
        TEST_SECRET,
        &pki.server_cert_file,
        &pki.server_key_file,
        None,
    )
    .await;
    let better_auth = Receiver::start(TEST_SECRET).await;
    // No ca_file: the roots come from the system store, which SSL_CERT_FILE replaces.
    let options = EnvOptions {
        env: vec![("SSL_CERT_FILE".into(), pki.ca_file.display().to_string())],
        ..Default::default()
    };
    let mut env = TestEnv::new(&payload.url, &better_auth.url, options).await;
    env.start_engine().await;
    publish_users(&env, 1).await;
    let got = payload.wait_accepted(WAIT, |r| !r.is_empty()).await;
    assert!(got[0].verified);
    env.cleanup().await;
}

/// A target that answers every request with a redirect to `to`.
async fn redirecting_target(to: String) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let to = to.clone();
            async move { (axum::http::StatusCode::FOUND, [("location", to)], "moved") }
        }),
    );
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/hook"), server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_never_followed_and_dead_letters_the_delivery() {
    let elsewhere = Receiver::start(TEST_SECRET).await;
    let (redirecting, server) = redirecting_target(elsewhere.url.clone()).await;
    let better_auth = Receiver::start(TEST_SECRET).await;
    let mut env = TestEnv::new(&redirecting, &better_auth.url, EnvOptions::default()).await;
    env.start_engine().await;
    publish_users(&env, 1).await;
    let letter = first_dead_letter(&env).await;
    assert_eq!(letter["reason"], "delivery_rejected", "{letter}");
    assert_eq!(letter["attempts"], 1, "a 3xx is not retried: {letter}");
    let error = letter["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("302"), "{error}");
    assert!(
        error.contains(&elsewhere.url),
        "names the Location: {error}"
    );
    assert!(
        elsewhere.received().is_empty(),
        "the redirect's target received nothing"
    );
    let counted = env
        .metric("sync_engine_deliveries_total{sink=\"payload\",status=\"3xx\"}")
        .await;
    assert_eq!(counted, 1.0);
    server.abort();
    env.cleanup().await;
}

/// An answer whose body never ends: only its first 64 KiB are read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_answer_is_cut_after_its_first_64_kib() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(|| async {
            let chunk = bytes::Bytes::from(vec![b'x'; 16 * 1024]);
            let endless = futures::stream::repeat_with(move || {
                Ok::<_, std::convert::Infallible>(chunk.clone())
            });
            (
                axum::http::StatusCode::BAD_REQUEST,
                axum::body::Body::from_stream(endless),
            )
        }),
    );
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let better_auth = Receiver::start(TEST_SECRET).await;
    let options = EnvOptions {
        // The target's timeout is 2 s: an engine reading on would time out, retry, and end
        // with delivery_failed instead.
        max_attempts: 3,
        ..Default::default()
    };
    let mut env = TestEnv::new(&format!("http://{addr}/hook"), &better_auth.url, options).await;
    env.start_engine().await;
    publish_users(&env, 1).await;
    let letter = first_dead_letter(&env).await;
    assert_eq!(letter["reason"], "delivery_rejected", "{letter}");
    assert_eq!(letter["attempts"], 1, "{letter}");
    assert!(letter["last_error"]
        .as_str()
        .unwrap_or_default()
        .starts_with("http 400: xxxx"));
    server.abort();
    env.cleanup().await;
}

/// The engine on a NATS of the test's own, reached with `options`; returns the world.
async fn world_on(
    nats: &NatsServer,
    client: async_nats::Client,
    options: EnvOptions,
) -> (Receiver, Receiver, TestEnv) {
    let payload = Receiver::start(TEST_SECRET).await;
    let better_auth = Receiver::start(TEST_SECRET).await;
    let options = EnvOptions {
        nats_url: options.nats_url.clone().or_else(|| Some(nats.url())),
        ..options
    };
    let env = TestEnv::with_client(&payload.url, &better_auth.url, options, client);
    (payload, better_auth, env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_with_tls_and_user_password() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pki = TestPki::new();
    let password = "nats-pw-5f1c9a7e2b";
    let nats = NatsServer::start_tls_user_password(&pki, "engine", password);
    let url = format!("tls://127.0.0.1:{}", nats.port);
    let client =
        async_nats::ConnectOptions::with_user_and_password("engine".into(), password.into())
            .add_root_certificates(pki.ca_file.clone())
            .require_tls(true)
            .connect(&url)
            .await
            .expect("the test's own client connects");
    let options = EnvOptions {
        nats_url: Some(url),
        nats_toml: format!(
            "user = \"engine\"\npassword_env = \"TEST_NATS_PASSWORD\"\ntls_required = true\nca_file = {}\n",
            toml_path(&pki.ca_file)
        ),
        env: vec![("TEST_NATS_PASSWORD".into(), password.into())],
        ..Default::default()
    };
    let (payload, _better_auth, mut env) = world_on(&nats, client, options).await;
    env.start_engine().await;
    publish_users(&env, 2).await;
    payload.wait_accepted(WAIT, |r| r.len() >= 2).await;
    let check = env
        .command(&["check-config"])
        .output()
        .expect("check-config");
    let (out, err) = tests::text(&check);
    assert!(check.status.success(), "{err}");
    assert!(
        out.contains("password from TEST_NATS_PASSWORD = [redacted]"),
        "{out}"
    );
    assert_no_secret("check-config", &format!("{out}{err}"), &[password]);
    env.kill_engine();
    assert_no_secret("the engine's log", &env.engine_log(), &[password]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_with_a_token() {
    let token = "nats-token-0b7d2e91c4a8";
    let nats = NatsServer::start_token(token);
    let client = async_nats::ConnectOptions::with_token(token.into())
        .connect(nats.url())
        .await
        .expect("the test's own client connects");
    let options = EnvOptions {
        nats_toml: "token_env = \"TEST_NATS_TOKEN\"\n".into(),
        env: vec![("TEST_NATS_TOKEN".into(), token.into())],
        ..Default::default()
    };
    let (payload, _better_auth, mut env) = world_on(&nats, client, options).await;
    env.start_engine().await;
    publish_users(&env, 2).await;
    payload.wait_accepted(WAIT, |r| r.len() >= 2).await;
    env.kill_engine();
    assert_no_secret("the engine's log", &env.engine_log(), &[token]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_with_an_nkey_seed_file() {
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().expect("seed");
    let nats = NatsServer::start(&format!(
        "authorization {{\n  users = [ {{ nkey: {:?} }} ]\n}}\n",
        user.public_key()
    ));
    let client = async_nats::ConnectOptions::with_nkey(seed.clone())
        .connect(nats.url())
        .await
        .expect("the test's own client connects");
    let dir = tempfile::tempdir().expect("dir");
    let seed_file = dir.path().join("engine.nk");
    std::fs::write(&seed_file, format!("{seed}\n")).expect("write the seed");
    let options = EnvOptions {
        nats_toml: format!("nkey_seed_file = {}\n", toml_path(&seed_file)),
        ..Default::default()
    };
    let (payload, _better_auth, mut env) = world_on(&nats, client, options).await;
    env.start_engine().await;
    publish_users(&env, 2).await;
    payload.wait_accepted(WAIT, |r| r.len() >= 2).await;
    env.kill_engine();
    assert_no_secret("the engine's log", &env.engine_log(), &[&seed]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_nats_credentials_end_run_at_once_naming_the_url() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pki = TestPki::new();
    let password = "right-pw-93b1f0c2d7";
    let wrong = "wrong-pw-4e8a6c1b5f";
    let nats = NatsServer::start_tls_user_password(&pki, "engine", password);
    let url = format!("tls://127.0.0.1:{}", nats.port);
    let client =
        async_nats::ConnectOptions::with_user_and_password("engine".into(), password.into())
            .add_root_certificates(pki.ca_file.clone())
            .connect(&url)
            .await
            .expect("the test's own client connects");
    let options = EnvOptions {
        nats_url: Some(url),
        nats_toml: format!(
            "user = \"engine\"\npassword_env = \"TEST_NATS_PASSWORD\"\nca_file = {}\n",
            toml_path(&pki.ca_file)
        ),
        env: vec![("TEST_NATS_PASSWORD".into(), wrong.into())],
        ..Default::default()
    };
    let (_payload, _better_auth, mut env) = world_on(&nats, client, options).await;
    let started = Instant::now();
    env.spawn_engine();
    let status = env.wait_engine_exit(Duration::from_secs(10));
    let took = started.elapsed();
    let log = env.engine_log();
    let status = status.unwrap_or_else(|| panic!("run still going after 10 s:\n{log}"));
    println!("refused credentials: run exited {status} after {took:?}");
    assert!(!status.success());
    assert!(log.contains("nats.url"), "{log}");
    assert!(log.contains("authorization violation"), "{log}");
    assert_no_secret("the engine's log", &log, &[password, wrong]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_down_at_startup_is_retried_with_a_warning_and_syncing_starts_when_it_is_up() {
    let relay = Relay::start("127.0.0.1:4222".parse().expect("addr")).await;
    relay.cut();
    let payload = Receiver::start(TEST_SECRET).await;
    let better_auth = Receiver::start(TEST_SECRET).await;
    let options = EnvOptions {
        nats_url: Some(relay.url("nats")),
        ..Default::default()
    };
    let mut env = TestEnv::new(&payload.url, &better_auth.url, options).await;
    env.spawn_engine();
    let relay_url = relay.url("nats");
    let started = Instant::now();
    eventually(WAIT, "a WARN naming the NATS url", || {
        env.engine_log().contains("Cannot reach NATS")
    })
    .await;
    assert_eq!(
        env.readyz().await,
        Some(503),
        "not ready while NATS is down"
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(env.readyz().await, Some(503));
    let log = env.engine_log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Cannot reach NATS"))
        .collect();
    assert!(warnings.iter().all(|l| l.contains(&relay_url)), "{log}");
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{} warnings in {elapsed:.1} s while NATS was down",
        warnings.len()
    );
    assert!(
        warnings.len() as f64 <= elapsed / 5.0 + 2.0,
        "a warning every few seconds, not a flood:\n{log}"
    );
    relay.restore();
    let restored = Instant::now();
    eventually(WAIT, "/readyz 200 once NATS is up", || {
        std::fs::read_to_string(env.dir.path().join("engine-1.log"))
            .unwrap_or_default()
            .contains("Engine running.")
    })
    .await;
    println!(
        "engine running {:?} after NATS came back",
        restored.elapsed()
    );
    assert_eq!(env.readyz().await, Some(200));
    publish_users(&env, 2).await;
    payload.wait_accepted(WAIT, |r| r.len() >= 2).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_with_a_password() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pki = TestPki::new();
    let password = "redis-pw-c81e2a9f04";
    let redis = RedisServer::start_tls(&pki, Some(password));
    let payload = Receiver::start(TEST_SECRET).await;
    let better_auth = Receiver::start(TEST_SECRET).await;
    let options = EnvOptions {
        dedup_redis: true,
        redis_url: Some(redis.url(None)),
        dedup_toml: format!(
            "redis_password_env = \"TEST_REDIS_PASSWORD\"\nredis_ca_file = {}\n",
            toml_path(&pki.ca_file)
        ),
        env: vec![("TEST_REDIS_PASSWORD".into(), password.into())],
        ..Default::default()
    };
    let mut env = TestEnv::new(&payload.url, &better_auth.url, options).await;
    env.start_engine().await;
    publish_users(&env, 3).await;
    payload.wait_accepted(WAIT, |r| r.len() >= 3).await;
    // The marks are in the test's own Redis, reached over TLS.
    let client = redis::Client::build_with_tls(
        redis.url(Some(password)),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pki.ca_pem()),
        },
    )
    .expect("client");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect over TLS");
    let pattern = format!("t{}:done:*", env.id);
    let mut keys: Vec<String> = Vec::new();
    let deadline = Instant::now() + WAIT;
    while keys.len() < 3 && Instant::now() < deadline {
        keys = redis::cmd("KEYS")
            .arg(&pattern)
            .query_async(&mut connection)
            .await
            .expect("KEYS");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(keys.len(), 3, "one dedup mark per event: {keys:?}");
    env.kill_engine();
    assert_no_secret("the engine's log", &env.engine_log(), &[password]);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_over_tls_for_the_store_and_the_mirror() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pki = TestPki::new();
    let cluster = PostgresCluster::start_ssl(&pki);
    let url = cluster.url(&format!(
        "sslmode=verify-full&sslrootcert={}",
        pki.ca_file.display()
    ));
    let payload = Receiver::start(TEST_SECRET).await;
    let better_auth = Receiver::start(TEST_SECRET).await;
    let options = EnvOptions {
        store_url: Some(url.clone()),
        extra_toml: format!("[mirror]\nenabled = true\nurl = {url:?}\ntable = \"mirror_users\"\n"),
        ..Default::default()
    };
    let mut env = TestEnv::new(&payload.url, &better_auth.url, options).await;
    env.start_engine().await;
    publish_users(&env, 3).await;
    payload.wait_accepted(WAIT, |r| r.len() >= 3).await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .expect("the test connects over TLS");
    let deadline = Instant::now() + WAIT;
    let mut mirrored = 0i64;
    while mirrored < 3 && Instant::now() < deadline {
        mirrored = sqlx::query_scalar("select count(*) from mirror_users")
            .fetch_one(&pool)
            .await
            .unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(mirrored, 3, "the mirror wrote every user");
    let states: i64 = sqlx::query_scalar("select count(*) from user_state")
        .fetch_one(&pool)
        .await
        .expect("the store's table is in the TLS cluster");
    assert!(states >= 3, "{states}");
    let encrypted: i64 = sqlx::query_scalar(
        "select count(*) from pg_stat_ssl s join pg_stat_activity a using (pid) \
         where a.datname = 'test' and a.pid <> pg_backend_pid() and not s.ssl",
    )
    .fetch_one(&pool)
    .await
    .expect("pg_stat_ssl");
    assert_eq!(encrypted, 0, "no connection without TLS");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_refusing_plain_text_or_a_wrong_ca_stops_startup_naming_store_url() {
    let pki = TestPki::new();
    let cluster = PostgresCluster::start_ssl(&pki);
    for (query, expected) in [
        ("sslmode=disable".to_string(), "no encryption"),
        (
            format!(
                "sslmode=verify-full&sslrootcert={}",
                pki.other_ca_file.display()
            ),
            "tls",
        ),
    ] {
        let payload = Receiver::start(TEST_SECRET).await;
        let options = EnvOptions {
            store_url: Some(cluster.url(&query)),
            ..Default::default()
        };
        let mut env = TestEnv::new(&payload.url, &payload.url, options).await;
        env.spawn_engine();
        let status = env.wait_engine_exit(Duration::from_secs(30));
        let log = env.engine_log();
        assert!(status.is_some_and(|s| !s.success()), "{query}: {log}");
        assert!(log.contains("store.url"), "{query}: {log}");
        assert!(
            log.to_lowercase().contains(expected),
            "{query}: expected {expected:?} in:\n{log}"
        );
        env.cleanup().await;
    }
}

#[test]
fn check_config_and_errors_never_show_a_password_in_a_url() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("config.toml");
    let secrets = [
        "pg-pw-81f3",
        "redis-pw-2c7a",
        "nats-pw-a91e",
        "mirror-pw-55d0",
    ];
    std::fs::write(
        &path,
        format!(
            r#"
[nats]
url = "nats://engine:{}@127.0.0.1:1"
[dedup]
backend = "redis"
redis_url = "rediss://sync:{}@127.0.0.1:1/0"
[store]
url = "postgres://sync:{}@127.0.0.1:1/sync?sslmode=require"
[mirror]
enabled = true
url = "postgres://mirror@127.0.0.1:1/app?password={}"
"#,
            secrets[2], secrets[1], secrets[0], secrets[3]
        ),
    )
    .expect("write");
    let mut check = tests::sync_engine();
    tests::with_default_secrets(&mut check)
        .args(["check-config", "--config"])
        .arg(&path);
    let output = check.output().expect("check-config");
    let (out, err) = tests::text(&output);
    assert!(output.status.success(), "{err}");
    assert!(
        out.contains("postgres://sync:[redacted]@127.0.0.1:1/sync"),
        "{out}"
    );
    assert!(
        out.contains("rediss://sync:[redacted]@127.0.0.1:1/0"),
        "{out}"
    );
    assert!(out.contains("password=[redacted]"), "{out}");
    assert_no_secret("check-config", &format!("{out}{err}"), &secrets);

    // A run that cannot reach them prints errors and warnings, still without a password.
    let mut run = tests::sync_engine();
    tests::with_default_secrets(&mut run)
        .args(["run", "--config"])
        .arg(&path)
        .env("SYNC_ENGINE__HTTP__LISTEN", "127.0.0.1:0")
        .env(
            "SYNC_ENGINE__NATS__URL",
            format!("nats://engine:{}@127.0.0.1:9", secrets[2]),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = run.spawn().expect("run");
    std::thread::sleep(Duration::from_secs(3));
    let _ = child.kill();
    let output = child.wait_with_output().expect("output");
    let (out, err) = tests::text(&output);
    assert!(err.contains("Cannot reach NATS"), "{err}");
    assert!(
        err.contains("nats://engine:[redacted]@127.0.0.1:9"),
        "{err}"
    );
    assert_no_secret("run", &format!("{out}{err}"), &secrets);
}

#[test]
fn a_missing_or_empty_ca_file_is_refused_by_check_config_naming_the_key() {
    let dir = tempfile::tempdir().expect("dir");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").expect("write");
    for (key, value, expected) in [
        (
            "targets.payload.ca_file",
            "/nonexistent/ca.pem",
            "cannot read",
        ),
        (
            "targets.payload.ca_file",
            empty.to_str().unwrap_or_default(),
            "holds no PEM certificate",
        ),
        ("nats.ca_file", "/nonexistent/ca.pem", "cannot read"),
        ("dedup.redis_ca_file", "/nonexistent/ca.pem", "cannot read"),
    ] {
        let path = dir.path().join("config.toml");
        let (table, field) = key.rsplit_once('.').unwrap_or_default();
        let mut text = format!("[{table}]\n{field} = {value:?}\n");
        if table == "targets.payload" {
            text.push_str("url = \"https://127.0.0.1:3001/hook\"\n");
        }
        if table == "dedup" {
            text.push_str("backend = \"redis\"\nredis_url = \"rediss://127.0.0.1:6380\"\n");
        }
        std::fs::write(&path, text).expect("write");
        let mut check = tests::sync_engine();
        tests::with_default_secrets(&mut check)
            .args(["check-config", "--config"])
            .arg(&path);
        let output = check.output().expect("check-config");
        let (_, err) = tests::text(&output);
        assert!(!output.status.success(), "{key} = {value}: accepted");
        assert!(err.contains(&format!("`{key}`")), "{key}: {err}");
        assert!(err.contains(expected), "{key}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_listeners_time_out_slow_clients_and_the_ingest_can_listen_apart() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let payload = Receiver::start(TEST_SECRET).await;
    let better_auth = Receiver::start(TEST_SECRET).await;
    let ingest_addr = format!("127.0.0.1:{}", tests::servers::free_port());
    let options = EnvOptions {
        extra_toml: format!(
            "[ingest]\nenabled = true\nlisten = {ingest_addr:?}\nbetter_auth_secret_env = \"TEST_BETTER_AUTH_SECRET\"\npayload_secret_env = \"TEST_PAYLOAD_SECRET\"\n"
        ),
        ..Default::default()
    };
    let mut env = TestEnv::new(&payload.url, &better_auth.url, options).await;
    env.start_engine().await;
    let http = reqwest::Client::new();
    let status = |url: String, post: bool| {
        let http = http.clone();
        async move {
            let request = if post {
                http.post(url).body("{}")
            } else {
                http.get(url)
            };
            request
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    // The ingest is on its own address, and only there; /metrics stays on http.listen.
    assert_eq!(
        status(format!("http://{ingest_addr}/ingest/better-auth"), true).await,
        401
    );
    assert_eq!(
        status(format!("http://{}/ingest/better-auth", env.http), true).await,
        404
    );
    assert_eq!(
        status(format!("http://{ingest_addr}/metrics"), false).await,
        404
    );
    assert_eq!(
        status(format!("http://{}/metrics", env.http), false).await,
        200
    );

    // Headers that never end, and a body that never comes.
    let started = Instant::now();
    let mut headers = tokio::net::TcpStream::connect(env.http)
        .await
        .expect("connect");
    headers
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n")
        .await
        .expect("write");
    let mut body = tokio::net::TcpStream::connect(&ingest_addr)
        .await
        .expect("connect");
    body.write_all(
        b"POST /ingest/better-auth HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"id\":",
    )
    .await
    .expect("write");
    let read_all = |mut stream: tokio::net::TcpStream| async move {
        let mut answer = Vec::new();
        let _ =
            tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer)).await;
        (
            String::from_utf8_lossy(&answer).into_owned(),
            started.elapsed(),
        )
    };
    let ((header_answer, header_after), (body_answer, body_after)) =
        tokio::join!(read_all(headers), read_all(body));
    println!("slow headers closed after {header_after:?}; slow body answered after {body_after:?}");
    assert!(
        header_after < Duration::from_secs(30),
        "slow headers: connection kept open"
    );
    assert!(
        !header_answer.starts_with("HTTP/1.1 200"),
        "{header_answer}"
    );
    assert!(body_answer.starts_with("HTTP/1.1 408"), "{body_answer}");
    assert!(body_after < Duration::from_secs(30));
    env.cleanup().await;
}
