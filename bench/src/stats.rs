//! Percentiles and the printed result table.

use std::fmt::Write as _;

/// The value at quantile `q` (0..=1) of sorted `values` (nearest rank).
pub fn percentile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted.get(rank - 1).copied()
}

/// What one scenario run measured.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub scenario: String,
    /// Events published.
    pub events: usize,
    /// Distinct events delivered (exactly the published ones when all went well).
    pub delivered: usize,
    /// Seconds from the first to the last delivery.
    pub seconds: f64,
    pub events_per_sec: f64,
    /// Publish-to-receive latency, milliseconds.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub engine_cpu_secs: f64,
    pub peak_rss_mb: f64,
    pub duplicates: u64,
    pub order_violations: u64,
    pub dead_letters: u64,
    /// Deliveries whose id was not an event id of this run (e.g. `:resync`), or whose
    /// signature did not verify.
    pub unexpected: u64,
    pub bad_signatures: u64,
    pub to_payload: u64,
    pub to_better_auth: u64,
    /// 1-minute load average before and after the run.
    pub load_before: f64,
    pub load_after: f64,
    /// CPU seconds used by every other process on the machine (neither the engine nor this
    /// harness) while the scenario ran: how much of the 2 cores someone else's build took.
    pub others_cpu_secs: f64,
    pub notes: Vec<String>,
}

impl Report {
    /// Whether every event was delivered exactly once, in order, with no dead letter.
    pub fn correct(&self) -> bool {
        self.delivered == self.events
            && self.duplicates == 0
            && self.order_violations == 0
            && self.dead_letters == 0
            && self.unexpected == 0
            && self.bad_signatures == 0
    }
}

fn ms(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"))
}

/// The reports as a Markdown table, then each report's notes.
pub fn table(reports: &[Report]) -> String {
    let mut out = String::new();
    out.push_str("| scenario | events | delivered | s | events/s | p50 ms | p99 ms | max ms | engine CPU s | peak RSS MB | dup | order viol | DLQ | to payload / better-auth | load 1m before→after | others' CPU s |\n");
    out.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in reports {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.2} | {:.0} | {} | {} | {} | {:.1} | {:.0} | {} | {} | {} | {} / {} | {:.2}→{:.2} | {:.1} |",
            r.scenario,
            r.events,
            r.delivered,
            r.seconds,
            r.events_per_sec,
            ms(r.p50_ms),
            ms(r.p99_ms),
            ms(r.max_ms),
            r.engine_cpu_secs,
            r.peak_rss_mb,
            r.duplicates,
            r.order_violations,
            r.dead_letters,
            r.to_payload,
            r.to_better_auth,
            r.load_before,
            r.load_after,
            r.others_cpu_secs,
        );
    }
    for r in reports {
        if r.unexpected > 0 || r.bad_signatures > 0 {
            let _ = writeln!(
                out,
                "- {}: {} unexpected deliveries, {} bad signatures",
                r.scenario, r.unexpected, r.bad_signatures
            );
        }
        for note in &r.notes {
            let _ = writeln!(out, "- {}: {note}", r.scenario);
        }
    }
    out
}

/// Busy CPU seconds of the whole machine so far (`/proc/stat`, all but idle and iowait).
pub fn machine_busy_secs(clk_tck: f64) -> f64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let line = s.lines().next()?;
            let v: Vec<f64> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|f| f.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal
            let busy: f64 = v
                .iter()
                .take(8)
                .enumerate()
                .filter(|(i, _)| *i != 3 && *i != 4)
                .map(|(_, x)| x)
                .sum();
            Some(busy / clk_tck)
        })
        .unwrap_or(f64::NAN)
}

/// User + system CPU seconds of a process from `/proc/<pid>/stat` (`self` for this one).
pub fn process_cpu_secs(pid: &str, clk_tck: f64) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
        return f64::NAN;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    match (ticks(11), ticks(12)) {
        (Some(user), Some(system)) => (user + system) / clk_tck,
        _ => f64::NAN,
    }
}

/// The 1-minute load average.
pub fn load_1m() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), Some(50));
        assert_eq!(percentile(&v, 0.99), Some(99));
        assert_eq!(percentile(&v, 1.0), Some(100));
        assert_eq!(percentile(&[], 0.5), None);
    }
}
