//! Unit attention conditions kept by this node for each I_T nexus (SAM-5).
//!
//! A nexus the node has not seen before gets POWER ON, RESET, OR BUS DEVICE RESET OCCURRED
//! on its first command to each LUN. Afterwards the node compares what the nexus last
//! learnt with the present: the LUN inventory (REPORTED LUNS DATA HAS CHANGED), each LUN's
//! capacity (CAPACITY DATA HAS CHANGED), its software write protect (MODE PARAMETERS
//! CHANGED) and this port's asymmetric access state (ASYMMETRIC ACCESS STATE CHANGED). A
//! LOGICAL UNIT RESET or TARGET RESET queues POWER ON, RESET, OR BUS DEVICE RESET OCCURRED
//! for every nexus, the one that asked included (the generic reset code, which initiators
//! such as libiscsi retry on).
//!
//! The LUN table is cluster-wide state, so a nexus connected through any node's portal hears
//! of a capacity or write-protect change made anywhere (through a MODE SELECT on another
//! node, or `migrator lun protect`); the nexus whose MODE SELECT made the change is not told.
//! A reset reaches every node's nexuses because the reset count is cluster-wide too.
//! Conditions are reported one per command, oldest first; reservation conditions live in
//! the cluster-wide reservation state instead.

use std::collections::{HashMap, VecDeque};

use super::TargetView;
use super::sense::{Sense, codes};
use crate::backend::{AluaState, LunInfo, Nexus};

/// At most this many conditions wait per LUN and nexus; more are dropped (the oldest, a
/// reset, tells the initiator to look again anyway).
const MAX_PENDING: usize = 8;

/// The conditions of one LUN for one nexus.
#[derive(Debug)]
struct LuState {
    lun: u64,
    pending: VecDeque<Sense>,
    /// The access state the nexus last learnt.
    alua: AluaState,
    /// The capacity the nexus last learnt, in blocks.
    blocks: u64,
    /// The software write protect the nexus last learnt.
    write_protected: bool,
}

impl LuState {
    fn push(&mut self, s: Sense) {
        if !self.pending.contains(&s) && self.pending.len() < MAX_PENDING {
            self.pending.push_back(s);
        }
    }
}

/// The conditions of one nexus.
#[derive(Debug)]
struct NexusState {
    /// The generation of the LUN table last compared.
    view_gen: u64,
    /// The LUNs visible to the nexus at that point.
    visible: Vec<u64>,
    /// REPORTED LUNS DATA HAS CHANGED is pending.
    luns_changed: bool,
    lus: Vec<LuState>,
}

/// Every nexus's unit attention conditions.
#[derive(Debug, Default)]
pub(crate) struct UnitAttentions {
    nexuses: HashMap<Nexus, NexusState>,
}

impl UnitAttentions {
    /// The nexus's state, created (with `visible` as its known LUN set) on first use, and
    /// brought up to date with `view`.
    fn refresh(
        &mut self,
        nexus: &Nexus,
        view: &TargetView,
        visible: impl FnOnce() -> Vec<u64>,
    ) -> Option<&mut NexusState> {
        if !self.nexuses.contains_key(nexus) {
            let st = NexusState {
                view_gen: view.generation,
                visible: visible(),
                luns_changed: false,
                lus: Vec::new(),
            };
            return Some(self.nexuses.entry(nexus.clone()).or_insert(st));
        }
        let st = self.nexuses.get_mut(nexus)?;
        if st.view_gen != view.generation {
            let now = visible();
            if now != st.visible {
                st.luns_changed = true;
                st.visible = now;
            }
            st.lus.retain_mut(|lu| match view.find(lu.lun) {
                Some(info) => {
                    if info.blocks() != lu.blocks {
                        lu.blocks = info.blocks();
                        lu.push(codes::CAPACITY_CHANGED);
                    }
                    if info.write_protected != lu.write_protected {
                        lu.write_protected = info.write_protected;
                        lu.push(codes::MODE_PARAMETERS_CHANGED);
                    }
                    true
                }
                None => false,
            });
            st.view_gen = view.generation;
        }
        Some(st)
    }

