//! Seeded simulation runs of the correct engine.
//!
//! - `SIM_SEED=N cargo test -p simulations --test seeds` replays one seed (with `SIM_TRACE=FILE`
//!   to write its trace, `SIM_LOG=actors=debug` to see the actors' logs);
//! - otherwise seeds `SIM_FROM..SIM_FROM+SIM_SEEDS` (default 0..1000) run, each twice: both
//!   runs must pass every invariant and give the same trace hash.

use simulations::{run, Profile, SimOptions, SimReport};

const CHUNKS: u64 = 4;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

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

fn describe(report: &SimReport) -> String {
    format!(
        "seed {} ({}): {}\n  replay: SIM_SEED={} cargo test -p simulations --test seeds  (or: sync-engine simulate --seed {})",
        report.seed,
        report.summary,
        report.violations.join("\n    "),
        report.seed,
        report.seed
    )
}

/// Runs one chunk of the sweep; every seed twice. (Wall time here only reports speed.)
#[allow(clippy::disallowed_methods)]
fn sweep(chunk: u64) {
    if env_u64("SIM_SEED").is_some() {
        return;
    }
    let count = env_u64("SIM_SEEDS").unwrap_or(1000);
    let from = env_u64("SIM_FROM").unwrap_or(0);
    let per_chunk = count.div_ceil(CHUNKS);
    let start = from + chunk * per_chunk;
    let end = (start + per_chunk).min(from + count);
    let mut failures = Vec::new();
    let started = std::time::Instant::now();
    let mut messages = 0;
    for seed in start..end {
        let first = run(&options(seed));
        let second = run(&options(seed));
        messages += first.messages + second.messages;
        if !first.passed() {
            failures.push(describe(&first));
        }
        if first.hash != second.hash {
            failures.push(format!(
                "seed {seed} is not deterministic: hash {:016x} then {:016x}; `sync-engine simulate --seed {seed} --check-determinism` shows the first differing trace entry",
                first.hash, second.hash
            ));
        }
    }
    eprintln!(
        "seeds {start}..{end} twice: {messages} messages in {:?}",
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn seeds_chunk_0() {
    sweep(0);
}

#[test]
fn seeds_chunk_1() {
    sweep(1);
}

#[test]
fn seeds_chunk_2() {
    sweep(2);
}

#[test]
fn seeds_chunk_3() {
    sweep(3);
}

/// Heavier seeds: 2,000 events over a few users each (hundreds of changes per user), where a
/// seed's panic rate can exhaust the pipeline's restart budget and the engine must be restarted
/// (seeds 316108717, -722, -753 and others did not settle before that was modelled).
const HEAVY_FROM: u64 = 316_108_700;
const HEAVY_SEEDS: u64 = 60;
const HEAVY_EVENTS: u64 = 2_000;

#[test]
fn heavy_seeds() {
    if env_u64("SIM_SEED").is_some() {
        return;
    }
    let mut failures = Vec::new();
    for seed in HEAVY_FROM..HEAVY_FROM + HEAVY_SEEDS {
        let mut options = options(seed);
        options.events = HEAVY_EVENTS;
        let report = run(&options);
        if !report.passed() {
            failures.push(format!("{} (--events {HEAVY_EVENTS})", describe(&report)));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Seeds outside the sweep that once found a bug, kept as regressions (the sweep's own range
/// keeps those it found: 608 and 771, a resync request's delivery id reused for other content;
/// 1, 6, 33 and others, a deletion brought back by a late delivery).
const REGRESSIONS: [(u64, &str); 2] = [
    (
        8913,
        "a restored line's hold lost with its actor: a dead run's late request landed after newer deliveries",
    ),
    (
        12783,
        "a late echo (held messages returned by a failed actor) did not backdate: a later edit of the other side lost",
    ),
];

#[test]
fn regression_seeds() {
    if env_u64("SIM_SEED").is_some() {
        return;
    }
    for (seed, found) in REGRESSIONS {
        let report = run(&options(seed));
        assert!(
            report.passed(),
            "seed {seed} ({found}): {}",
            describe(&report)
        );
    }
}

#[test]
fn replay_one_seed() {
    let Some(seed) = env_u64("SIM_SEED") else {
        return;
    };
    if let Ok(filter) = std::env::var("SIM_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .without_time()
            .with_writer(std::io::stderr)
            .try_init();
    }
    let report = run(&options(seed));
    if let Ok(path) = std::env::var("SIM_TRACE") {
        std::fs::write(&path, report.trace.join("\n")).expect("write trace");
    }
    eprintln!("seed {seed}: hash {:016x}", report.hash);
    assert!(report.passed(), "{}", describe(&report));
}
