//! Which partitions this engine should hold: a pure function of the live members and of what
//! is held, so that every engine, each deciding alone, reaches the same balance.
//!
//! Each member's quota is ⌊N/k⌋ or ⌈N/k⌉ by its rank among the k live members (sorted by
//! name), and the quotas add up to N. A member above its quota releases the partitions it
//! prefers least; one below takes free partitions it prefers most. Once membership stops
//! changing, every member holds its quota and no partition is left free. Preferences are a
//! hash of (member, partition): members rarely reach for the same free partition, and a
//! member keeps what it holds (no churn at rest).
//!
//! Two engines never hold one partition: the lock does that, not this plan. The plan only
//! has to converge.

use std::collections::{BTreeMap, BTreeSet};

use sha2::{Digest, Sha256};

/// What one engine sees when it plans.
#[derive(Debug, Clone)]
pub struct View<'a> {
    pub partitions: u32,
    /// Live members, this engine included.
    pub members: &'a BTreeSet<String>,
    pub me: &'a str,
    /// The partitions this engine holds.
    pub mine: &'a BTreeSet<u32>,
    /// The partitions other live members hold, as far as this engine knows.
    pub others: &'a BTreeMap<u32, String>,
}

/// What to do now: release first, then acquire.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub release: Vec<u32>,
    pub acquire: Vec<u32>,
}

/// This engine's share: ⌈N/k⌉ for the N mod k members holding the most (ties by name), ⌊N/k⌋
/// for the others, so that a member joining or a standby waiting never takes work from a
/// member that already has its share.
pub fn quota(view: &View) -> u32 {
    let k = view.members.len().max(1) as u32;
    let held = |member: &str| -> usize {
        if member == view.me {
            view.mine.len()
        } else {
            view.others.values().filter(|m| *m == member).count()
        }
    };
    let mut ranked: Vec<&String> = view.members.iter().collect();
    ranked.sort_by_key(|m| (std::cmp::Reverse(held(m)), m.as_str()));
    let rank = ranked
        .iter()
        .position(|m| *m == view.me)
        .unwrap_or(ranked.len()) as u32;
    let share = view.partitions / k + u32::from(rank < view.partitions % k);
    assert!(share <= view.partitions.div_ceil(k));
    share
}

/// The partitions to release and to try to acquire now.
pub fn plan(view: &View) -> Plan {
    let quota = quota(view) as usize;
    let mut plan = Plan::default();
    if view.mine.len() > quota {
        let mut held: Vec<u32> = view.mine.iter().copied().collect();
        held.sort_by_key(|p| std::cmp::Reverse(preference(view.me, *p)));
        plan.release = held.split_off(quota);
    } else if view.mine.len() < quota {
        let mut free: Vec<u32> = (0..view.partitions)
            .filter(|p| !view.mine.contains(p) && !view.others.contains_key(p))
            .collect();
        free.sort_by_key(|p| std::cmp::Reverse(preference(view.me, *p)));
        free.truncate(quota - view.mine.len());
        plan.acquire = free;
    }
    assert!(plan.release.is_empty() || plan.acquire.is_empty());
    plan
}

/// How much `member` wants `partition`: a stable hash, different for each member.
fn preference(member: &str, partition: u32) -> u64 {
    let digest = Sha256::new()
        .chain_update(member.as_bytes())
        .chain_update(partition.to_be_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The world: who holds what (the lock makes it one holder per partition).
    #[derive(Default)]
    struct Locks(BTreeMap<u32, String>);

    impl Locks {
        fn held_by(&self, member: &str) -> BTreeSet<u32> {
            self.0
                .iter()
                .filter(|(_, m)| *m == member)
                .map(|(p, _)| *p)
                .collect()
        }

        /// One member's round: it sees the others' holdings, releases, then tries its locks.
        fn round(&mut self, partitions: u32, members: &BTreeSet<String>, me: &str) {
            let mine = self.held_by(me);
            let others: BTreeMap<u32, String> = self
                .0
                .iter()
                .filter(|(_, m)| *m != me)
                .map(|(p, m)| (*p, m.clone()))
                .collect();
            let plan = plan(&View {
                partitions,
                members,
                me,
                mine: &mine,
                others: &others,
            });
            for p in plan.release {
                assert_eq!(self.0.remove(&p).as_deref(), Some(me));
            }
            for p in plan.acquire {
                self.0.entry(p).or_insert_with(|| me.to_string());
            }
        }
    }

    fn settle(locks: &mut Locks, partitions: u32, members: &BTreeSet<String>, order: &[usize]) {
        let names: Vec<String> = members.iter().cloned().collect();
        for _ in 0..4 {
            for i in order {
                if let Some(me) = names.get(i % names.len().max(1)) {
                    locks.round(partitions, members, me);
                }
            }
            for me in &names {
                locks.round(partitions, members, me);
            }
        }
    }

    fn assert_balanced(locks: &Locks, partitions: u32, members: &BTreeSet<String>) {
        let k = members.len() as u32;
        for member in members {
            let held = locks.held_by(member).len() as u32;
            assert!(
                held == partitions / k || held == partitions.div_ceil(k),
                "{member} holds {held} of {partitions} with {k} members"
            );
        }
        assert_eq!(locks.0.len() as u32, partitions, "every partition held");
    }

    #[test]
    fn a_standby_never_takes_the_work_of_the_engine_that_has_it() {
        let members: BTreeSet<String> = ["a", "b"].map(String::from).into();
        let mut locks = Locks::default();
        settle(&mut locks, 1, &[String::from("b")].into(), &[0]);
        settle(&mut locks, 1, &members, &[0, 1]);
        assert_eq!(locks.held_by("b").len(), 1, "b had it first and keeps it");
    }

    #[test]
    fn at_rest_nothing_moves() {
        let members: BTreeSet<String> = ["a", "b", "c"].map(String::from).into();
        let mut locks = Locks::default();
        settle(&mut locks, 16, &members, &[0, 1, 2]);
        let before = locks.0.clone();
        settle(&mut locks, 16, &members, &[2, 1, 0]);
        assert_eq!(before, locks.0);
    }

    proptest! {
        /// Members join and leave (a leaving member's partitions are freed, as its lock is);
        /// after each change and a few rounds in any order, each holds ⌊N/k⌋ or ⌈N/k⌉ and
        /// every partition is held.
        #[test]
        fn ownership_rebalances_to_floor_or_ceiling(
            partitions in 1u32..64,
            changes in proptest::collection::vec((any::<bool>(), 0u8..6), 1..12),
            order in proptest::collection::vec(0usize..6, 0..12),
        ) {
            let mut members = BTreeSet::new();
            let mut locks = Locks::default();
            for (join, who) in changes {
                let name = format!("engine-{who}");
                if join {
                    members.insert(name);
                } else {
                    members.remove(&name);
                    locks.0.retain(|_, m| *m != name);
                }
                if members.is_empty() {
                    continue;
                }
                settle(&mut locks, partitions, &members, &order);
                assert_balanced(&locks, partitions, &members);
            }
        }
    }
}