    /// Brings the conditions of `nexus` on `lu` up to date and, with `take`, removes and
    /// returns the oldest one. `alua` is this port's access state for the LUN now.
    pub(crate) fn check(
        &mut self,
        nexus: &Nexus,
        view: &TargetView,
        visible: impl FnOnce() -> Vec<u64>,
        lu: &LunInfo,
        alua: AluaState,
        take: bool,
    ) -> Option<Sense> {
        let st = self.refresh(nexus, view, visible)?;
        let i = match st.lus.iter().position(|l| l.lun == lu.lun) {
            Some(i) => i,
            None => {
                let mut pending = VecDeque::new();
                pending.push_back(codes::RESET_OCCURRED);
                st.lus.push(LuState {
                    lun: lu.lun,
                    pending,
                    alua,
                    blocks: lu.blocks(),
                    write_protected: lu.write_protected,
                });
                st.lus.len() - 1
            }
        };
        let l = &mut st.lus[i];
        if l.alua != alua {
            l.alua = alua;
            l.push(codes::ALUA_CHANGED);
        }
        if !take {
            return None;
        }
        if let Some(s) = l.pending.pop_front() {
            return Some(s);
        }
        if st.luns_changed {
            st.luns_changed = false;
            return Some(codes::LUNS_CHANGED);
        }
        None
    }

    /// REPORT LUNS returned `visible` to `nexus`: its inventory is up to date and REPORTED
    /// LUNS DATA HAS CHANGED is cleared.
    pub(crate) fn luns_reported(&mut self, nexus: &Nexus, view: &TargetView, visible: &[u64]) {
        let Some(st) = self.refresh(nexus, view, || visible.to_vec()) else {
            return;
        };
        st.luns_changed = false;
        if st.visible != visible {
            st.visible = visible.to_vec();
        }
    }

    /// A LOGICAL UNIT RESET (`lun`) or TARGET RESET (`None`) on `target`: every nexus of
    /// the target gets POWER ON, RESET, OR BUS DEVICE RESET OCCURRED on the LUNs concerned.
    pub(crate) fn reset(&mut self, target: &str, lun: Option<u64>) {
        for (n, st) in self.nexuses.iter_mut() {
            if n.target != target {
                continue;
            }
            for l in st.lus.iter_mut().filter(|l| lun.is_none_or(|x| x == l.lun)) {
                l.push(codes::RESET_OCCURRED);
            }
        }
    }

    /// MODE SELECT through `nexus` set LUN `lun`'s software write protect to `on`: that
    /// nexus has learnt it, so the change reaches every other nexus (through the LUN table)
    /// but not this one.
    pub(crate) fn write_protect_set(&mut self, nexus: &Nexus, lun: u64, on: bool) {
        if let Some(st) = self.nexuses.get_mut(nexus) {
            for l in st.lus.iter_mut().filter(|l| l.lun == lun) {
                l.write_protected = on;
            }
        }
    }

