//! Seeded simulation runs. `SIM_SEED=N` replays one seed; `SIM_SEEDS=COUNT` sets how many
//! consecutive seeds the sweep runs.

use simulations::{run, Profile, SimOptions};

fn options(seed: u64) -> SimOptions {
    let mut options = SimOptions::new(seed);
    if let Some(profile) = std::env::var("SIM_PROFILE")
        .ok()
        .and_then(|p| Profile::parse(&p))
    {
        options.profile = profile;
    }
    if let Some(events) = env_u64("SIM_EVENTS") {
        options.events = events;
    }
    options.keep_trace = std::env::var("SIM_TRACE").is_ok();
    options
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn seeds_pass_their_invariants() {
    if let Ok(filter) = std::env::var("SIM_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .without_time()
            .with_writer(std::io::stderr)
            .try_init();
    }
    if let Some(seed) = env_u64("SIM_SEED") {
        let report = run(&options(seed));
        if let Ok(path) = std::env::var("SIM_TRACE") {
            std::fs::write(&path, report.trace.join("\n")).expect("write trace");
        }
        assert!(
            report.passed(),
            "seed {seed} failed:\n{}",
            report.violations.join("\n")
        );
        return;
    }
    let count = env_u64("SIM_SEEDS").unwrap_or(200);
    let from = env_u64("SIM_FROM").unwrap_or(0);
    let mut failures = Vec::new();
    let started = std::time::Instant::now();
    let mut messages = 0;
    for seed in from..from + count {
        let report = run(&options(seed));
        messages += report.messages;
        if !report.passed() {
            failures.push(format!(
                "seed {seed} ({}): {}\n  replay: SIM_SEED={seed} cargo test -p simulations --test seeds",
                report.summary,
                report.violations.join("\n    ")
            ));
        }
    }
    eprintln!(
        "{count} seeds, {messages} messages in {:?} ({:.0} messages/s)",
        started.elapsed(),
        messages as f64 / started.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} of {count} seeds failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
