//! One simulated run: the world, the workload, the chaos, the heal, and the verdict.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actors::ports::{Chaos, Ports};
use actors::settings::{EngineFaults, PipelineSettings, RetryPolicy, TargetSettings};
use actors::stats::Stats;
use actors::sync::{Faults, Policy};
use actors::{Pipeline, PipelineArgs, Sink};
use bytes::Bytes;
use protocol::signing::{Keyring, SigningScheme};
use protocol::user::Mappings;
use protocol::{Origin, Secret, UserKey};
use serde_json::{json, Value};

use crate::apps::{AppFaults, SimApp, SimTransport, Violations};
use crate::clock::{SimClock, SimEntropy};
use crate::nats::{FakeNats, NatsFaults};
use crate::oracle::Oracle;
use crate::rng::SimRng;
use crate::stores::{Flaky, MemDedup, MemStore, Outages, Planted};
use crate::trace::Trace;

/// The signing secret of the simulated receivers (test-only).
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const ACK_WAIT: Duration = Duration::from_secs(5);
const MAX_MESSAGE_BYTES: usize = 4096;
/// After the chaos, the run must go quiet within this much virtual time.
const QUIET_LIMIT_MS: u64 = 180_000;
/// Quiet means: nothing happened for this long.
const QUIET_FOR_MS: u64 = 20_000;
/// How often the world looks whether the engine's pipeline gave up.
const WATCH_MS: u64 = 500;

/// The engine under test: correct, or one of the deliberately broken variants it must catch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Correct,
    /// (a) mark an event processed before it is delivered
    MarkBeforeDelivery,
    /// (b) ack before the effect is durable
    AckBeforeDurable,
    /// (c) deliver without per-user ordering
    Unordered,
    /// (d) skip the merge and apply events as they come
    SkipMerge,
    /// (e) no echo suppression
    NoEchoSuppression,
    /// (f) echo recognised only against the last delivery
    EchoLastOnly,
    /// (g) never re-send canonical to the origin
    NoResync,
    /// (h) a store error fails the user's actor, handing its messages back
    FailOnStoreError,
    /// (i) resync requests send nothing: a side that drifted stays drifted
    IgnoreResyncRequests,
}

impl Variant {
    pub const BROKEN: [Variant; 9] = [
        Variant::MarkBeforeDelivery,
        Variant::AckBeforeDurable,
        Variant::Unordered,
        Variant::SkipMerge,
        Variant::NoEchoSuppression,
        Variant::EchoLastOnly,
        Variant::NoResync,
        Variant::FailOnStoreError,
        Variant::IgnoreResyncRequests,
    ];

    pub fn parse(name: &str) -> Option<Variant> {
        Some(match name {
            "correct" => Variant::Correct,
            "mark-before-delivery" => Variant::MarkBeforeDelivery,
            "ack-before-durable" => Variant::AckBeforeDurable,
            "unordered" => Variant::Unordered,
            "skip-merge" => Variant::SkipMerge,
            "no-echo-suppression" => Variant::NoEchoSuppression,
            "echo-last-only" => Variant::EchoLastOnly,
            "no-resync" => Variant::NoResync,
            "fail-on-store-error" => Variant::FailOnStoreError,
            "ignore-resync-requests" => Variant::IgnoreResyncRequests,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Variant::Correct => "correct",
            Variant::MarkBeforeDelivery => "mark-before-delivery",
            Variant::AckBeforeDurable => "ack-before-durable",
            Variant::Unordered => "unordered",
            Variant::SkipMerge => "skip-merge",
            Variant::NoEchoSuppression => "no-echo-suppression",
            Variant::EchoLastOnly => "echo-last-only",
            Variant::NoResync => "no-resync",
            Variant::FailOnStoreError => "fail-on-store-error",
            Variant::IgnoreResyncRequests => "ignore-resync-requests",
        }
    }

    fn faults(self) -> (EngineFaults, Faults) {
        let mut engine = EngineFaults::default();
        let mut sync = Faults::default();
        match self {
            Variant::Correct => {}
            Variant::MarkBeforeDelivery => engine.mark_before_delivery = true,
            Variant::AckBeforeDurable => engine.ack_before_durable = true,
            Variant::Unordered => engine.unordered_delivery = true,
            Variant::SkipMerge => sync.skip_merge = true,
            Variant::NoEchoSuppression => sync.no_echo_suppression = true,
            Variant::EchoLastOnly => sync.echo_last_only = true,
            Variant::NoResync => sync.no_resync = true,
            Variant::FailOnStoreError => engine.fail_on_store_error = true,
            Variant::IgnoreResyncRequests => sync.ignore_resync_requests = true,
        }
        (engine, sync)
    }
}

/// How hard the world pushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// Fault rates drawn from the seed, each up to a moderate maximum (swarm testing).
    Swarm,
    /// No faults at all: the happy path.
    Calm,
    /// Every fault at its maximum rate.
    Storm,
}

