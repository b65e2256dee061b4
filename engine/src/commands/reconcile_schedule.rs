//! `sync-engine reconcile --every DURATION`: a pass, then another every DURATION, until stopped,
//! with the passes' figures on `/metrics` for the operator's alerting.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::header;
use axum::routing::get;

use crate::adapters::user_tables::now_ms;
use crate::cli::ReconcileArgs;
use crate::config::Config;

use super::reconcile::{pass, print, Report, Tables};

/// What the passes found and did.
#[derive(Debug, Default)]
struct Figures {
    runs: AtomicU64,
    failures: AtomicU64,
    last_run_ms: AtomicI64,
    last_missing: AtomicU64,
    last_extra: AtomicU64,
    last_differing: AtomicU64,
    last_duplicates: AtomicU64,
    fixes: AtomicU64,
    not_fixed: AtomicU64,
}

impl Figures {
    fn record(&self, report: &Report) {
        let set = |gauge: &AtomicU64, n: usize| gauge.store(n as u64, Ordering::Relaxed);
        set(&self.last_missing, report.missing.len());
        set(&self.last_extra, report.extra.len());
        set(&self.last_differing, report.differing.len());
        set(&self.last_duplicates, report.duplicates.len());
        self.fixes
            .fetch_add(report.fixes.len() as u64, Ordering::Relaxed);
        self.not_fixed
            .fetch_add(report.not_fixed.len() as u64, Ordering::Relaxed);
        self.last_run_ms.store(now_ms(), Ordering::Relaxed);
        self.runs.fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text.
    fn render(&self) -> String {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP sync_engine_reconcile_{name} {help}");
            let _ = writeln!(out, "# TYPE sync_engine_reconcile_{name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "sync_engine_reconcile_{name}{labels} {value}");
            }
        };
        family(
            "runs_total",
            "counter",
            "Passes that compared the two tables.",
            &[("", get(&self.runs))],
        );
        family(
            "failures_total",
            "counter",
            "Passes that could not compare (a database did not answer).",
            &[("", get(&self.failures))],
        );
        let last_s = self.last_run_ms.load(Ordering::Relaxed).max(0) as u64 / 1000;
        family(
            "last_run_timestamp_seconds",
            "gauge",
            "When the last pass that compared ended (0: none yet).",
            &[("", last_s)],
        );
        family(
            "last_differences",
            "gauge",
            "Differences the last pass found, by kind.",
            &[
                ("{kind=\"missing\"}", get(&self.last_missing)),
                ("{kind=\"extra\"}", get(&self.last_extra)),
                ("{kind=\"differing\"}", get(&self.last_differing)),
                ("{kind=\"duplicate\"}", get(&self.last_duplicates)),
            ],
        );
        family(
            "fixes_total",
            "counter",
            "Events --fix published.",
            &[("", get(&self.fixes))],
        );
        family(
            "not_fixed_total",
            "counter",
            "Differences --fix could not or would not repair.",
            &[("", get(&self.not_fixed))],
        );
        out
    }
}

/// Runs a pass every `every` until SIGTERM or Ctrl-C; a pass that fails is counted and the next
/// one is tried on time.
pub(super) async fn run(
    config: &Config,
    args: &ReconcileArgs,
    tables: &Tables,
    every: Duration,
) -> anyhow::Result<ExitCode> {
    let figures = Arc::new(Figures::default());
    serve_metrics(args, figures.clone()).await?;
    let stop = crate::runtime::shutdown_signal();
    tokio::pin!(stop);
    loop {
        match pass(config, args, tables).await {
            Ok(report) => {
                figures.record(&report);
                print(&report, args.json)?;
            }
            Err(error) => {
                figures.failures.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "reconcile pass failed (the next one runs in {}): {error:#}",
                    humantime::format_duration(every)
                );
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = &mut stop => return Ok(ExitCode::SUCCESS),
        }
    }
}

async fn serve_metrics(args: &ReconcileArgs, figures: Arc<Figures>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("--listen {}: cannot listen: {e}", args.listen))?;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let text = figures.render();
            async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text) }
        }),
    );
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            eprintln!("the metrics endpoint stopped: {error}");
        }
    });
    Ok(())
}
