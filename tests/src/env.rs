//! One test's world: its own streams, subjects, consumers, dedup prefix and store, an engine
//! process configured for them, and a publisher.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use protocol::{EventType, Origin};
use serde_json::{json, Value};

use crate::{sync_engine_bin, TEST_SECRET};

pub const NATS_URL: &str = "nats://127.0.0.1:4222";
pub const REDIS_URL: &str = "redis://127.0.0.1:6379";
pub const POSTGRES_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// Knobs of one test's engine.
#[derive(Debug, Clone)]
pub struct EnvOptions {
    pub dedup_redis: bool,
    /// `None`: SQLite in the test's folder.
    pub store_url: Option<String>,
    pub max_attempts: u32,
    pub retry_initial: &'static str,
    pub retry_max: &'static str,
    pub ack_wait: &'static str,
    pub user_idle_timeout: &'static str,
    /// Appended to the file: whole tables of their own (`[mirror]`, `[ingest]`).
    pub extra_toml: String,
    /// Another NATS than the shared one (with [`TestEnv::with_client`]).
    pub nats_url: Option<String>,
    /// Another Redis than the shared one.
    pub redis_url: Option<String>,
    /// More keys of the `[nats]`, `[dedup]` and `[targets.payload]` tables.
    pub nats_toml: String,
    pub dedup_toml: String,
    pub payload_toml: String,
    /// Environment variables the engine gets (the secrets of a test's own servers).
    pub env: Vec<(String, String)>,
}

impl Default for EnvOptions {
    fn default() -> Self {
        EnvOptions {
            dedup_redis: false,
            store_url: None,
            max_attempts: 5,
            retry_initial: "50ms",
            retry_max: "400ms",
            ack_wait: "5s",
            user_idle_timeout: "5m",
            extra_toml: String::new(),
            nats_url: None,
            redis_url: None,
            nats_toml: String::new(),
            dedup_toml: String::new(),
            payload_toml: String::new(),
            env: Vec::new(),
        }
    }
}

pub struct TestEnv {
    pub id: String,
    pub stream: String,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub http: SocketAddr,
    pub js: async_nats::jetstream::Context,
    pub options: EnvOptions,
    engine: Option<Child>,
    log_index: usize,
}

impl TestEnv {
    /// Sets up a fresh world whose targets are the two given receiver URLs. Fails loudly when
    /// NATS is not there.
    pub async fn new(payload_url: &str, better_auth_url: &str, options: EnvOptions) -> TestEnv {
        let client = async_nats::connect(NATS_URL)
            .await
            .expect("NATS must run on 127.0.0.1:4222 (scripts/services.sh starts it)");
        Self::with_client(payload_url, better_auth_url, options, client)
    }