impl Profile {
    pub fn parse(name: &str) -> Option<Profile> {
        match name {
            "swarm" => Some(Profile::Swarm),
            "calm" => Some(Profile::Calm),
            "storm" => Some(Profile::Storm),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SimOptions {
    pub seed: u64,
    /// Workload actions (local edits, deletions, duplicates, bad messages).
    pub events: u64,
    pub profile: Profile,
    pub variant: Variant,
    /// Keep every trace entry (for `--trace-out` and determinism diffs).
    pub keep_trace: bool,
}

impl SimOptions {
    pub fn new(seed: u64) -> Self {
        SimOptions {
            seed,
            events: 200,
            profile: Profile::Swarm,
            variant: Variant::Correct,
            keep_trace: false,
        }
    }
}

/// What one run found.
#[derive(Debug, Clone)]
pub struct SimReport {
    pub seed: u64,
    pub hash: u64,
    /// Broken invariants, each tagged `[invariant]`; empty when the run passed.
    pub violations: Vec<String>,
    /// Messages published to the stream.
    pub messages: u64,
    pub virt_ms: u64,
    pub trace: Vec<String>,
    pub summary: String,
}

impl SimReport {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

/// The fault rates of one run.
#[derive(Debug, Clone, Copy)]
struct Swarm {
    nats: NatsFaults,
    payload: AppFaults,
    better_auth: AppFaults,
    store_errors: f64,
    dedup_errors: f64,
    panics: f64,
    crashes: u64,
    volatile_dedup: bool,
    users: u64,
    gap_max_ms: u64,
    idle_ms: u64,
    idle_cache_bytes: usize,
}

impl Swarm {
    fn draw(rng: &mut SimRng, profile: Profile) -> Swarm {
        let scale = match profile {
            Profile::Calm => 0.0,
            Profile::Swarm => 1.0,
            Profile::Storm => 1.0,
        };
        let storm = profile == Profile::Storm;
        let mut rate = |max: f64| {
            let r = if storm { max } else { rng.rate(max) };
            r * scale
        };
        let nats = NatsFaults {
            duplicate: rate(0.05),
            ack_loss: rate(0.05),
            reorder_redeliveries: false,
        };
        let app = |rng_rate: &mut dyn FnMut(f64) -> f64| AppFaults {
            timeout: rng_rate(0.03),
            server_error: rng_rate(0.15),
            throttle: rng_rate(0.05),
            reject: rng_rate(0.02),
            lost_response: rng_rate(0.05),
            latency_max_ms: 0,
            publish_delay_max_ms: 0,
            echo: false,
            echo_delay_max_ms: 0,
            down_from_ms: 0,
            down_until_ms: 0,
        };
        let mut payload = app(&mut rate);
        let mut better_auth = app(&mut rate);
        let store_errors = rate(0.02);
        let dedup_errors = rate(0.02);
        let panics = rate(0.01);
        let nats = NatsFaults {
            reorder_redeliveries: profile != Profile::Calm && rng.chance(0.5),
            ..nats
        };
        for a in [&mut payload, &mut better_auth] {
            a.latency_max_ms = rng.range(0, 30);
            a.publish_delay_max_ms = rng.range(0, 300);
            a.echo = rng.chance(0.6);
            a.echo_delay_max_ms = rng.range(0, 800);
        }
        Swarm {
            nats,
            payload,
            better_auth,
            store_errors,
            dedup_errors,
            panics,
            crashes: if profile == Profile::Calm {
                0
            } else {
                rng.below(3)
            },
            volatile_dedup: rng.chance(0.5),
            users: rng.range(2, 12),
            gap_max_ms: rng.range(1, 60),
            idle_ms: rng.range(100, 3000),
            // Off, small enough that parked states are pushed out, or ample.
            idle_cache_bytes: [0, 4 << 10, 1 << 20][rng.range(0, 2) as usize],
        }
    }
}

/// Handler panics, at a rate drawn from the seed.
struct SimChaos {
    rate: Mutex<f64>,
    rng: Mutex<SimRng>,
    trace: Arc<Trace>,
    clock: Arc<SimClock>,
    /// Panics injected: each drops the messages its actor held, to be redelivered in any order.
    panics: AtomicU64,
}

impl Chaos for SimChaos {
    fn panic_at(&self, site: &'static str) -> bool {
        let rate = self.rate.lock().map(|r| *r).unwrap_or(0.0);
        let hit = rate > 0.0 && self.rng.lock().map(|mut r| r.chance(rate)).unwrap_or(false);
        if hit {
            self.trace
                .record(self.clock.virt_ms(), site, "panic", "injected");
            self.panics.fetch_add(1, Ordering::SeqCst);
        }
        hit
    }
}

/// Runs one seed on its own current-thread runtime with paused time.
pub fn run(options: &SimOptions) -> SimReport {
    silence_injected_panics();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build();
    match runtime {
        Ok(runtime) => runtime.block_on(run_world(options)),
        Err(error) => SimReport {
            seed: options.seed,
            hash: 0,
            violations: vec![format!("[setup] no runtime: {error}")],
            messages: 0,
            virt_ms: 0,
            trace: Vec::new(),
            summary: String::new(),
        },
    }
}

/// Injected panics are expected; a real one still prints.
fn silence_injected_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| info.payload().downcast_ref::<&str>().copied())
                .unwrap_or("");
            if !message.starts_with("injected fault") {
                previous(info);
            }
        }));
    });
}

