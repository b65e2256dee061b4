//! Several engines on one set of streams (README: "Running several engines").
//!
//! Each partition (or, unpartitioned, the whole stream pair) is worked on by the one engine
//! holding its lease: a PostgreSQL advisory lock on that engine's lease session
//! ([`crate::adapters::lease_pg`]). The [`Coordinator`] heartbeats the session, plans with the
//! pure [`balance`] what to release and acquire, and starts or stops each partition's work
//! through [`Works`]. Timing, all measured on this engine's monotonic clock against the
//! database's own idle timer (no wall clock is compared):
//! - rounds come every ttl/4 (at most 1 s); a session query answers within ttl/4 or the
//!   session is dropped and every partition's work is stopped at once, so work stops at most
//!   ttl/2 after the last confirmed contact;
//! - the server ends a session silent for 3/4 of the ttl, freeing its locks;
//! - so a partition's work has stopped a quarter of the ttl before anyone else can hold it,
//!   and deliveries stop even earlier ([`LeaseClock`]); saves are fenced besides.

pub mod balance;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actors::ports::{BoxFuture, HttpRequest, HttpResponse, HttpTransport, TransportError};

use crate::adapters::lease_pg::{Fence, PgLeases, WHOLE};

/// How the streams are cut: whole, or into `n` partitions by the server's mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Whole,
    Partitioned(u32),
}

impl Layout {
    pub fn of(partitions: u32) -> Layout {
        match partitions {
            0 => Layout::Whole,
            n => Layout::Partitioned(n),
        }
    }

    /// How many leases there are.
    pub fn count(self) -> u32 {
        match self {
            Layout::Whole => 1,
            Layout::Partitioned(n) => n,
        }
    }

    /// The partition of lease `index` (`None`: the whole stream pair).
    pub fn part(self, index: u32) -> Option<u32> {
        match self {
            Layout::Whole => None,
            Layout::Partitioned(_) => Some(index),
        }
    }

    /// Lease `index`'s number in the lease table.
    pub fn lease_id(self, index: u32) -> i32 {
        match self {
            Layout::Whole => WHOLE,
            Layout::Partitioned(_) => index as i32,
        }
    }

    fn index_of(self, lease_id: i32) -> Option<u32> {
        match self {
            Layout::Whole => (lease_id == WHOLE).then_some(0),
            Layout::Partitioned(n) => u32::try_from(lease_id).ok().filter(|i| *i < n),
        }
    }
}

// A frozen holder's save transaction, which holds its lease row, ends before its lease session
// does, so the next holder's token bump never waits on it for long.
const _: () = assert!(
    crate::adapters::store::IDLE_IN_TRANSACTION_MAX.as_millis()
        < crate::config::LEASE_TTL_MIN.as_millis() * 3 / 4
);

/// Rounds come at most this far apart, whatever the ttl: a round is a few cheap queries, and
/// it is how soon a dead engine's partitions are taken over, or a lost session replaced.
pub const ROUND_EVERY_MAX: Duration = Duration::from_secs(1);

/// The coordinator's round: a heartbeat, then releases and acquisitions.
pub fn round_every(ttl: Duration) -> Duration {
    answer_within(ttl).min(ROUND_EVERY_MAX)
}

/// How long a lease session query may take before the session counts as lost.
pub fn answer_within(ttl: Duration) -> Duration {
    ttl / 4
}

/// The lease session's `idle_session_timeout`.
pub fn idle_session_timeout(ttl: Duration) -> Duration {
    ttl * 3 / 4
}

/// Deliveries of a partition stop once the last confirmed contact is this old.
pub fn deliveries_stop_after(ttl: Duration) -> Duration {
    let after = ttl / 2;
    assert!(round_every(ttl) <= answer_within(ttl));
    assert!(after + answer_within(ttl) <= idle_session_timeout(ttl));
    after
}

/// Starts and stops one partition's work (its consumers and its actors).
pub trait Works: Send + Sync {
    type Work: Send;

    /// Starts the work of `part` (`None`: the whole stream pair) under `fence`.
    fn start(
        &self,
        part: Option<u32>,
        fence: Fence,
        clock: LeaseClock,
    ) -> impl Future<Output = anyhow::Result<Self::Work>> + Send;

    /// Stops `work`: within `grace` letting what is in flight finish, or at once (`None`).
    fn stop(&self, work: Self::Work, grace: Option<Duration>) -> impl Future<Output = ()> + Send;

    /// Whether `work` stopped by itself (its supervisor gave up on a part that kept failing).
    fn failed(&self, work: &Self::Work) -> bool;
}

