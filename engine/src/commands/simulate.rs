//! `sync-engine simulate`: seeded deterministic simulation runs, with their verdicts.

use std::process::ExitCode;
use std::time::Instant;

use simulations::{run as run_seed, Profile, SimOptions, Variant};

use crate::cli::SimulateArgs;

/// Prints a line; a closed standard output (`| head`) ends the run quietly instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write;
        if writeln!(std::io::stdout(), $($arg)*).is_err() {
            return Ok(ExitCode::SUCCESS);
        }
    }};
}

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
    let keep_trace = args.check_determinism || args.trace_out.is_some();
    let started = Instant::now();
    let (mut passed, mut failed, mut messages) = (0u64, 0u64, 0u64);
    for seed in &seeds {
        let options = SimOptions {
            seed: *seed,
            events: args.events,
            profile,
            variant,
            keep_trace,
        };
        let report = run_seed(&options);
        messages += report.messages;
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
        if let Some(path) = &args.trace_out {
            std::fs::write(path, report.trace.join("\n") + "\n")
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
        }
        out!(
            "seed {seed:>6}  hash {:016x}  {}  {} messages, {:.1} virtual s  ({})",
            report.hash,
            if ok { "PASS" } else { "FAIL" },
            report.messages,
            report.virt_ms as f64 / 1000.0,
            report.summary
        );
        if ok {
            passed += 1;
            continue;
        }
        failed += 1;
        for violation in report.violations.iter().chain(&notes) {
            out!("    {violation}");
        }
        let mut replay = format!(
            "sync-engine simulate --seed {seed} --events {} --profile {}",
            args.events, args.profile
        );
        if variant != Variant::Correct {
            replay.push_str(&format!(" --variant {}", variant.name()));
        }
        out!("    replay: {replay}");
    }
    let elapsed = started.elapsed().as_secs_f64();
    out!(
        "{} seed(s): {passed} passed, {failed} failed; {messages} simulated messages in {elapsed:.1}s ({:.0} messages/s)",
        seeds.len(),
        messages as f64 / elapsed.max(1e-9)
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
