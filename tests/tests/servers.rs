//! Proves the private-server helpers (`tests::servers`) and the relay (`tests::relay`) work
//! with the real clients the engine uses: async-nats, redis and sqlx, all over rustls.

use std::net::SocketAddr;
use std::time::Duration;

use async_nats::{ConnectErrorKind, ConnectOptions};
use redis::AsyncCommands as _;
use sqlx::postgres::PgPoolOptions;
use tests::relay::Relay;
use tests::servers::{NatsServer, PostgresCluster, RedisServer, TestPki};
use tokio::time::timeout;

/// Several crypto providers may be compiled into rustls here; pick ring, as the engine does.
fn install_ring() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Bounds every client call, so a misbehaving server fails the test instead of hanging it.
const LIMIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread")]
async fn nats_tls_with_user_and_password() {
    install_ring();
    let pki = TestPki::new();
    let server = NatsServer::start_tls_user_password(&pki, "engine", "s3cret pass");

    let client = timeout(
        LIMIT,
        ConnectOptions::with_user_and_password("engine".into(), "s3cret pass".into())
            .add_root_certificates(pki.ca_file.clone())
            .require_tls(true)
            .connect(server.url()),
    )
    .await
    .expect("connect in time")
    .unwrap_or_else(|e| panic!("connect over TLS: {e}\nserver log:\n{}", server.log()));
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "TLS_TEST".into(),
        subjects: vec!["tls.test".into()],
        ..Default::default()
    })
    .await
    .expect("create a stream over TLS");
    let ack = js
        .publish("tls.test", "hello".into())
        .await
        .expect("publish over TLS")
        .await
        .expect("publish ack over TLS");
    assert_eq!(ack.stream, "TLS_TEST");
    assert_eq!(ack.sequence, 1);

    let wrong_password = timeout(
        LIMIT,
        ConnectOptions::with_user_and_password("engine".into(), "wrong".into())
            .add_root_certificates(pki.ca_file.clone())
            .require_tls(true)
            .connect(server.url()),
    )
    .await
    .expect("a wrong password is reported in time")
    .expect_err("a wrong password must be refused");
    eprintln!(
        "wrong password: {:?}: {wrong_password}",
        wrong_password.kind()
    );
    assert_eq!(
        wrong_password.kind(),
        ConnectErrorKind::AuthorizationViolation,
        "{wrong_password}"
    );

    let unknown_ca = timeout(
        LIMIT,
        ConnectOptions::with_user_and_password("engine".into(), "s3cret pass".into())
            .require_tls(true)
            .connect(server.url()),
    )
    .await
    .expect("an untrusted certificate is reported in time")
    .expect_err("a server certificate from an unknown CA must be refused");
    eprintln!("unknown CA: {:?}: {unknown_ca}", unknown_ca.kind());
    // async-nats reports a failed certificate check as an IO error, not `Tls` (that kind is
    // for a bad TLS setup, e.g. an unreadable root file).
    assert_eq!(unknown_ca.kind(), ConnectErrorKind::Io, "{unknown_ca}");
    assert!(
        unknown_ca.to_string().contains("UnknownIssuer"),
        "expected UnknownIssuer, got {unknown_ca}"
    );

    let wrong_ca = timeout(
        LIMIT,
        ConnectOptions::with_user_and_password("engine".into(), "s3cret pass".into())
            .add_root_certificates(pki.other_ca_file.clone())
            .require_tls(true)
            .connect(server.url()),
    )
    .await
    .expect("a certificate from the wrong CA is reported in time")
    .expect_err("a server certificate from the wrong CA must be refused");
    eprintln!("wrong CA: {:?}: {wrong_ca}", wrong_ca.kind());
    assert_eq!(wrong_ca.kind(), ConnectErrorKind::Io, "{wrong_ca}");
    assert!(
        wrong_ca.to_string().contains("UnknownIssuer"),
        "expected UnknownIssuer, got {wrong_ca}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_token() {
    let server = NatsServer::start_token("t0ken");

    let client = timeout(
        LIMIT,
        ConnectOptions::with_token("t0ken".into()).connect(server.url()),
    )
    .await
    .expect("connect in time")
    .unwrap_or_else(|e| panic!("connect with the token: {e}\nserver log:\n{}", server.log()));
    client.flush().await.expect("a round trip with the token");

    let no_token = timeout(LIMIT, ConnectOptions::new().connect(server.url()))
        .await
        .expect("a missing token is reported in time")
        .expect_err("a connection without the token must be refused");
    eprintln!("no token: {:?}: {no_token}", no_token.kind());
    assert_eq!(
        no_token.kind(),
        ConnectErrorKind::AuthorizationViolation,
        "{no_token}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_tls_with_password() {
    install_ring();
    let pki = TestPki::new();
    let server = RedisServer::start_tls(&pki, Some("r3dis"));

    let client = redis::Client::build_with_tls(
        server.url(Some("r3dis")),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pki.ca_pem()),
        },
    )
    .expect("a redis client trusting the test CA");
    let mut connection = timeout(LIMIT, client.get_multiplexed_async_connection())
        .await
        .expect("connect in time")
        .unwrap_or_else(|e| panic!("connect over TLS: {e}\nserver log:\n{}", server.log()));
    let pong: String = redis::cmd("PING")
        .query_async(&mut connection)
        .await
        .expect("PING over TLS");
    assert_eq!(pong, "PONG");
    let () = connection
        .set("tls-key", "value")
        .await
        .expect("SET over TLS");

    let wrong_password = redis::Client::build_with_tls(
        server.url(Some("wrong")),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pki.ca_pem()),
        },
    )
    .expect("a redis client trusting the test CA");
    let error = timeout(LIMIT, wrong_password.get_multiplexed_async_connection())
        .await
        .expect("a wrong password is reported in time")
        .expect_err("a wrong password must be refused");
    eprintln!("wrong password: {:?}: {error}", error.kind());
    assert_eq!(
        error.kind(),
        redis::ErrorKind::AuthenticationFailed,
        "{error}"
    );

    let untrusted = redis::Client::open(server.url(Some("r3dis"))).expect("a plain rediss client");
    let error = timeout(LIMIT, untrusted.get_multiplexed_async_connection())
        .await
        .expect("an untrusted certificate is reported in time")
        .expect_err("a server certificate from an unknown CA must be refused");
    eprintln!("unknown CA: {:?}: {error}", error.kind());
    assert!(
        error.to_string().contains("certificate"),
        "expected a certificate error, got {error}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_ssl_only() {
    install_ring();
    let pki = TestPki::new();
    let cluster = PostgresCluster::start_ssl(&pki);

    let url = cluster.url(&format!(
        "sslmode=verify-full&sslrootcert={}",
        pki.ca_file.display()
    ));
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&url)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "connect with verify-full: {e}\nserver log:\n{}",
                cluster.log()
            )
        });
    let one: i32 = sqlx::query_scalar("select 1")
        .fetch_one(&pool)
        .await
        .expect("select 1 over TLS");
    assert_eq!(one, 1);
    let ssl: bool = sqlx::query_scalar("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .expect("read pg_stat_ssl");
    assert!(ssl, "the connection must use TLS");
    pool.close().await;

    let plain = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&cluster.url("sslmode=disable"))
        .await
        .expect_err("a connection without TLS must be refused");
    eprintln!("sslmode=disable: {plain}");
    assert!(
        plain.to_string().contains("no encryption"),
        "expected the hostnossl reject, got {plain}"
    );

    let wrong_ca = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&cluster.url(&format!(
            "sslmode=verify-full&sslrootcert={}",
            pki.other_ca_file.display()
        )))
        .await
        .expect_err("a server certificate from the wrong CA must be refused");
    eprintln!("wrong CA: {wrong_ca}");
    // sqlx reports a failed certificate check as `Error::Io` (InvalidData), not `Error::Tls`.
    assert!(
        wrong_ca.to_string().contains("UnknownIssuer"),
        "expected UnknownIssuer, got {wrong_ca:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn relay_cuts_blackholes_and_restores_the_shared_redis() {
    let relay = Relay::start(SocketAddr::from(([127, 0, 0, 1], 6379))).await;
    let client = redis::Client::open(relay.url("redis")).expect("a redis client for the relay");
    let ping = |mut connection: redis::aio::MultiplexedConnection| async move {
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
    };

    let connection = timeout(LIMIT, client.get_multiplexed_async_connection())
        .await
        .expect("connect in time")
        .expect("connect through the relay (is the shared Redis on 6379 up?)");
    assert_eq!(
        ping(connection.clone())
            .await
            .expect("PING through the relay"),
        "PONG"
    );

    relay.cut();
    let error = timeout(LIMIT, ping(connection.clone()))
        .await
        .expect("a cut connection fails in time")
        .expect_err("a command on a cut connection must fail");
    eprintln!("after cut, open connection: {error}");
    let error = timeout(LIMIT, client.get_multiplexed_async_connection())
        .await
        .expect("a cut relay refuses in time")
        .expect_err("a new connection through a cut relay must fail");
    eprintln!("after cut, new connection: {error}");

    relay.restore();
    let connection = timeout(LIMIT, client.get_multiplexed_async_connection())
        .await
        .expect("connect in time")
        .expect("connect through the restored relay");
    assert_eq!(
        ping(connection.clone()).await.expect("PING after restore"),
        "PONG"
    );

    relay.blackhole();
    timeout(Duration::from_secs(1), ping(connection.clone()))
        .await
        .expect_err("a PING through a black hole must hang");
    timeout(
        Duration::from_secs(1),
        client.get_multiplexed_async_connection(),
    )
    .await
    .expect_err("a new connection through a black hole must hang");

    relay.restore();
    let connection = timeout(LIMIT, client.get_multiplexed_async_connection())
        .await
        .expect("connect in time")
        .expect("connect through the relay restored after a black hole");
    assert_eq!(
        ping(connection).await.expect("PING after the black hole"),
        "PONG"
    );
}

#[test]
#[should_panic(expected = "nats-server exited")]
fn a_server_that_does_not_start_fails_loudly() {
    // An unparsable config: nats-server exits at once, and the panic carries its log.
    let _server = NatsServer::start("this is { not a valid config");
}