    /// The nexus is gone: a new one with the same name starts afresh.
    pub(crate) fn forget(&mut self, nexus: &Nexus) {
        self.nexuses.remove(nexus);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nexus(isid: u8) -> Nexus {
        Nexus {
            initiator: "iqn.i".into(),
            isid: [isid; 6],
            target: "iqn.t".into(),
            tpgt: 1,
            relative_port: 1,
        }
    }

    fn lun(n: u64, blocks: u64) -> LunInfo {
        LunInfo {
            block_size: crate::backend::BLOCK_SIZE,
            lun: n,
            uuid: [n as u8; 16],
            name: String::new(),
            size_bytes: blocks * 4096,
            thin: false,
            write_protected: false,
            write_fence: None,
        }
    }

    fn view(generation: u64, luns: Vec<LunInfo>) -> TargetView {
        TargetView {
            generation,
            backend_gen: None,
            luns,
        }
    }

    #[test]
    fn test_ua_power_on_once_per_lun() {
        let mut ua = UnitAttentions::default();
        let v = view(1, vec![lun(0, 10), lun(1, 10)]);
        let n = nexus(1);
        let all = || vec![0, 1];
        assert_eq!(
            ua.check(&n, &v, all, &v.luns[0], AluaState::ActiveOptimized, true),
            Some(codes::RESET_OCCURRED)
        );
        assert_eq!(
            ua.check(&n, &v, all, &v.luns[0], AluaState::ActiveOptimized, true),
            None
        );
        // An exempt command leaves it pending.
        assert_eq!(
            ua.check(&n, &v, all, &v.luns[1], AluaState::ActiveOptimized, false),
            None
        );
        assert_eq!(
            ua.check(&n, &v, all, &v.luns[1], AluaState::ActiveOptimized, true),
            Some(codes::RESET_OCCURRED)
        );
    }

    #[test]
    fn test_ua_ordering_capacity_alua_luns() {
        let mut ua = UnitAttentions::default();
        let n = nexus(1);
        let v1 = view(1, vec![lun(0, 10)]);
        ua.check(
            &n,
            &v1,
            || vec![0],
            &v1.luns[0],
            AluaState::ActiveOptimized,
            true,
        );
        let v2 = view(2, vec![lun(0, 20), lun(1, 5)]);
        let lu = &v2.luns[0];
        let got: Vec<_> = (0..4)
            .map(|_| {
                ua.check(
                    &n,
                    &v2,
                    || vec![0, 1],
                    lu,
                    AluaState::ActiveNonOptimized,
                    true,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                Some(codes::CAPACITY_CHANGED),
                Some(codes::ALUA_CHANGED),
                Some(codes::LUNS_CHANGED),
                None
            ]
        );
    }

    #[test]
    fn test_ua_report_luns_clears_luns_changed() {
        let mut ua = UnitAttentions::default();
        let n = nexus(1);
        let v1 = view(1, vec![lun(0, 10)]);
        ua.check(
            &n,
            &v1,
            || vec![0],
            &v1.luns[0],
            AluaState::ActiveOptimized,
            true,
        );
        let v2 = view(2, vec![lun(0, 10), lun(1, 10)]);
        ua.luns_reported(&n, &v2, &[0, 1]);
        assert_eq!(
            ua.check(
                &n,
                &v2,
                || vec![0, 1],
                &v2.luns[0],
                AluaState::ActiveOptimized,
                true
            ),
            None
        );
    }

    #[test]
    fn test_ua_reset_reaches_every_nexus_of_target() {
        let mut ua = UnitAttentions::default();
        let v = view(1, vec![lun(0, 10), lun(1, 10)]);
        let (a, b) = (nexus(1), nexus(2));
        for n in [&a, &b] {
            for l in &v.luns {
                ua.check(n, &v, || vec![0, 1], l, AluaState::ActiveOptimized, true);
            }
        }
        ua.reset("iqn.t", Some(1));
        ua.reset("iqn.other", None);
        for n in [&a, &b] {
            assert_eq!(
                ua.check(
                    n,
                    &v,
                    || vec![0, 1],
                    &v.luns[0],
                    AluaState::ActiveOptimized,
                    true
                ),
                None
            );
            assert_eq!(
                ua.check(
                    n,
                    &v,
                    || vec![0, 1],
                    &v.luns[1],
                    AluaState::ActiveOptimized,
                    true
                ),
                Some(codes::RESET_OCCURRED)
            );
        }
        ua.forget(&a);
        assert_eq!(ua.nexuses.len(), 1);
        // A forgotten nexus starts again with a power-on condition.
        assert_eq!(
            ua.check(
                &a,
                &v,
                || vec![0, 1],
                &v.luns[0],
                AluaState::ActiveOptimized,
                true
            ),
            Some(codes::RESET_OCCURRED)
        );
    }

    #[test]
    fn test_ua_write_protect_change_reaches_every_other_nexus_of_the_lun() {
        let mut ua = UnitAttentions::default();
        let v1 = view(1, vec![lun(0, 10), lun(1, 10)]);
        let (a, b) = (nexus(1), nexus(2));
        let check = |ua: &mut UnitAttentions, v: &TargetView, n: &Nexus, l: usize| {
            ua.check(
                n,
                v,
                || vec![0, 1],
                &v.luns[l],
                AluaState::ActiveOptimized,
                true,
            )
        };
        for n in [&a, &b] {
            for l in 0..2 {
                check(&mut ua, &v1, n, l);
            }
        }
        // Nexus a protects LUN 0 with MODE SELECT; the LUN table then shows it.
        ua.write_protect_set(&a, 0, true);
        let mut protected = lun(0, 10);
        protected.write_protected = true;
        let v2 = view(2, vec![protected, lun(1, 10)]);
        assert_eq!(
            check(&mut ua, &v2, &a, 0),
            None,
            "not the nexus that changed it"
        );
        assert_eq!(check(&mut ua, &v2, &b, 1), None, "not another LUN");
        assert_eq!(
            check(&mut ua, &v2, &b, 0),
            Some(codes::MODE_PARAMETERS_CHANGED)
        );
        assert_eq!(check(&mut ua, &v2, &b, 0), None, "once");
        // Cleared elsewhere (another node, the CLI): both nexuses are told.
        let v3 = view(3, vec![lun(0, 10), lun(1, 10)]);
        for n in [&a, &b] {
            assert_eq!(
                check(&mut ua, &v3, n, 0),
                Some(codes::MODE_PARAMETERS_CHANGED)
            );
        }
    }
}
