//! CI smoke test: a tiny drain through the harness against the engine built from this source.
//! Asserts correctness only (every event delivered exactly once, in order, no dead letter),
//! never time. Fails loudly when NATS is not running.

use std::path::PathBuf;
use std::time::Duration;

use bench::config::ConfigOptions;
use bench::publisher::Workload;
use bench::scenario::{drain, Options};

/// Drains `workload` through the harness and checks that every event arrived once, in order.
fn drain_correctly(name: &str, workload: &Workload) -> anyhow::Result<bench::stats::Report> {
    let options = Options {
        engine: PathBuf::from(env!("CARGO_BIN_EXE_sync-engine-bench-engine")),
        config: ConfigOptions::default(),
        payload_bytes: 300,
        stall: Duration::from_secs(20),
        rss_every: None,
        perf_out: None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (report, _) = runtime.block_on(drain(&options, name, workload, false))?;
    println!("{}", bench::stats::table(std::slice::from_ref(&report)));
    assert_eq!(
        report.delivered,
        workload.events(),
        "every event delivered: {report:?}"
    );
    assert_eq!(report.duplicates, 0, "{report:?}");
    assert_eq!(report.order_violations, 0, "{report:?}");
    assert_eq!(report.dead_letters, 0, "{report:?}");
    assert_eq!(report.unexpected, 0, "{report:?}");
    assert_eq!(report.bad_signatures, 0, "{report:?}");
    Ok(report)
}

#[test]
fn tiny_drain_delivers_everything_once_in_order() -> anyhow::Result<()> {
    let report = drain_correctly("smoke", &Workload::interleaved(200, 5))?;
    assert_eq!(report.delivered, 1000, "{report:?}");
    assert_eq!(
        report.to_payload + report.to_better_auth,
        1000,
        "{report:?}"
    );
    assert_eq!(report.to_payload, 500, "{report:?}");
    Ok(())
}

/// One user with far more events than a user actor works on at once (its backlog): all
/// delivered, once each, in order.
#[test]
fn one_hot_user_delivers_everything_once_in_order() -> anyhow::Result<()> {
    let report = drain_correctly("smoke-hot", &Workload::interleaved(1, 500))?;
    assert_eq!(report.delivered, 500, "{report:?}");
    Ok(())
}