    /// The same on another NATS (`options.nats_url`), which `client` is connected to.
    pub fn with_client(
        payload_url: &str,
        better_auth_url: &str,
        options: EnvOptions,
        client: async_nats::Client,
    ) -> TestEnv {
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let stream = format!("T_{id}");
        let dir = tempfile::tempdir().expect("temp dir");
        let http = free_port();
        let store_url = options
            .store_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}/sync.db", dir.path().display()));
        let config = format!(
            r#"
[engine]
shutdown_grace = "5s"
user_idle_timeout = "{idle}"
clock_skew = "500ms"
[nats]
url = "{nats_url}"
{nats_toml}
stream = "{stream}"
better_auth_subjects = ["t{id}.user.>"]
payload_subjects = ["t{id}.payload.user.>"]
durable_prefix = "t{id}"
ack_wait = "{ack_wait}"
[dedup]
backend = "{backend}"
redis_url = "{redis_url}"
key_prefix = "t{id}:done"
{dedup_toml}
[store]
url = "{store_url}"
[targets.payload]
url = "{payload_url}"
secret_env = "TEST_PAYLOAD_SECRET"
timeout = "2s"
{payload_toml}
[targets.payload.retry]
initial = "{initial}"
max = "{max}"
max_attempts = {attempts}
[targets.better_auth]
url = "{better_auth_url}"
secret_env = "TEST_BETTER_AUTH_SECRET"
timeout = "2s"
[targets.better_auth.retry]
initial = "{initial}"
max = "{max}"
max_attempts = {attempts}
[http]
listen = "{http}"
[log]
level = "info"
{extra}
"#,
            ack_wait = options.ack_wait,
            idle = options.user_idle_timeout,
            backend = if options.dedup_redis {
                "redis"
            } else {
                "memory"
            },
            initial = options.retry_initial,
            max = options.retry_max,
            attempts = options.max_attempts,
            extra = options.extra_toml,
            nats_url = options.nats_url.as_deref().unwrap_or(NATS_URL),
            redis_url = options.redis_url.as_deref().unwrap_or(REDIS_URL),
            nats_toml = options.nats_toml,
            dedup_toml = options.dedup_toml,
            payload_toml = options.payload_toml,
        );
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config).expect("write test config");
        TestEnv {
            id,
            stream,
            dir,
            config_path,
            http,
            js: async_nats::jetstream::new(client),
            options,
            engine: None,
            log_index: 0,
        }
    }

    /// A `sync-engine` command against this world's configuration and secrets.
    pub fn command(&self, args: &[&str]) -> std::process::Command {
        let mut command = crate::sync_engine();
        crate::with_default_secrets(&mut command)
            .env("TEST_PAYLOAD_SECRET", TEST_SECRET)
            .env("TEST_BETTER_AUTH_SECRET", TEST_SECRET)
            .env("RUST_LOG", "info");
        for (name, value) in &self.options.env {
            command.env(name, value);
        }
        command.args(args);
        command.arg("--config").arg(&self.config_path);
        command
    }

    /// Starts the engine and waits until `/readyz` answers 200.
    pub async fn start_engine(&mut self) {
        let _ = sync_engine_bin();
        self.spawn_engine();
        let url = format!("http://{}/readyz", self.http);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(response) = reqwest::get(&url).await {
                if response.status().is_success() {
                    return;
                }
            }
            if let Some(child) = self.engine.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "engine exited during startup ({status}):\n{}",
                        self.engine_log()
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "engine not ready within 30s:\n{}",
                self.engine_log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts the engine without waiting for it to be ready (for tests of startup itself).
    pub fn spawn_engine(&mut self) {
        assert!(self.engine.is_none(), "engine already running");
        self.log_index += 1;
        let log = std::fs::File::create(
            self.dir
                .path()
                .join(format!("engine-{}.log", self.log_index)),
        )
        .expect("log file");
        let child = self
            .command(&["run"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn sync-engine run");
        self.engine = Some(child);
    }

    /// Waits up to `timeout` for a started engine to exit; its status, or `None` if it runs on.
    pub fn wait_engine_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(child) = self.engine.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.engine = None;
                    return Some(status);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// `/readyz`'s status code, or `None` when nothing answers.
    pub async fn readyz(&self) -> Option<u16> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()
            .ok()?;
        let response = client
            .get(format!("http://{}/readyz", self.http))
            .send()
            .await
            .ok()?;
        Some(response.status().as_u16())
    }

    /// SIGKILL: no chance to settle anything.
    pub fn kill_engine(&mut self) {
        if let Some(mut child) = self.engine.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the exit; returns whether it exited 0.
    pub fn stop_engine(&mut self) -> bool {
        let Some(mut child) = self.engine.take() else {
            return false;
        };
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the engine logged so far (all runs).
    pub fn engine_log(&self) -> String {
        (1..=self.log_index)
            .map(|i| {
                std::fs::read_to_string(self.dir.path().join(format!("engine-{i}.log")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n--- restart ---\n")
    }

    /// The subject an application publishes on.
    pub fn subject(&self, origin: Origin, event_type: EventType, user: &str) -> String {
        let verb = event_type.verb();
        match origin {
            Origin::BetterAuth => format!("t{}.user.{verb}.{user}", self.id),
            Origin::Payload => format!("t{}.payload.user.{verb}.{user}", self.id),
        }
    }

    /// Publishes an envelope and waits for JetStream to store it.
    pub async fn publish(
        &self,
        event_id: &str,
        origin: Origin,
        event_type: EventType,
        ts: i64,
        data: Value,
    ) {
        let user = data
            .get(if origin == Origin::BetterAuth {
                "id"
            } else {
                "betterAuthUserId"
            })
            .and_then(Value::as_str)
            .unwrap_or("unlinked")
            .to_string();
        let body = json!({
            "id": event_id,
            "origin": origin.as_str(),
            "type": event_type.as_str(),
            "timestamp": ts,
            "data": data,
        });
        let subject = self.subject(origin, event_type, &user);
        self.publish_raw(&subject, event_id, serde_json::to_vec(&body).expect("json"))
            .await;
    }

    /// Publishes raw bytes with the given `Nats-Msg-Id`.
    pub async fn publish_raw(&self, subject: &str, msg_id: &str, body: Vec<u8>) {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id);
        self.ensure_stream().await;
        self.js
            .publish_with_headers(subject.to_string(), headers, body.into())
            .await
            .expect("publish")
            .await
            .expect("JetStream stored the message");
    }

    /// Publishes without waiting for each acknowledgement (for bulk loads), then waits for all.
    pub async fn publish_many(&self, messages: Vec<(String, String, Vec<u8>)>) {
        self.ensure_stream().await;
        self.publish_to_existing(messages).await;
    }

    /// [`TestEnv::publish_many`] to streams that already exist (a partitioned layout's, which
    /// the engines create).
    pub async fn publish_to_existing(&self, messages: Vec<(String, String, Vec<u8>)>) {
        let mut acks = Vec::with_capacity(messages.len());
        for (subject, msg_id, body) in messages {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", msg_id.as_str());
            acks.push(
                self.js
                    .publish_with_headers(subject, headers, body.into())
                    .await
                    .expect("publish"),
            );
            if acks.len() >= 512 {
                for ack in acks.drain(..) {
                    ack.await.expect("stored");
                }
            }
        }
        for ack in acks {
            ack.await.expect("stored");
        }
    }

    /// The stream of `origin`'s events, named as the engine names it.
    pub fn stream_of(&self, origin: Origin) -> String {
        engine::adapters::nats::stream_name_for(&self.stream, origin)
    }

    /// Both streams, created the way the engine would, so events can be published before it
    /// runs.
    pub async fn ensure_stream(&self) {
        for origin in Origin::ALL {
            let subject = match origin {
                Origin::BetterAuth => format!("t{}.user.>", self.id),
                Origin::Payload => format!("t{}.payload.user.>", self.id),
            };
            self.js
                .get_or_create_stream(async_nats::jetstream::stream::Config {
                    name: self.stream_of(origin),
                    subjects: vec![subject],
                    storage: async_nats::jetstream::stream::StorageType::File,
                    duplicate_window: Duration::from_secs(120),
                    ..Default::default()
                })
                .await
                .expect("create test stream");
        }
    }

    /// Reads `/metrics` and returns a counter's value.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(format!("http://{}/metrics", self.http))
            .await
            .expect("metrics endpoint")
            .text()
            .await
            .expect("metrics text");
        text.lines()
            .find_map(|line| {
                let (key, value) = line.split_once(' ')?;
                (key == name)
                    .then(|| value.trim().parse::<f64>().ok())
                    .flatten()
            })
            .unwrap_or_else(|| panic!("metric {name} missing from:\n{text}"))
    }

    /// `sync-engine dlq list --json`, parsed.
    pub fn dead_letters(&self) -> Vec<Value> {
        let output = self
            .command(&["dlq", "list", "--json"])
            .output()
            .expect("dlq list");
        assert!(
            output.status.success(),
            "dlq list failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("dlq list prints JSON lines"))
            .collect()
    }

    /// Deletes the streams (and with them the consumers).
    pub async fn cleanup(mut self) {
        self.kill_engine();
        for origin in Origin::ALL {
            let _ = self.js.delete_stream(self.stream_of(origin)).await;
        }
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        self.kill_engine();
    }
}

fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Polls `check` until it returns true or `timeout` passes.
pub async fn eventually(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