/// The lease figures `/metrics` shows.
#[derive(Debug, Default)]
pub struct Figures {
    pub owned: AtomicU64,
    pub acquired: AtomicU64,
    pub released: AtomicU64,
    pub lost: AtomicU64,
}

/// When the partitions' deliveries must stop: the last confirmed contact with the lease
/// session plus [`deliveries_stop_after`], on this process's monotonic clock.
#[derive(Debug, Clone)]
pub struct LeaseClock {
    origin: Instant,
    valid_until_ms: Arc<AtomicI64>,
}

impl LeaseClock {
    fn new() -> LeaseClock {
        LeaseClock {
            origin: Instant::now(),
            valid_until_ms: Arc::new(AtomicI64::new(0)),
        }
    }

    fn confirm(&self, contact_sent_at: Instant, ttl: Duration) {
        let until = contact_sent_at + deliveries_stop_after(ttl);
        let ms = until.saturating_duration_since(self.origin).as_millis() as i64;
        self.valid_until_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn end(&self) {
        self.valid_until_ms.store(0, Ordering::Relaxed);
    }

    pub fn is_valid(&self) -> bool {
        let now = self.origin.elapsed().as_millis() as i64;
        now < self.valid_until_ms.load(Ordering::Relaxed)
    }
}

/// Sends a partition's deliveries only while its lease is confirmed: an engine that was
/// paused sends nothing when it wakes, before it learns that its lease is gone.
pub struct LeasedTransport {
    pub inner: Arc<dyn HttpTransport>,
    pub clock: LeaseClock,
}

impl HttpTransport for LeasedTransport {
    fn post(&self, request: HttpRequest) -> BoxFuture<'_, Result<HttpResponse, TransportError>> {
        if !self.clock.is_valid() {
            return Box::pin(async {
                Err(TransportError::Other(
                    "the partition's lease is not confirmed; not sent".into(),
                ))
            });
        }
        self.inner.post(request)
    }
}

/// Where the coordinator finds its lease session.
pub struct LeaseSettings {
    pub url: String,
    pub scope: String,
    pub member: String,
    pub ttl: Duration,
    pub layout: Layout,
}

/// Holds this engine's leases and the work under them.
pub struct Coordinator<W: Works> {
    works: W,
    settings: LeaseSettings,
    figures: Arc<Figures>,
    session: Option<PgLeases>,
    clock: LeaseClock,
    held: BTreeMap<u32, (Fence, W::Work)>,
}

impl<W: Works> Coordinator<W> {
    pub fn new(works: W, settings: LeaseSettings, figures: Arc<Figures>) -> Self {
        Coordinator {
            works,
            settings,
            figures,
            session: None,
            clock: LeaseClock::new(),
            held: BTreeMap::new(),
        }
    }

