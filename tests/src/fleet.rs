//! Several engines as separate processes on one test world: each with its own `/metrics`
//! address and member name, logging JSON, from which the test reads every engine's holdings
//! of every partition (acquired, released, lost, or cut short by a kill).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use crate::env::TestEnv;

/// One engine process.
pub struct Engine {
    pub member: String,
    pub http: SocketAddr,
    log: PathBuf,
    child: Option<Child>,
    /// When it was killed, on the wall clock its log lines use.
    pub killed_at: Option<SystemTime>,
}

/// A span during which one engine held one partition (or `whole`), as its log shows it.
#[derive(Debug, Clone)]
pub struct Holding {
    pub member: String,
    pub partition: String,
    pub from: SystemTime,
    /// `None`: still held.
    pub to: Option<SystemTime>,
}

#[derive(Default)]
pub struct Fleet {
    pub engines: Vec<Engine>,
}

impl Fleet {
    /// Starts engine `member` on `env`'s configuration, waits until `/readyz` answers 200, and
    /// returns its index.
    pub async fn start(&mut self, env: &TestEnv, member: &str) -> usize {
        self.start_with(env, member, &[]).await
    }

    /// [`Fleet::start`] with environment overrides of its own (`SYNC_ENGINE__…`).
    pub async fn start_with(
        &mut self,
        env: &TestEnv,
        member: &str,
        vars: &[(&str, &str)],
    ) -> usize {
        let http = free_addr();
        let log = env.dir.path().join(format!("fleet-{member}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let mut command = env.command(&["run"]);
        for (name, value) in vars {
            command.env(name, value);
        }
        let child = command
            .env("SYNC_ENGINE__HTTP__LISTEN", http.to_string())
            .env("SYNC_ENGINE__CLUSTER__MEMBER", member)
            .env("SYNC_ENGINE__LOG__FORMAT", "json")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn sync-engine run");
        self.engines.push(Engine {
            member: member.to_string(),
            http,
            log,
            child: Some(child),
            killed_at: None,
        });
        let index = self.engines.len() - 1;
        let deadline = Instant::now() + Duration::from_secs(30);
        while readyz(http).await != Some(200) {
            assert!(
                Instant::now() < deadline,
                "engine {member} not ready:\n{}",
                self.log(index)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        index
    }

    /// SIGKILL.
    pub fn kill(&mut self, index: usize) {
        let engine = &mut self.engines[index];
        if let Some(mut child) = engine.child.take() {
            let _ = child.kill();
            engine.killed_at = Some(SystemTime::now());
            let _ = child.wait();
        }
    }

    pub fn log(&self, index: usize) -> String {
        std::fs::read_to_string(&self.engines[index].log).unwrap_or_default()
    }

    /// Every engine's log, for a failure message.
    pub fn logs(&self) -> String {
        (0..self.engines.len())
            .map(|i| format!("--- {} ---\n{}", self.engines[i].member, self.log(i)))
            .collect()
    }

    /// A gauge or counter of engine `index`'s `/metrics` (0 when it is absent or unreachable).
    pub async fn metric(&self, index: usize, name: &str) -> f64 {
        let url = format!("http://{}/metrics", self.engines[index].http);
        let Ok(response) = reqwest::get(url).await else {
            return 0.0;
        };
        let text = response.text().await.unwrap_or_default();
        text.lines()
            .find_map(|line| {
                let (key, value) = line.split_once(' ')?;
                (key == name).then(|| value.trim().parse().ok()).flatten()
            })
            .unwrap_or(0.0)
    }

    /// Every engine's holdings, from its log lines `Lease acquired.`, `Lease released.` and
    /// `Lease lost.`; a killed engine's end at its kill.
    pub fn holdings(&self) -> Vec<Holding> {
        let mut all = Vec::new();
        for (i, engine) in self.engines.iter().enumerate() {
            let mut open: BTreeMap<String, SystemTime> = BTreeMap::new();
            for line in self.log(i).lines() {
                let Ok(entry) = serde_json::from_str::<Value>(line) else {
                    continue;
                };
                let (Some(message), Some(partition)) =
                    (entry["message"].as_str(), entry["partition"].as_str())
                else {
                    continue;
                };
                let Some(at) = entry["timestamp"].as_str().and_then(parse_time) else {
                    continue;
                };
                match message {
                    "Lease acquired." => {
                        open.insert(partition.to_string(), at);
                    }
                    "Lease released." | "Lease lost." => {
                        if let Some(from) = open.remove(partition) {
                            all.push(Holding {
                                member: engine.member.clone(),
                                partition: partition.to_string(),
                                from,
                                to: Some(at),
                            });
                        }
                    }
                    _ => {}
                }
            }
            for (partition, from) in open {
                all.push(Holding {
                    member: engine.member.clone(),
                    partition,
                    from,
                    to: engine.killed_at,
                });
            }
        }
        all
    }

    /// No partition was ever held by two engines at once; returns the holdings checked.
    pub fn assert_one_owner_at_a_time(&self) -> Vec<Holding> {
        let holdings = self.holdings();
        let mut by_partition: BTreeMap<&str, Vec<&Holding>> = BTreeMap::new();
        for h in &holdings {
            by_partition.entry(&h.partition).or_default().push(h);
        }
        for (partition, mut spans) in by_partition {
            spans.sort_by_key(|h| h.from);
            for pair in spans.windows(2) {
                let end = pair[0].to.unwrap_or_else(|| {
                    panic!(
                        "partition {partition}: {} still holds it while {} took it",
                        pair[0].member, pair[1].member
                    )
                });
                assert!(
                    end <= pair[1].from,
                    "partition {partition}: {} held it until {:?}, {} from {:?}",
                    pair[0].member,
                    end,
                    pair[1].member,
                    pair[1].from
                );
            }
        }
        holdings
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for engine in &mut self.engines {
            if let Some(mut child) = engine.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// An RFC 3339 timestamp as the engine's JSON logs write it (UTC, `Z`).
fn parse_time(text: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(text.trim_end_matches('Z')).ok()
}

async fn readyz(http: SocketAddr) -> Option<u16> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .ok()?;
    let response = client
        .get(format!("http://{http}/readyz"))
        .send()
        .await
        .ok()?;
    Some(response.status().as_u16())
}

fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}
