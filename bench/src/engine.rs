//! The engine as a child process: start, readiness, CPU time, RSS, metrics, stop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::config::{Setup, BETTER_AUTH_SECRET_ENV, PAYLOAD_SECRET_ENV};
use crate::BENCH_SECRET;

/// The default engine binary: `sync-engine` beside the running executable (the release build
/// of `target/release/bench`), else this package's own build of the engine's main.
pub fn default_engine_path() -> PathBuf {
    let dir = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("target/release"));
    let primary = dir.join("sync-engine");
    if primary.exists() {
        primary
    } else {
        dir.join("sync-engine-bench-engine")
    }
}

pub struct EngineProcess {
    child: Option<Child>,
    pub pid: u32,
    pub metrics_url: String,
    pub log_path: PathBuf,
    clk_tck: f64,
}

impl EngineProcess {
    /// Spawns `<binary> run --config <cfg>` with a clean environment and waits for `/readyz`.
    pub async fn start(binary: &Path, setup: &Setup) -> anyhow::Result<EngineProcess> {
        Self::start_member(binary, setup, None).await
    }

    /// [`EngineProcess::start`] of one of several engines on the same setup: member `n` gets
    /// its own name, `/metrics` address and log.
    pub async fn start_member(
        binary: &Path,
        setup: &Setup,
        member: Option<usize>,
    ) -> anyhow::Result<EngineProcess> {
        if !binary.exists() {
            bail!(
                "engine binary {} is missing (cargo build --release -p engine)",
                binary.display()
            );
        }
        let suffix = member.map(|n| format!("-{n}")).unwrap_or_default();
        let http = match member {
            Some(_) => std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .context("a free port")?,
            None => setup.http,
        };
        let log_path = setup.dir.path().join(format!("engine{suffix}.log"));
        let log = std::fs::File::create(&log_path).context("engine log file")?;
        let mut command = Command::new(binary);
        command.env_clear();
        if let Ok(path) = std::env::var("PATH") {
            command.env("PATH", path);
        }
        // Engine settings the generated file leaves at their defaults can still be tried:
        // `SYNC_ENGINE__ENGINE__MAX_IN_FLIGHT=2000 bench drain`.
        for (name, value) in std::env::vars() {
            if name.starts_with("SYNC_ENGINE__") {
                command.env(name, value);
            }
        }
        if let Some(n) = member {
            command
                .env("SYNC_ENGINE__HTTP__LISTEN", http.to_string())
                .env("SYNC_ENGINE__CLUSTER__MEMBER", format!("bench-{n}"));
        }
        let child = command
            .env(PAYLOAD_SECRET_ENV, BENCH_SECRET)
            .env(BETTER_AUTH_SECRET_ENV, BENCH_SECRET)
            .arg("run")
            .arg("--config")
            .arg(&setup.config_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {}", binary.display()))?;
        let mut engine = EngineProcess {
            pid: child.id(),
            child: Some(child),
            metrics_url: format!("http://{http}/metrics"),
            log_path,
            clk_tck: clock_ticks(),
        };
        let ready = format!("http://{http}/readyz");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(response) = reqwest::get(&ready).await {
                if response.status().is_success() {
                    return Ok(engine);
                }
            }
            if let Some(child) = engine.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    bail!("engine exited during startup ({status}):\n{}", engine.log());
                }
            }
            if Instant::now() > deadline {
                bail!("engine not ready within 60 s:\n{}", engine.log());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// What the engine logged (level warn and above).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// User + system CPU seconds so far (`/proc/<pid>/stat`).
    pub fn cpu_seconds(&self) -> f64 {
        crate::stats::process_cpu_secs(&self.pid.to_string(), self.clk_tck)
    }

    /// Clock ticks per second of `/proc` CPU times.
    pub fn clk_tck(&self) -> f64 {
        self.clk_tck
    }

    /// A `/proc/<pid>/status` field in MiB (VmRSS, VmHWM).
    pub fn status_mb(&self, field: &str) -> f64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .ok()
            .and_then(|status| {
                status.lines().find_map(|line| {
                    let value = line.strip_prefix(field)?.strip_prefix(':')?;
                    value.split_whitespace().next()?.parse::<f64>().ok()
                })
            })
            .map_or(f64::NAN, |kb| kb / 1024.0)
    }

    pub fn rss_mb(&self) -> f64 {
        self.status_mb("VmRSS")
    }

    pub fn peak_rss_mb(&self) -> f64 {
        self.status_mb("VmHWM")
    }

    /// The sum of every series of a metric family from `/metrics`.
    pub async fn metric_sum(&self, name: &str) -> anyhow::Result<f64> {
        let text = reqwest::get(&self.metrics_url)
            .await
            .context("GET /metrics")?
            .text()
            .await
            .context("metrics body")?;
        Ok(text
            .lines()
            .filter(|line| {
                line.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|line| line.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
            .sum())
    }

    /// SIGTERM, then waits up to 20 s (SIGKILL after that); whether it exited 0.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for EngineProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}
