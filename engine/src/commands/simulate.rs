//! `sync-engine simulate`: seeded deterministic simulation runs, with their verdicts.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use simulations::{run as run_seed, Profile, SimOptions, Variant};

use crate::cli::SimulateArgs;

pub fn run(args: &SimulateArgs) -> anyhow::Result<ExitCode> {
    let profile = Profile::parse(&args.profile).ok_or_else(|| {
        anyhow::anyhow!(
            "--profile {:?}: expected swarm, calm or storm",
            args.profile
        )
    })?;
    let variant = Variant::parse(&args.variant)
        .ok_or_else(|| anyhow::anyhow!("--variant {:?} is not a known variant", args.variant))?;
    let seeds: Vec<u64> = match (args.seed, args.seeds) {
        (Some(seed), _) => vec![seed],
        (None, Some(count)) => (args.from..args.from.saturating_add(count)).collect(),
        (None, None) => vec![args.from],
    };
    let jobs = match args.jobs {
        Some(0) => anyhow::bail!("--jobs 0: expected at least 1"),
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    }
    .min(seeds.len().max(1));
    let started = Instant::now();
    let (mut passed, mut failed, mut messages) = (0u64, 0u64, 0u64);
    // Seeds are independent worlds, each on its own current-thread runtime, so they run on
    // several threads at once; verdicts are printed in seed order, whatever order they end in.
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let (sender, receiver) = mpsc::channel::<(usize, SeedOutcome)>();
    let result = std::thread::scope(|scope| -> anyhow::Result<Option<ExitCode>> {
        for _ in 0..jobs {
            let sender = sender.clone();
            let (next, stop, seeds) = (&next, &stop, &seeds);
            scope.spawn(move || loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= seeds.len() || stop.load(Ordering::Relaxed) {
                    break;
                }
                let outcome = run_one(seeds[index], args, profile, variant);
                if sender.send((index, outcome)).is_err() {
                    break;
                }
            });
        }
        drop(sender);
        let mut done: BTreeMap<usize, SeedOutcome> = BTreeMap::new();
        let mut printed = 0;
        for (index, outcome) in receiver {
            done.insert(index, outcome);
            while let Some(outcome) = done.remove(&printed) {
                printed += 1;
                messages += outcome.messages;
                if outcome.ok {
                    passed += 1;
                } else {
                    failed += 1;
                }
                if let Some(path) = &args.trace_out {
                    std::fs::write(path, outcome.trace.join("\n") + "\n")
                        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
                }
                for line in &outcome.lines {
                    if !print_line(line) {
                        stop.store(true, Ordering::Relaxed);
                        return Ok(Some(ExitCode::SUCCESS));
                    }
                }
            }
        }
        Ok(None)
    })?;
    if let Some(code) = result {
        return Ok(code);
    }
    let elapsed = started.elapsed().as_secs_f64();
    print_line(&format!(
        "{} seed(s): {passed} passed, {failed} failed; {messages} simulated messages in {elapsed:.1}s ({:.0} messages/s, {jobs} thread(s))",
        seeds.len(),
        messages as f64 / elapsed.max(1e-9)
    ));
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What one seed printed and counted.
struct SeedOutcome {
    ok: bool,
    messages: u64,
    lines: Vec<String>,
    trace: Vec<String>,
}

fn run_one(seed: u64, args: &SimulateArgs, profile: Profile, variant: Variant) -> SeedOutcome {
    let options = SimOptions {
        seed,
        events: args.events,
        profile,
        variant,
        keep_trace: args.check_determinism || args.trace_out.is_some(),
    };
    let report = run_seed(&options);
    let mut messages = report.messages;
    let mut ok = report.passed();
    let mut notes = Vec::new();
    if args.check_determinism {
        let again = run_seed(&options);
        messages += again.messages;
        if again.hash != report.hash {
            ok = false;
            let index = report
                .trace
                .iter()
                .zip(&again.trace)
                .position(|(a, b)| a != b)
                .unwrap_or(report.trace.len().min(again.trace.len()));
            notes.push(format!(
                "not deterministic: hash {:016x} then {:016x}; first difference at trace entry {index}:\n    first:  {}\n    second: {}",
                report.hash,
                again.hash,
                report.trace.get(index).map(String::as_str).unwrap_or("(end)"),
                again.trace.get(index).map(String::as_str).unwrap_or("(end)")
            ));
        }
    }
    let mut lines = vec![format!(
        "seed {seed:>6}  hash {:016x}  {}  {} messages, {:.1} virtual s  ({})",
        report.hash,
        if ok { "PASS" } else { "FAIL" },
        report.messages,
        report.virt_ms as f64 / 1000.0,
        report.summary
    )];
    if !ok {
        for violation in report.violations.iter().chain(&notes) {
            lines.push(format!("    {violation}"));
        }
        let mut replay = format!(
            "sync-engine simulate --seed {seed} --events {} --profile {}",
            args.events, args.profile
        );
        if variant != Variant::Correct {
            replay.push_str(&format!(" --variant {}", variant.name()));
        }
        lines.push(format!("    replay: {replay}"));
    }
    SeedOutcome {
        ok,
        messages,
        lines,
        trace: if args.trace_out.is_some() {
            report.trace
        } else {
            Vec::new()
        },
    }
}

/// Prints a line; `false` when standard output is closed (`| head`), which ends the run
/// quietly instead of panicking.
fn print_line(line: &str) -> bool {
    use std::io::Write;
    writeln!(std::io::stdout(), "{line}").is_ok()
}