struct Engine {
    ports_base: PortsBase,
    settings: Arc<PipelineSettings>,
    nats: Arc<FakeNats>,
    epoch: Arc<AtomicU64>,
    stats: Arc<Stats>,
    /// The dedup memory dies with the engine (the memory backend).
    volatile_dedup: bool,
    trace: Arc<Trace>,
}

#[derive(Clone)]
struct PortsBase {
    clock: Arc<SimClock>,
    entropy: Arc<SimEntropy>,
    dedup: Arc<MemDedup>,
    store: Arc<MemStore>,
    chaos: Arc<SimChaos>,
    payload: Arc<SimApp>,
    better_auth: Arc<SimApp>,
}

impl Engine {
    /// Ends the running engine as `why` (a crash, or a pipeline that gave up and exited) and
    /// starts the next one, as a service manager would: what the dead run held comes back from
    /// NATS, from the consumers' ack floors.
    async fn restart(&self, pipeline: &mut Option<Pipeline>, why: &str) {
        let clock = &self.ports_base.clock;
        self.trace.record(clock.virt_ms(), "world", why, "");
        if let Some(p) = pipeline.take() {
            p.kill().await;
        }
        let epoch = self.nats.new_epoch();
        self.epoch.store(epoch, Ordering::SeqCst);
        self.ports_base.store.crash();
        if self.volatile_dedup {
            self.ports_base.dedup.forget_all();
        }
        self.trace
            .record(clock.virt_ms(), "world", "restart", epoch);
        *pipeline = self.start().await;
    }

    /// Whether the engine's pipeline stopped on its own (its supervisor gave up): the engine
    /// then exits non-zero, and is restarted.
    fn gave_up(pipeline: &Option<Pipeline>) -> bool {
        pipeline.as_ref().is_some_and(|p| p.handle.is_finished())
    }

    async fn start(&self) -> Option<Pipeline> {
        let epoch = self.epoch.load(Ordering::SeqCst);
        let base = &self.ports_base;
        let ports = Ports {
            clock: base.clock.clone(),
            entropy: base.entropy.clone(),
            dedup: base.dedup.clone(),
            store: base.store.clone(),
            http: Arc::new(SimTransport {
                payload: base.payload.clone(),
                better_auth: base.better_auth.clone(),
                epoch,
                current_epoch: self.epoch.clone(),
            }),
            chaos: base.chaos.clone(),
        };
        let sources = Sink::ALL
            .iter()
            .map(|sink| {
                let source: Arc<dyn actors::ports::EventSource> = self.nats.source(*sink, epoch);
                (*sink, source)
            })
            .collect();
        Pipeline::start(PipelineArgs {
            ports,
            settings: self.settings.clone(),
            sources,
            stats: self.stats.clone(),
            mirror: None,
        })
        .await
        .ok()
    }
}

fn target(url: &str, keyring: &Keyring) -> TargetSettings {
    TargetSettings {
        url: url.to_string(),
        keyring: keyring.clone(),
        timeout: Duration::from_secs(1),
        max_concurrency: 8,
        coalesce: false,
        retry: RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
            multiplier: 2.0,
            jitter: 0.2,
            max_attempts: 6,
        },
        breaker: actors::breaker::BreakerSettings {
            failures: 5,
            probe_interval: Duration::from_secs(2),
        },
    }
}