    /// Runs rounds until `shutdown`, then stops the work within `grace` and leaves.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>, grace: Duration) {
        let every = round_every(self.settings.ttl);
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            self.round().await;
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(every) => {}
            }
        }
        let held = std::mem::take(&mut self.held);
        let stops = held
            .into_values()
            .map(|(_, work)| self.works.stop(work, Some(grace)));
        futures::future::join_all(stops).await;
        if let Some(session) = self.session.take() {
            session.leave().await;
        }
        self.figures.owned.store(0, Ordering::Relaxed);
    }

    async fn round(&mut self) {
        let every = answer_within(self.settings.ttl);
        let sent = Instant::now();
        let Some(roster) = self.heartbeat().await else {
            self.lose_all().await;
            return;
        };
        self.clock.confirm(sent, self.settings.ttl);
        let layout = self.settings.layout;
        let others: BTreeMap<u32, String> = roster
            .holders
            .iter()
            .filter_map(|(id, holder)| Some((layout.index_of(*id)?, holder.clone())))
            .filter(|(index, _)| !self.held.contains_key(index))
            .collect();
        let failed: Vec<u32> = self
            .held
            .iter()
            .filter(|(_, (_, work))| self.works.failed(work))
            .map(|(index, _)| *index)
            .collect();
        for index in failed {
            // Given back rather than kept dead: the next round (here or elsewhere) starts it
            // afresh from its ack floor.
            tracing::error!(message = "A partition's work stopped: one of its parts kept failing; giving its lease back.", partition = %self.name(index));
            self.release(index, every).await;
        }
        let mine: BTreeSet<u32> = self.held.keys().copied().collect();
        let plan = balance::plan(&balance::View {
            partitions: layout.count(),
            members: &roster.members,
            me: &self.settings.member,
            mine: &mine,
            others: &others,
        });
        for index in plan.release {
            self.release(index, every).await;
        }
        self.acquire(plan.acquire, every).await;
        self.figures
            .owned
            .store(self.held.len() as u64, Ordering::Relaxed);
    }

    /// The roster, or `None` once the session is gone (it is dropped: its locks with it).
    async fn heartbeat(&mut self) -> Option<crate::adapters::lease_pg::Roster> {
        let every = answer_within(self.settings.ttl);
        if self.session.is_none() {
            // Work only ever runs under a lock of the session it was started in.
            assert!(self.held.is_empty(), "work held without a lease session");
            let s = &self.settings;
            let connect =
                PgLeases::connect(&s.url, &s.scope, &s.member, idle_session_timeout(s.ttl));
            match tokio::time::timeout(every, connect).await {
                Ok(Ok(session)) => self.session = Some(session),
                Ok(Err(error)) => {
                    tracing::warn!(message = "Cannot open the lease session; holding no partition.", error = %crate::adapters::errors::describe(&error));
                    return None;
                }
                Err(_) => {
                    tracing::warn!(
                        message = "The lease session did not open in time; holding no partition."
                    );
                    return None;
                }
            }
        }
        let session = self.session.as_mut()?;
        let ids: Vec<i32> = (0..self.settings.layout.count())
            .map(|i| self.settings.layout.lease_id(i))
            .collect();
        match tokio::time::timeout(every, session.heartbeat(&ids)).await {
            Ok(Ok(roster)) => Some(roster),
            failed => {
                let error = match failed {
                    Ok(Err(error)) => crate::adapters::errors::describe(&error),
                    _ => "no answer in time".to_string(),
                };
                tracing::warn!(message = "Lost the lease session; stopping the work of every partition held.", %error, n_held = self.held.len());
                self.session = None;
                None
            }
        }
    }

    /// The session is gone: every partition's work stops at once.
    async fn lose_all(&mut self) {
        self.clock.end();
        let held = std::mem::take(&mut self.held);
        for (index, (fence, work)) in held {
            self.works.stop(work, None).await;
            self.figures.lost.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(message = "Lease lost.", partition = %self.name(index), token = fence.token);
        }
        self.figures.owned.store(0, Ordering::Relaxed);
    }

    /// Stops `index`'s work, then gives its lock up. The log line comes between the two, so
    /// that each engine's logged holding spans its work and lies within its lock.
    async fn release(&mut self, index: u32, every: Duration) {
        let Some((fence, work)) = self.held.remove(&index) else {
            return;
        };
        self.works.stop(work, Some(every)).await;
        self.give_back(index, &fence, every).await;
    }

    async fn give_back(&mut self, index: u32, fence: &Fence, every: Duration) {
        self.figures.released.fetch_add(1, Ordering::Relaxed);
        tracing::info!(message = "Lease released.", partition = %self.name(index), token = fence.token, member = %self.settings.member);
        let released = match self.session.as_mut() {
            Some(session) => tokio::time::timeout(every, session.release(fence)).await,
            None => return,
        };
        if !matches!(released, Ok(Ok(()))) {
            // The lock may still be held: only ending the session frees it for sure.
            self.session = None;
            self.lose_all().await;
        }
    }

    async fn acquire(&mut self, indexes: Vec<u32>, every: Duration) {
        let layout = self.settings.layout;
        let mut fences = Vec::new();
        for index in indexes {
            let Some(session) = self.session.as_mut() else {
                return;
            };
            match tokio::time::timeout(every, session.try_acquire(layout.lease_id(index))).await {
                Ok(Ok(Some(fence))) => {
                    self.figures.acquired.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(message = "Lease acquired.", partition = %self.name(index), token = fence.token, member = %self.settings.member);
                    fences.push((index, fence));
                }
                Ok(Ok(None)) => {}
                _ => {
                    self.session = None;
                    self.lose_all().await;
                    return;
                }
            }
        }
        let works = &self.works;
        let clock = &self.clock;
        let starts = fences.into_iter().map(|(index, fence)| async move {
            let started = works
                .start(layout.part(index), fence.clone(), clock.clone())
                .await;
            (index, fence, started)
        });
        for (index, fence, started) in futures::future::join_all(starts).await {
            match started {
                Ok(work) if self.session.is_some() => {
                    self.held.insert(index, (fence, work));
                }
                Ok(work) => {
                    // The session ended while it started: the lock went with it.
                    self.works.stop(work, None).await;
                    self.figures.lost.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(message = "Lease lost.", partition = %self.name(index), token = fence.token);
                }
                Err(error) => {
                    tracing::warn!(message = "Cannot start a partition's work; giving its lease back.", partition = %self.name(index), %error);
                    self.give_back(index, &fence, every).await;
                }
            }
        }
    }

    fn name(&self, index: u32) -> String {
        match self.settings.layout.part(index) {
            None => "whole".into(),
            Some(p) => p.to_string(),
        }
    }
}