async fn run_world(options: &SimOptions) -> SimReport {
    let root = options.seed;
    let swarm = Swarm::draw(&mut SimRng::stream(root, "swarm"), options.profile);
    let trace = Arc::new(Trace::new(options.keep_trace));
    let clock = SimClock::new(1_767_225_600_000);
    let violations = Arc::new(Violations::default());
    let keyring = match Keyring::parse(SigningScheme::StandardWebhooks, &Secret::new(SECRET)) {
        Ok(k) => k,
        Err(error) => {
            return SimReport {
                seed: root,
                hash: 0,
                violations: vec![format!("[setup] {error}")],
                messages: 0,
                virt_ms: 0,
                trace: Vec::new(),
                summary: String::new(),
            }
        }
    };
    let mut swarm = swarm;
    if options.profile != Profile::Calm {
        // Each app may be down for a while: long enough to open its target's circuit.
        let mut rng = SimRng::stream(root, "app-outages");
        let span_ms = options.events * (swarm.gap_max_ms / 2 + 1);
        for faults in [&mut swarm.payload, &mut swarm.better_auth] {
            if rng.chance(0.5) {
                faults.down_from_ms = clock.virt_ms() + rng.below(span_ms.max(1));
                faults.down_until_ms = faults.down_from_ms + rng.range(5_000, 40_000);
            }
        }
    }
    let nats = FakeNats::new(
        clock.clone(),
        trace.clone(),
        root ^ 0x6e617473,
        ACK_WAIT,
        swarm.nats,
    );
    let app = |side: Origin, faults: AppFaults, name: &str| {
        SimApp::new(
            side,
            faults,
            SimRng::stream(root, name),
            keyring.clone(),
            nats.clone(),
            clock.clone(),
            trace.clone(),
            violations.clone(),
        )
    };
    let payload = app(Origin::Payload, swarm.payload, "payload");
    let better_auth = app(Origin::BetterAuth, swarm.better_auth, "better-auth");
    let dedup = Arc::new(MemDedup::new(Flaky::new(
        swarm.dedup_errors,
        SimRng::stream(root, "dedup"),
    )));
    let span_ms = options.events * (swarm.gap_max_ms / 2 + 1);
    let outages = if options.profile == Profile::Calm {
        Outages::default()
    } else {
        Outages::draw(&mut SimRng::stream(root, "store-outages"), span_ms)
    };
    let store = Arc::new(MemStore::new(
        Flaky::new(swarm.store_errors, SimRng::stream(root, "store")),
        outages,
        SimRng::stream(root, "commits"),
        clock.clone(),
        trace.clone(),
    ));
    let chaos = Arc::new(SimChaos {
        rate: Mutex::new(swarm.panics),
        rng: Mutex::new(SimRng::stream(root, "chaos")),
        trace: trace.clone(),
        clock: clock.clone(),
        panics: AtomicU64::new(0),
    });
    let (engine_faults, sync_faults) = options.variant.faults();
    let settings = Arc::new(PipelineSettings {
        max_in_flight: 500,
        user_idle_timeout: Duration::from_millis(swarm.idle_ms),
        idle_cache_bytes: swarm.idle_cache_bytes,
        ack_wait: ACK_WAIT,
        max_message_bytes: MAX_MESSAGE_BYTES,
        max_deliver: None,
        fetch_batch: 32,
        mappings: Mappings::default(),
        policy: Policy {
            clock_skew_ms: 500,
            faults: sync_faults,
        },
        payload: Some(target("sim://payload", &keyring)),
        better_auth: Some(target("sim://better-auth", &keyring)),
        faults: engine_faults,
        started_at_ms: 0,
    });
    let engine = Engine {
        ports_base: PortsBase {
            clock: clock.clone(),
            entropy: Arc::new(SimEntropy(Mutex::new(SimRng::stream(root, "jitter")))),
            dedup: dedup.clone(),
            store: store.clone(),
            chaos: chaos.clone(),
            payload: payload.clone(),
            better_auth: better_auth.clone(),
        },
        settings,
        nats: nats.clone(),
        epoch: Arc::new(AtomicU64::new(0)),
        stats: Arc::new(Stats::default()),
        volatile_dedup: swarm.volatile_dedup,
        trace: trace.clone(),
    };
    let mut pipeline = engine.start().await;
    let mut problems: Vec<String> = Vec::new();
    if pipeline.is_none() {
        problems.push("[setup] the pipeline did not start".into());
    }

    // Chaos: the workload runs while crashes strike at drawn times.
    let oracle = Arc::new(Mutex::new(Oracle::default()));
    let workload = tokio::spawn(workload(
        options.events,
        swarm,
        SimRng::stream(root, "workload"),
        (payload.clone(), better_auth.clone()),
        nats.clone(),
        oracle.clone(),
        (
            PoisonPlanter {
                store: store.clone(),
                rng: SimRng::stream(root, "poison"),
            },
            Drifter::new(root, options.profile),
        ),
    ));
    let mut crash_rng = SimRng::stream(root, "crashes");
    let mut crash_at: Vec<u64> = (0..swarm.crashes)
        .map(|_| crash_rng.below(span_ms.max(1)))
        .collect();
    crash_at.sort_unstable();
    // Until the workload is done and every crash struck: a crash at its time, and a pipeline
    // that gave up is restarted at once.
    let mut gave_up = 0u64;
    let mut crashes = crash_at.into_iter().peekable();
    while !(workload.is_finished() && crashes.peek().is_none()) {
        let now = clock.virt_ms();
        let next = crashes.peek().copied().unwrap_or(u64::MAX);
        let wait = next.saturating_sub(now).clamp(1, WATCH_MS);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        if crashes.peek().is_some_and(|at| *at <= clock.virt_ms()) {
            crashes.next();
            engine.restart(&mut pipeline, "crash").await;
        } else if Engine::gave_up(&pipeline) {
            gave_up += 1;
            engine.restart(&mut pipeline, "gave_up").await;
        }
    }
    let _ = workload.await;

    // Heal: no new faults; dead-lettered deliveries are replayed as an operator would.
    trace.record(clock.virt_ms(), "world", "heal", "");
    nats.heal();
    payload.heal();
    better_auth.heal();
    dedup.heal();
    store.heal();
    if let Ok(mut rate) = chaos.rate.lock() {
        *rate = 0.0;
    }
    let heal_started = clock.virt_ms();
    let mut quiet = false;
    let mut replays = 0u64;
    let mut last_len = trace.len();
    let mut last_change = clock.virt_ms();
    while clock.virt_ms() - heal_started < QUIET_LIMIT_MS {
        for letter in store.take_dead_letters(|l| l.reason.starts_with("delivery_")) {
            if letter.raw.is_empty() {
                problems.push(format!("[lost] a dead-lettered delivery of {:?} cannot be replayed: its message was not kept", letter.event_id));
                continue;
            }
            replays += 1;
            trace.record(
                clock.virt_ms(),
                "world",
                "replay",
                format_args!("{:?}", letter.event_id),
            );
            // As `sync-engine dlq replay` does: a failed delivery comes back as a new event.
            let raw = letter
                .event_id
                .as_deref()
                .and_then(|id| {
                    protocol::envelope::with_id(
                        &letter.raw,
                        &protocol::envelope::replay_id(id, replays),
                    )
                })
                .map(Bytes::from)
                .unwrap_or_else(|| letter.raw.clone());
            nats.publish(&letter.subject, raw);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        if Engine::gave_up(&pipeline) {
            gave_up += 1;
            engine.restart(&mut pipeline, "gave_up").await;
        }
        let len = trace.len();
        if len != last_len {
            last_len = len;
            last_change = clock.virt_ms();
        }
        // A loop is plain long before the limit: stop burning time on it.
        let changes = oracle.lock().map(|o| o.changes).unwrap_or(0);
        let applied =
            payload.applied.load(Ordering::SeqCst) + better_auth.applied.load(Ordering::SeqCst);
        if applied > 12 * changes + 30 {
            break;
        }
        let idle = payload.publishing.load(Ordering::SeqCst) == 0
            && better_auth.publishing.load(Ordering::SeqCst) == 0
            && nats.unsettled() == 0;
        if idle && clock.virt_ms() - last_change >= QUIET_FOR_MS {
            quiet = true;
            break;
        }
    }
    if !quiet {
        problems.push(format!(
            "[quiet] still busy {} virtual seconds after the chaos ended ({} messages unsettled): a sync loop?",
            QUIET_LIMIT_MS / 1000,
            nats.unsettled()
        ));
    }
    if let Some(p) = pipeline.take() {
        p.kill().await;
    }

    // Verdict.
    problems.extend(violations.list().into_iter().map(|v| {
        if v.contains("backwards") {
            format!("[order] {v}")
        } else if v.contains("different content") {
            format!("[duplicate] {v}")
        } else {
            format!("[delivery] {v}")
        }
    }));
    let oracle = match oracle.lock() {
        Ok(mut o) => std::mem::take(&mut *o),
        Err(_) => Oracle::default(),
    };
    for user in oracle.users.keys() {
        let expected = oracle.expected(user);
        for app in [&payload, &better_auth] {
            match &expected {
                None => {
                    if !app.is_deleted_or_absent(user) {
                        problems.push(format!(
                            "[deleted] {user} was deleted but {} still holds {:?}",
                            app.side,
                            app.canonical(user)
                        ));
                    }
                }
                Some(fields) => {
                    let held = app.canonical(user);
                    if held.as_ref() != Some(fields) {
                        problems.push(format!(
                            "[converge] {user} on {}: holds {:?}, expected {:?}",
                            app.side, held, fields
                        ));
                    }
                }
            }
        }
    }
    let letters = store
        .dead_letters
        .lock()
        .map(|l| l.clone())
        .unwrap_or_default();
    for (raw, reason) in &oracle.bad {
        if !letters
            .iter()
            .any(|l| l.raw.as_ref() == raw.as_slice() && &l.reason == reason)
        {
            problems.push(format!(
                "[bad-input] a bad message was not dead-lettered with reason {reason}"
            ));
        }
    }
    let applied =
        payload.applied.load(Ordering::SeqCst) + better_auth.applied.load(Ordering::SeqCst);
    let bound = 12 * oracle.changes + 30;
    if applied > bound {
        problems.push(format!(
            "[loop] {applied} deliveries applied for {} changes (bound {bound})",
            oracle.changes
        ));
    }
    // A user's events reach its actor in stream order, whatever fails (a store outage, a
    // crash): one applied after a later event of its side may have been acknowledged without
    // the delivery it would have made. Handler panics are bugs by definition and drop what the
    // actor held, and a volatile dedup memory forgets, after a crash, events that must then be
    // told from late ones by their timestamps alone: those runs are not held to it.
    let late = Stats::get(&engine.stats.late);
    let panics = chaos.panics.load(Ordering::SeqCst);
    if late > 0 && panics == 0 && !(swarm.volatile_dedup && swarm.crashes > 0) {
        problems.push(format!(
            "[order] {late} events applied after a later event of their side: acknowledged without the delivery they would have made"
        ));
    }
    let unsettled = nats.unsettled();
    if unsettled > 0 {
        problems.push(format!(
            "[unsettled] {unsettled} messages never acknowledged"
        ));
    }
    problems.truncate(20);
    SimReport {
        seed: root,
        hash: trace.hash(),
        violations: problems,
        messages: nats_len(&nats),
        virt_ms: clock.virt_ms(),
        trace: trace.entries(),
        summary: format!(
            "users={} changes={} applied={} crashes={}{} echo(pl={},ba={}) panics={:.3} dedup={}",
            swarm.users,
            oracle.changes,
            applied,
            swarm.crashes,
            if gave_up > 0 {
                format!(" gave_up={gave_up}")
            } else {
                String::new()
            },
            swarm.payload.echo,
            swarm.better_auth.echo,
            swarm.panics,
            if swarm.volatile_dedup {
                "memory"
            } else {
                "durable"
            }
        ),
    }
}

fn nats_len(nats: &FakeNats) -> u64 {
    nats.len()
}

/// The workload: local edits on both sides (also concurrent, on the same and on different
/// fields), deletions, republished duplicates, bad messages and, at the edges, poisoned users
/// and drift.
async fn workload(
    actions: u64,
    swarm: Swarm,
    mut rng: SimRng,
    (payload, better_auth): (Arc<SimApp>, Arc<SimApp>),
    nats: Arc<FakeNats>,
    oracle: Arc<Mutex<Oracle>>,
    (mut planter, mut drifter): (PoisonPlanter, Drifter),
) {
    let mut created = std::collections::BTreeSet::new();
    let mut pool: Vec<u64> = Vec::new();
    let mut next_user = 0u64;
    let mut ba_edit = |rng: &mut SimRng, user: &str, step: u64, oracle: &Mutex<Oracle>| {
        let exists = better_auth.has_user(user);
        if !exists && created.contains(user) {
            return; // deleted: Better Auth never reuses ids
        }
        let fields = fields_for(rng, step, !exists);
        let (ts, _) = better_auth.edit(user, &fields);
        created.insert(user.to_string());
        if let Ok(mut o) = oracle.lock() {
            o.edit(user, Origin::BetterAuth, ts, &fields);
        }
    };
    for step in 0..actions {
        let gap = rng.below(swarm.gap_max_ms + 1);
        if gap > 0 {
            tokio::time::sleep(Duration::from_millis(gap)).await;
        }
        // A pool of `users` live ids; a deleted user's slot goes to a new id (ids are never
        // reused), so long runs keep editing live users.
        let slot = rng.below(swarm.users) as usize;
        if pool.len() < swarm.users as usize {
            pool.resize_with(swarm.users as usize, || {
                next_user += 1;
                next_user - 1
            });
        }
        if oracle
            .lock()
            .map(|o| {
                o.users
                    .get(&format!("u{}", pool[slot]))
                    .is_some_and(|u| u.deleted)
            })
            .unwrap_or(false)
        {
            pool[slot] = next_user;
            next_user += 1;
        }
        let user = format!("u{}", pool[slot]);
        let roll = rng.unit();
        if roll < 0.40 {
            ba_edit(&mut rng, &user, step, &oracle);
        } else if roll < 0.66 {
            if payload.has_user(&user) {
                let fields = fields_for(&mut rng, step, false);
                let (ts, _) = payload.edit(&user, &fields);
                if let Ok(mut o) = oracle.lock() {
                    o.edit(&user, Origin::Payload, ts, &fields);
                }
            } else {
                ba_edit(&mut rng, &user, step, &oracle);
            }
        } else if roll < 0.74 {
            // Both sides edit the same user at the same instant.
            ba_edit(&mut rng, &user, step, &oracle);
            if payload.has_user(&user) {
                let fields = fields_for(&mut rng, step + 1_000_000, false);
                let (ts, _) = payload.edit(&user, &fields);
                if let Ok(mut o) = oracle.lock() {
                    o.edit(&user, Origin::Payload, ts, &fields);
                }
            }
        } else if roll < 0.765 {
            if better_auth.has_user(&user) {
                better_auth.delete(&user);
                if let Ok(mut o) = oracle.lock() {
                    o.delete(&user);
                }
            }
        } else if roll < 0.78 {
            if payload.has_user(&user) {
                payload.delete(&user);
                if let Ok(mut o) = oracle.lock() {
                    o.delete(&user);
                }
            }
        } else if roll < 0.86 {
            nats.republish(rng.next_u64());
        } else if roll < 0.89 {
            let bad = bad_message(&mut rng, step);
            let (subject, raw, reason) = planter.maybe_replace(bad, step);
            nats.publish(&subject, Bytes::from(raw.clone()));
            if let Ok(mut o) = oracle.lock() {
                o.bad.push((raw, reason));
            }
        } else {
            ba_edit(&mut rng, &user, step, &oracle);
        }
        drifter.maybe(&user, (&payload, &better_auth), &oracle);
    }
    drifter.at_end((&payload, &better_auth), &oracle);
}

/// The fields of one local edit, each with a value never used before.
fn fields_for(rng: &mut SimRng, step: u64, create: bool) -> Vec<(String, Value)> {
    const FIELDS: [&str; 3] = ["name", "email", "image"];
    let mut out = Vec::new();
    if create {
        out.push(("email".to_string(), json!(format!("e{step}@x"))));
        out.push(("name".to_string(), json!(format!("n{step}"))));
    } else {
        let n = rng.range(1, 2);
        for _ in 0..n {
            let f = FIELDS[rng.below(3) as usize];
            if !out.iter().any(|(k, _)| k == f) {
                let v = if f == "email" {
                    format!("e{step}-{}@x", out.len())
                } else {
                    format!("{f}{step}-{}", out.len())
                };
                out.push((f.to_string(), json!(v)));
            }
        }
    }
    out
}

/// Turns some bad messages into good events of a user whose stored state is bad, drawing from a
/// stream of its own so that the rest of a seed's workload stays what it was.
/// Drift at the edge (`reconcile`'s business): now and then a Payload row is lost, or a
/// deleted one restored, behind the engine's back, and a resync request from Better Auth
/// follows, as `reconcile --fix` publishes it. Drawn from a stream of its own, and in half of
/// the seeds only, so that the other seeds run exactly as before it existed.
struct Drifter {
    rng: SimRng,
    rate: f64,
}

impl Drifter {
    fn new(root: u64, profile: Profile) -> Drifter {
        let mut rng = SimRng::stream(root, "drift");
        let rate = if profile != Profile::Calm && rng.chance(0.5) {
            rng.rate(0.04)
        } else {
            0.0
        };
        Drifter { rng, rate }
    }

    fn maybe(
        &mut self,
        user: &str,
        (payload, better_auth): (&SimApp, &SimApp),
        oracle: &Mutex<Oracle>,
    ) {
        if self.rate == 0.0 || !self.rng.chance(self.rate) {
            return;
        }
        let drifted = if self.rng.chance(0.5) {
            payload.lose(user).then(|| user.to_string())
        } else {
            let deleted: Vec<String> = oracle
                .lock()
                .map(|o| {
                    o.users
                        .iter()
                        .filter(|(_, u)| u.deleted)
                        .map(|(id, _)| id.clone())
                        .collect()
                })
                .unwrap_or_default();
            let pick = self.rng.below(deleted.len().max(1) as u64) as usize;
            deleted.get(pick).filter(|id| payload.restore(id)).cloned()
        };
        if let Some(user) = drifted {
            Drifter::request(&user, better_auth, oracle);
        }
    }

    /// After the workload: one live user's Payload row lost, with no later event to carry its
    /// user there again; only its resync request can.
    fn at_end(&mut self, (payload, better_auth): (&SimApp, &SimApp), oracle: &Mutex<Oracle>) {
        if self.rate == 0.0 {
            return;
        }
        let live: Vec<String> = oracle
            .lock()
            .map(|o| {
                o.users
                    .iter()
                    .filter(|(_, u)| !u.deleted)
                    .map(|(id, _)| id.clone())
                    .collect()
            })
            .unwrap_or_default();
        let pick = self.rng.below(live.len().max(1) as u64) as usize;
        if let Some(user) = live.get(pick).filter(|id| payload.lose(id)) {
            Drifter::request(user, better_auth, oracle);
        }
    }

    fn request(user: &str, better_auth: &SimApp, oracle: &Mutex<Oracle>) {
        better_auth.request_resync(user);
        if let Ok(mut o) = oracle.lock() {
            o.resync_requested();
        }
    }
}

struct PoisonPlanter {
    store: Arc<MemStore>,
    rng: SimRng,
}

impl PoisonPlanter {
    fn maybe_replace(
        &mut self,
        bad: (String, Vec<u8>, String),
        step: u64,
    ) -> (String, Vec<u8>, String) {
        let (planted, reason) = match self.rng.below(4) {
            0 => (Planted::Corrupt, "corrupt_state"),
            1 => (Planted::Refused, "store_rejected"),
            _ => return bad,
        };
        let user = format!("poison-{step}");
        self.store.plant(UserKey::new(user.clone()), planted);
        let ts = 1_767_225_600_000i64;
        let raw = json!({"id": format!("poison-event-{step}"), "origin": "better-auth", "type": "user.created", "timestamp": ts, "data": {"id": user, "email": "p@x"}}).to_string().into_bytes();
        (format!("user.created.{user}"), raw, reason.to_string())
    }
}

/// One of §4's bad messages, with the reason it must be dead-lettered with.
fn bad_message(rng: &mut SimRng, step: u64) -> (String, Vec<u8>, String) {
    let subject = "user.updated.bad".to_string();
    let ts = 1_767_225_600_000i64;
    let (raw, reason) = match rng.below(6) {
        0 => (format!("{{not json {step}").into_bytes(), "invalid_json"),
        1 => (
            json!({"origin": "better-auth", "type": "user.updated", "timestamp": ts, "data": {"id": "u0", "email": format!("{step}@x")}}).to_string().into_bytes(),
            "missing_field:id",
        ),
        2 => (
            json!({"id": format!("bad-{step}"), "origin": "better-auth", "type": "user.renamed", "timestamp": ts, "data": {"id": "u0"}}).to_string().into_bytes(),
            "unknown_type",
        ),
        3 => (
            json!({"id": format!("bad-{step}"), "origin": "okta", "type": "user.updated", "timestamp": ts, "data": {"id": "u0"}}).to_string().into_bytes(),
            "unknown_origin",
        ),
        4 => (
            json!({"id": format!("bad-{step}"), "origin": "better-auth", "type": "user.updated", "timestamp": ts, "data": {"id": "u0", "email": "x@x", "bio": "x".repeat(MAX_MESSAGE_BYTES)}}).to_string().into_bytes(),
            "too_large",
        ),
        // A user id no store index or subject can take (a NUL, or far too long).
        _ if step % 2 == 0 => (
            json!({"id": format!("bad-{step}"), "origin": "better-auth", "type": "user.created", "timestamp": ts, "data": {"id": if step % 4 == 0 { "u\u{0}0".to_string() } else { "u".repeat(3000) }, "email": "x@x"}}).to_string().into_bytes(),
            "invalid_user_id",
        ),
        _ => (
            json!({"id": format!("bad-{step}"), "origin": "better-auth", "type": "user.created", "timestamp": ts, "data": {"id": "u0"}}).to_string().into_bytes(),
            "missing_field:data.email",
        ),
    };
    (subject, raw, reason.to_string())
}
