//! The node's guests. For every VM this node owns, the agent here makes what runs match what
//! the operator wants: it starts QEMU for a VM that should run, shuts down one that should
//! not, restarts one whose QEMU crashed (up to [`RESTART_LIMIT`] times in a row), and
//! reports each VM's state to the cluster, where `vm list` and `vm show` read it.
//!
//! QEMU runs daemonized with its files in `<data dir>/vms/<vm id>/`, so a restart of csvd
//! does not stop guests: at start the agent adopts every QEMU still running there.
//!
//! A guest that powers itself off stays off: the agent records that the VM should be
//! stopped, as an operator's `vm stop` would.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use csvd_hypervisor::accel::{self, Accel, AccelChoice, AccelDecision};
use csvd_hypervisor::cmdline::{Boot, DiskAttach, LaunchSpec, NicAttach};
use csvd_hypervisor::process::{Instance, Stopped};
use csvd_raft::command::Command;
use csvd_raft::migration::{MigrationId, MigrationPhase, MigrationRecord};
use csvd_raft::node::now_ms;
use csvd_raft::vm::{VmBoot, VmDesired, VmRecord, VmState, node_initiator_name};
use csvd_raft::volume::iscsi_target_name;
use csvd_raft::{ClusterState, MetaNode, NodeId};
use tokio::sync::mpsc;
use uuid::Uuid;

/// Crash restarts in a row before the agent gives up on a VM (until it is started again).
pub const RESTART_LIMIT: u32 = 3;
/// How long a guest has to power off when asked, before QEMU is told to quit.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// How long QEMU may take to start and answer on its QMP socket.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the agent checks even without a change of the cluster state.
const RECONCILE_EVERY: Duration = Duration::from_secs(2);

/// What the agent needs from the node's configuration.
#[derive(Debug, Clone)]
pub struct VmHostConfig {
    pub node_id: NodeId,
    pub data_dir: PathBuf,
    pub qemu: PathBuf,
    pub accel: AccelChoice,
    pub probe_kernel: Option<PathBuf>,
    /// This node's iSCSI portal; the node's guests reach their disks through it.
    pub iscsi_addr: SocketAddr,
    /// The shared volumes (a quick migration saves and restores guests there).
    pub csv: crate::shared::Shared,
}

/// The run directory of a VM's QEMU on this node.
pub fn run_dir(data_dir: &Path, vm: Uuid) -> PathBuf {
    data_dir.join("vms").join(vm.to_string())
}

/// What the agent knows about one VM's QEMU on this node.
enum Slot {
    Starting,
    Running {
        inst: Instance,
        stopping: bool,
        restarts: u32,
    },
    /// The destination of a migration: paused, receiving the VM's state.
    Incoming {
        inst: Instance,
        migration: MigrationId,
    },
}

/// News from the agent's tasks.
enum Event {
    Started {
        id: Uuid,
        result: Result<Instance, String>,
        restarts: u32,
    },
    /// QEMU ended; `guest_off` when the guest powered itself off, `load_failed` when it
    /// said that loading an incoming migration failed (its stream broke off).
    Ended {
        id: Uuid,
        guest_off: bool,
        load_failed: bool,
    },
    ShutDown {
        id: Uuid,
        how: Stopped,
    },
    /// The destination's QEMU of a migration started (and listens, on the address given)
    /// or could not.
    Incoming {
        id: Uuid,
        migration: MigrationId,
        result: Result<(Instance, Option<String>), String>,
    },
    /// The source's part of a migration ended.
    Sent {
        migration: MigrationId,
        end: crate::migrate::SourceEnd,
    },
}

struct Agent {
    node: MetaNode,
    cfg: VmHostConfig,
    /// The accelerator, or why this node cannot run guests.
    accel: Result<AccelDecision, String>,
    slots: HashMap<Uuid, Slot>,
    /// VMs whose start failed or that crashed too often: not tried again until the operator
    /// starts them again (desired state back through stopped).
    given_up: HashSet<Uuid>,
    /// Migrations whose source part runs here.
    sending: HashSet<MigrationId>,
    /// Migrations from here whose QEMU was given its migration settings while the
    /// destination started (see [`crate::migrate::configure`]).
    configuring: HashMap<MigrationId, tokio::task::JoinHandle<Result<(), String>>>,
    /// The named CPU models QEMU runs here, once listed.
    cpu_models: Option<Vec<String>>,
    /// Whether the cluster has them.
    cpu_reported: bool,
    /// Migrations whose destination QEMU is being started here.
    receiving: HashSet<MigrationId>,
    events: mpsc::UnboundedSender<Event>,
}

/// Starts the agent.
pub fn spawn(node: MetaNode, cfg: VmHostConfig) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(node, cfg))
}

async fn run(node: MetaNode, cfg: VmHostConfig) {
    let accel = decide_accel(&cfg).await;
    match &accel {
        Ok(d) => {
            tracing::info!(accel = %d.accel, reason = %d.reason, "guests run under {}", d.accel)
        }
        Err(e) => tracing::warn!(error = %e, "this node cannot run guests"),
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut agent = Agent {
        node: node.clone(),
        cfg,
        accel,
        slots: HashMap::new(),
        given_up: HashSet::new(),
        sending: HashSet::new(),
        configuring: HashMap::new(),
        cpu_models: None,
        cpu_reported: false,
        receiving: HashSet::new(),
        events: tx,
    };
    agent.adopt_all().await;
    let mut states = node.subscribe();
    let mut tick = tokio::time::interval(RECONCILE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = states.changed() => if changed.is_err() { return },
            Some(ev) = rx.recv() => agent.on_event(ev).await,
        }
        // The view is shared, not copied (a copy per change would cost the whole state).
        let view = node.local_view();
        if !agent.cpu_reported && view.state.cluster_id.is_some() {
            agent.cpu_reported = agent.report_cpu().await;
        }
        agent.reconcile(&view.state).await;
    }
}

async fn decide_accel(cfg: &VmHostConfig) -> Result<AccelDecision, String> {
    let version = accel::qemu_version(&cfg.qemu).await?;
    accel::check_version(version)?;
    let kernel = accel::probe_kernel(cfg.probe_kernel.as_deref());
    Ok(accel::decide(
        &cfg.qemu,
        cfg.accel,
        kernel.as_deref(),
        Duration::from_secs(30),
    )
    .await)
}

impl Agent {
    fn me(&self) -> NodeId {
        self.cfg.node_id
    }

    /// The accelerator this node's guests run under, as reports name it.
    fn accel_name(&self) -> String {
        self.accel
            .as_ref()
            .map(|d| d.accel.to_string())
            .unwrap_or_default()
    }

    /// Reports what this node's guests run on, for `cluster-baseline` and migration checks;
    /// true once recorded (or when there is nothing to report).
    async fn report_cpu(&mut self) -> bool {
        let Ok(d) = &self.accel else {
            return true;
        };
        let accel = d.accel;
        if self.cpu_models.is_none() {
            match accel::runnable_cpu_models(&self.cfg.qemu, accel).await {
                Ok(models) => self.cpu_models = Some(models),
                Err(e) => {
                    // The accelerator still counts for migrations; no named model does.
                    tracing::warn!(error = %e, "cannot list the CPU models QEMU runs here");
                    self.cpu_models = Some(Vec::new());
                }
            }
        }
        let cpu = csvd_raft::vm::NodeCpu {
            accel: accel.to_string(),
            models: self.cpu_models.clone().unwrap_or_default(),
        };
        let cmd = Command::ReportNodeCpu {
            node: self.me(),
            cpu,
        };
        match self.node.write(cmd).await {
            Ok(_) => true,
            Err(e) => {
                tracing::debug!(error = %e, "CPU models not recorded yet");
                false
            }
        }
    }

    /// Adopts the QEMUs that still run from an earlier start of this daemon.
    async fn adopt_all(&mut self) {
        let Ok(entries) = std::fs::read_dir(self.cfg.data_dir.join("vms")) else {
            return;
        };
        for entry in entries.flatten() {
            let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<Uuid>().ok())
            else {
                continue;
            };
            match Instance::adopt(&entry.path(), Duration::from_secs(10)).await {
                Ok(Some(inst)) => {
                    self.watch(id, &inst);
                    // The destination QEMU of a migration still under way (or committed but
                    // not yet resumed) is adopted as such.
                    let view = self.node.local_view();
                    let state = &view.state;
                    let me = self.me();
                    let incoming = state.migrations.values().find(|m| {
                        m.vm == id
                            && m.dest == me
                            && matches!(
                                m.phase,
                                MigrationPhase::Ready
                                    | MigrationPhase::Copying
                                    | MigrationPhase::Committed
                            )
                    });
                    match incoming {
                        Some(m) => {
                            tracing::info!(vm = %id, pid = inst.pid, migration = m.id, "adopted a migration's destination guest");
                            self.slots.insert(
                                id,
                                Slot::Incoming {
                                    inst,
                                    migration: m.id,
                                },
                            );
                        }
                        None => {
                            tracing::info!(vm = %id, pid = inst.pid, "adopted a running guest");
                            self.slots.insert(
                                id,
                                Slot::Running {
                                    inst,
                                    stopping: false,
                                    restarts: 0,
                                },
                            );
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(vm = %id, error = %e, "cannot adopt a guest"),
            }
        }
    }

    async fn report(&self, id: Uuid, state: VmState, detail: String, restarts: u32) {
        let cmd = Command::ReportVm {
            id,
            node: self.me(),
            state,
            detail,
            restarts,
            at_ms: now_ms(),
        };
        if let Err(e) = self.node.write(cmd).await {
            tracing::debug!(vm = %id, error = %e, "VM report not recorded");
        }
    }

    /// Makes what runs here match the cluster state.
    async fn reconcile(&mut self, state: &ClusterState) {
        let me = self.me();
        self.migrations(state).await;
        for vm in state.vms.values().filter(|v| v.owner == me) {
            if vm.desired == VmDesired::Stopped {
                self.given_up.remove(&vm.id);
            }
            // What this node last said of the guest.
            let reported = vm
                .runtime
                .as_ref()
                .filter(|r| r.node == me)
                .map(|r| r.state);
            match (vm.desired, self.slots.get_mut(&vm.id)) {
                (VmDesired::Running | VmDesired::Paused, None)
                    if !self.given_up.contains(&vm.id) =>
                {
                    // A paused VM starts running and is paused by the next pass.
                    self.start(state, vm, 0).await;
                }
                // Paused but wanted running, or the other way round: QMP `cont` or `stop`.
                (
                    want @ (VmDesired::Running | VmDesired::Paused),
                    Some(Slot::Running {
                        inst,
                        stopping: false,
                        restarts,
                    }),
                ) if reported
                    == Some(if want == VmDesired::Paused {
                        VmState::Running
                    } else {
                        VmState::Paused
                    }) =>
                {
                    let (inst, restarts) = (inst.clone(), *restarts);
                    let (done, now, verb) = if want == VmDesired::Paused {
                        (inst.qmp.stop().await, VmState::Paused, "pause")
                    } else {
                        (inst.qmp.cont().await, VmState::Running, "resume")
                    };
                    match done {
                        Ok(()) => {
                            tracing::info!(vm = %vm.id, "guest {verb}d");
                            self.report(vm.id, now, self.accel_name(), restarts).await;
                        }
                        Err(e) => {
                            tracing::warn!(vm = %vm.id, error = %e, "cannot {verb} the guest")
                        }
                    }
                }
                (VmDesired::Stopped, Some(Slot::Running { inst, stopping, .. })) if !*stopping => {
                    *stopping = true;
                    let (inst, tx, id) = (inst.clone(), self.events.clone(), vm.id);
                    let paused = reported == Some(VmState::Paused);
                    tokio::spawn(async move {
                        // A paused guest cannot answer the power button.
                        if paused {
                            let _ = inst.qmp.cont().await;
                        }
                        let how = inst.shutdown(SHUTDOWN_GRACE).await;
                        let _ = tx.send(Event::ShutDown { id, how });
                    });
                }
                (VmDesired::Stopped, None)
                    if vm.runtime.as_ref().is_some_and(|r| {
                        r.node == me && !matches!(r.state, VmState::Stopped | VmState::Failed)
                    }) =>
                {
                    // Nothing runs, yet the last report says otherwise (for example after
                    // this node restarted while the guest was gone).
                    self.report(vm.id, VmState::Stopped, String::new(), 0).await;
                }
                _ => {}
            }
        }
        // A QEMU here for a VM that is gone or owned elsewhere must not keep writing.
        let strays: Vec<Uuid> = self
            .slots
            .iter()
            .filter(|(id, slot)| {
                matches!(
                    slot,
                    Slot::Running {
                        stopping: false,
                        ..
                    }
                ) && state.vms.get(id).is_none_or(|v| v.owner != me)
                    // The source of a migration stops its QEMU itself after the switchover;
                    // until a post-copy ends, the source's QEMU serves the destination's pages
                    // (also when this daemon restarted meanwhile).
                    && !state.migrations.values().any(|m| {
                        m.vm == **id
                            && m.source == me
                            && (self.sending.contains(&m.id) || !m.phase.is_terminal())
                    })
            })
            .map(|(id, _)| *id)
            .collect();
        for id in strays {
            if let Some(Slot::Running { inst, stopping, .. }) = self.slots.get_mut(&id) {
                tracing::warn!(vm = %id, "a guest runs here for a VM this node does not own: stopping it");
                *stopping = true;
                let (inst, tx) = (inst.clone(), self.events.clone());
                tokio::spawn(async move {
                    inst.kill().await;
                    let _ = tx.send(Event::ShutDown {
                        id,
                        how: Stopped::Killed,
                    });
                });
            }
        }
    }

    /// Starts `vm`'s QEMU in the background (the result comes back as an event).
    async fn start(&mut self, state: &ClusterState, vm: &VmRecord, restarts: u32) {
        let accel = match &self.accel {
            Ok(d) => d.accel,
            Err(e) => {
                let why = format!("this node cannot run guests: {e}");
                self.given_up.insert(vm.id);
                self.report(vm.id, VmState::Failed, why, restarts).await;
                return;
            }
        };
        let spec = match launch_spec(state, vm, &self.cfg, accel) {
            Ok(s) => s,
            Err(why) => {
                self.given_up.insert(vm.id);
                self.report(vm.id, VmState::Failed, why, restarts).await;
                return;
            }
        };
        self.slots.insert(vm.id, Slot::Starting);
        self.report(vm.id, VmState::Starting, accel.to_string(), restarts)
            .await;
        let (qemu, tx, id) = (self.cfg.qemu.clone(), self.events.clone(), vm.id);
        tokio::spawn(async move {
            let result = match prepare_nics(&spec.nics).await {
                Ok(()) => Instance::start(&qemu, &spec, START_TIMEOUT)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            if result.is_err() {
                remove_taps(&spec.nics).await;
            }
            let _ = tx.send(Event::Started {
                id,
                result,
                restarts,
            });
        });
    }

    /// Watches `inst` until its QEMU ends, then sends [`Event::Ended`].
    fn watch(&self, id: Uuid, inst: &Instance) {
        let (inst, tx) = (inst.clone(), self.events.clone());
        let mut events = inst.qmp.events();
        tokio::spawn(async move {
            let (mut guest_off, mut load_failed) = (false, false);
            loop {
                tokio::select! {
                    ev = events.recv() => match ev {
                        Ok(e) if e.name == "SHUTDOWN" => {
                            guest_off |= e.data.get("guest").and_then(|g| g.as_bool()) == Some(true);
                        }
                        Ok(e) if e.name == "MIGRATION" => {
                            load_failed |= e.data.get("status").and_then(|s| s.as_str()) == Some("failed");
                        }
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    },
                    _ = inst.qmp.closed() => break,
                }
            }
            inst.wait_exit(Duration::from_secs(10)).await;
            let _ = tx.send(Event::Ended {
                id,
                guest_off,
                load_failed,
            });
        });
    }

    async fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Started {
                id,
                result: Ok(inst),
                restarts,
            } => {
                tracing::info!(vm = %id, pid = inst.pid, "guest started");
                self.watch(id, &inst);
                self.slots.insert(
                    id,
                    Slot::Running {
                        inst,
                        stopping: false,
                        restarts,
                    },
                );
                let detail = self.accel_name();
                self.report(id, VmState::Running, detail, restarts).await;
            }
            Event::Started {
                id,
                result: Err(why),
                restarts,
            } => {
                tracing::warn!(vm = %id, error = %why, "guest did not start");
                self.slots.remove(&id);
                self.given_up.insert(id);
                self.report(id, VmState::Failed, why, restarts).await;
            }
            Event::ShutDown { id, how } => {
                tracing::info!(vm = %id, ?how, "guest stopped");
                // The watcher reports the end; nothing else to do here.
                let _ = how;
            }
            Event::Ended {
                id,
                guest_off,
                load_failed,
            } => self.ended(id, guest_off, load_failed).await,
            Event::Incoming {
                id,
                migration,
                result,
            } => self.incoming_started(id, migration, result).await,
            Event::Sent { migration, end } => {
                self.sending.remove(&migration);
                tracing::info!(migration, ?end, "sending ended");
                // The source stopped its QEMU itself: its end is neither a crash nor a stray.
                let vm = self
                    .node
                    .local_view()
                    .state
                    .migrations
                    .get(&migration)
                    .map(|m| m.vm);
                if end == crate::migrate::SourceEnd::Moved
                    && let Some(Slot::Running { stopping, .. }) =
                        vm.and_then(|vm| self.slots.get_mut(&vm))
                {
                    *stopping = true;
                }
            }
        }
    }

    /// QEMU of `id` ended: on request, by the guest, or by a crash (`load_failed`: an
    /// incoming migration's QEMU whose stream broke off).
    async fn ended(&mut self, id: Uuid, guest_off: bool, load_failed: bool) {
        let (inst, stopping, restarts) = match self.slots.remove(&id) {
            Some(Slot::Running {
                inst,
                stopping,
                restarts,
            }) => (inst, stopping, restarts),
            Some(Slot::Incoming { migration, .. }) => {
                // The destination QEMU died before the switchover: the VM stays on the
                // source, and the migration fails.
                tracing::warn!(vm = %id, migration, "the destination QEMU ended");
                // After a cancel or a failure the source closes the stream, which ends this
                // QEMU too: nothing to add then.
                let (cancelled, ended) = self
                    .node
                    .local_view()
                    .state
                    .migrations
                    .get(&migration)
                    .map_or((false, true), |m| {
                        (m.cancel_requested, m.phase.is_terminal())
                    });
                let (phase, why) = if cancelled {
                    (MigrationPhase::Cancelled, None)
                } else {
                    // A stream that broke off ends this QEMU too: the source's QEMU or its
                    // connection failed, not this one.
                    let why = if load_failed {
                        "the migration stream from the source broke off (the destination could not load it)"
                    } else {
                        "the destination QEMU ended"
                    };
                    (MigrationPhase::Failed, Some(why.to_string()))
                };
                if !ended {
                    let _ = crate::migrate::give_up(&self.node, migration, phase, why).await;
                }
                let view = self.node.local_view();
                let state = &view.state;
                if let Some(vm) = state.vms.get(&id) {
                    remove_taps(&nic_attachments(vm, self.me())).await;
                }
                return;
            }
            Some(other) => {
                self.slots.insert(id, other);
                return;
            }
            None => return,
        };
        // Taps of a NIC are this instance's; QEMU does not remove them.
        let view = self.node.local_view();
        let state = &view.state;
        if let Some(vm) = state.vms.get(&id) {
            let nics = nic_attachments(vm, self.me());
            remove_taps(&nics).await;
        }
        let _ = inst;
        let owned = state.vms.get(&id).is_some_and(|v| v.owner == self.me());
        if !owned {
            return;
        }
        if stopping {
            self.report(id, VmState::Stopped, String::new(), 0).await;
        } else if guest_off {
            // The guest shut itself down: it stays off, as if stopped by an operator.
            let _ = self
                .node
                .write(Command::SetVmDesired {
                    id,
                    desired: VmDesired::Stopped,
                })
                .await;
            self.report(id, VmState::Stopped, "the guest powered off".into(), 0)
                .await;
        } else if restarts < RESTART_LIMIT {
            let n = restarts + 1;
            tracing::warn!(vm = %id, attempt = n, "QEMU ended unexpectedly: restarting");
            self.report(
                id,
                VmState::Crashed,
                format!("QEMU ended unexpectedly; restart {n} of {RESTART_LIMIT}"),
                n,
            )
            .await;
            tokio::time::sleep(Duration::from_millis(500 * u64::from(n))).await;
            if let Some(vm) = state.vms.get(&id).filter(|v| v.desired.wants_qemu()) {
                let vm = vm.clone();
                self.start(state, &vm, n).await;
            }
        } else {
            self.given_up.insert(id);
            self.report(
                id,
                VmState::Failed,
                format!(
                    "QEMU crashed {} times in a row; not restarting (start the VM again)",
                    restarts + 1
                ),
                restarts,
            )
            .await;
        }
    }
}

/// The tap device of a VM's NIC on a node: at most 15 characters, unique per node and VM.
fn tap_name(node: NodeId, vm: Uuid, index: usize) -> String {
    let short = &vm.simple().to_string()[..8];
    format!("vt{}{short}{index}", node % 1000)
}

fn nic_attachments(vm: &VmRecord, node: NodeId) -> Vec<NicAttach> {
    vm.spec
        .nics
        .iter()
        .enumerate()
        .map(|(i, n)| NicAttach {
            tap: tap_name(node, vm.id, i),
            mac: n.mac.clone(),
            bridge: n.switch.clone(),
        })
        .collect()
}

/// Builds the QEMU launch of `vm` on this node.
pub fn launch_spec(
    state: &ClusterState,
    vm: &VmRecord,
    cfg: &VmHostConfig,
    accel: Accel,
) -> Result<LaunchSpec, String> {
    let cluster = state
        .cluster_id
        .ok_or_else(|| "the cluster is not initialized".to_string())?;
    let portal = if cfg.iscsi_addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], cfg.iscsi_addr.port()))
    } else {
        cfg.iscsi_addr
    };
    let target = iscsi_target_name(cluster);
    let initiator = node_initiator_name(cluster, cfg.node_id);
    let run_dir = run_dir(&cfg.data_dir, vm.id);
    let chap = match &state.iscsi_chap {
        Some(c) => {
            std::fs::create_dir_all(&run_dir).map_err(|e| format!("{}: {e}", run_dir.display()))?;
            let file = run_dir.join("chap.secret");
            write_private(&file, c.secret.as_bytes())?;
            Some((c.user.clone(), file))
        }
        None => None,
    };
    let disks = vm
        .spec
        .disks
        .iter()
        .map(|d| {
            if !state.disks.contains_key(d) {
                return Err(format!("disk {d} does not exist"));
            }
            Ok(DiskAttach {
                url: format!("iscsi://{portal}/{target}/{d}"),
                initiator_name: initiator.clone(),
                chap: chap.clone(),
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let cpu = match (vm.spec.cpu.as_str(), accel) {
        ("host", Accel::Kvm) => "host".to_string(),
        // TCG presents the same processor on every node, so a guest moves freely.
        ("host" | "cluster-baseline", Accel::Tcg) => "max".to_string(),
        ("cluster-baseline", Accel::Kvm) => state
            .baseline_cpu()
            .ok_or("cluster-baseline: the KVM nodes share no named QEMU CPU model (or have not reported theirs yet)")?
            .to_string(),
        (model, _) => model.to_string(),
    };
    let boot = match &vm.spec.boot {
        VmBoot::Disk => Boot::Disk,
        VmBoot::Kernel {
            kernel,
            initrd,
            append,
        } => {
            for f in std::iter::once(kernel).chain(initrd) {
                if !Path::new(f).is_file() {
                    return Err(format!("{f} does not exist on node {}", cfg.node_id));
                }
            }
            Boot::Kernel {
                kernel: kernel.into(),
                initrd: initrd.as_ref().map(PathBuf::from),
                append: append.clone(),
            }
        }
    };
    let nics = nic_attachments(vm, cfg.node_id);
    Ok(LaunchSpec {
        name: vm.name.clone(),
        uuid: vm.id.to_string(),
        accel,
        cpu,
        vcpus: vm.spec.vcpus,
        memory_mib: vm.spec.memory_mib,
        disks,
        nics,
        boot,
        run_dir,
        incoming: false,
    })
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(bytes)
        .map_err(|e| format!("{}: {e}", path.display()))
}

async fn ip(args: &[&str]) -> Result<(), String> {
    let out = tokio::process::Command::new("ip")
        .args(args)
        .output()
        .await
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Creates each NIC's tap device and puts it on its switch's bridge.
async fn prepare_nics(nics: &[NicAttach]) -> Result<(), String> {
    for nic in nics {
        let bridge = &nic.bridge;
        if !Path::new("/sys/class/net")
            .join(bridge)
            .join("bridge")
            .is_dir()
        {
            return Err(format!(
                "virtual switch {bridge:?}: this node has no bridge named {bridge}"
            ));
        }
        let _ = ip(&["link", "delete", &nic.tap]).await;
        ip(&["tuntap", "add", "dev", &nic.tap, "mode", "tap"])
            .await
            .map_err(|e| format!("cannot create tap {}: {e}", nic.tap))?;
        ip(&["link", "set", &nic.tap, "master", bridge, "up"])
            .await
            .map_err(|e| format!("cannot attach tap {} to {bridge}: {e}", nic.tap))?;
    }
    Ok(())
}

async fn remove_taps(nics: &[NicAttach]) {
    for nic in nics {
        let _ = ip(&["link", "delete", &nic.tap]).await;
    }
}

/// A destination that sees a migration admitted longer ago than this asks the leader whether
/// it still waits before starting anything (well below [`csvd_raft::node::DOWN_AFTER`], after
/// which the leader gives up a migration whose node is down).
const CONFIRM_AFTER: Duration = Duration::from_secs(2);

/// Whether migration `migration` is still `preparing` by the leader's (linearizable) view.
async fn still_preparing(node: &MetaNode, migration: MigrationId) -> Result<(), String> {
    let state = node
        .read_state()
        .await
        .map_err(|e| format!("cannot confirm the migration with the leader: {e}"))?;
    match state.migrations.get(&migration).map(|m| m.phase) {
        Some(MigrationPhase::Preparing) => Ok(()),
        phase => Err(format!(
            "the migration is {} by the leader's view",
            phase.map_or("gone", MigrationPhase::as_str)
        )),
    }
}

/// Live migrations: this node as source or destination (see [`crate::migrate`]).
impl Agent {
    /// This node's part in migrations: start a destination, send from a source, resume
    /// after the switchover, clean up after a failure.
    async fn migrations(&mut self, state: &ClusterState) {
        let me = self.me();
        self.configuring.retain(|id, _| {
            state.migrations.get(id).is_some_and(|m| {
                matches!(m.phase, MigrationPhase::Preparing | MigrationPhase::Ready)
            })
        });
        let mine: Vec<MigrationRecord> = state
            .migrations
            .values()
            .filter(|m| m.source == me || m.dest == me)
            .filter(|m| !m.phase.is_terminal() || self.incoming_for(m.id).is_some())
            .cloned()
            .collect();
        for m in mine {
            if m.dest == me {
                match m.phase {
                    MigrationPhase::Preparing
                        if !self.slots.contains_key(&m.vm) && !self.receiving.contains(&m.id) =>
                    {
                        self.receive(state, &m);
                    }
                    MigrationPhase::Committed => self.resume_here(&m).await,
                    p if p.is_terminal() => {
                        // Failed or cancelled before the switchover: this copy goes away.
                        if let Some(inst) = self.take_incoming(m.vm, m.id) {
                            tracing::info!(vm = %m.vm, migration = m.id, "migration ended: stopping the destination QEMU");
                            let nics = state
                                .vms
                                .get(&m.vm)
                                .map(|v| nic_attachments(v, me))
                                .unwrap_or_default();
                            tokio::spawn(async move {
                                inst.kill().await;
                                remove_taps(&nics).await;
                            });
                        }
                    }
                    _ => {}
                }
            }
            // While the destination starts, the source's QEMU gets its settings, off the
            // critical path.
            if m.source == me
                && m.phase == MigrationPhase::Preparing
                && !self.configuring.contains_key(&m.id)
                && let Some(Slot::Running {
                    inst,
                    stopping: false,
                    ..
                }) = self.slots.get(&m.vm)
            {
                let (inst, params) = (inst.clone(), m.params.clone());
                self.configuring.insert(
                    m.id,
                    tokio::spawn(
                        async move { crate::migrate::configure(&inst.qmp, &params).await },
                    ),
                );
            }
            let sendable = matches!(m.phase, MigrationPhase::Ready | MigrationPhase::Copying);
            if m.source == me && sendable && !self.sending.contains(&m.id) {
                let Some(Slot::Running {
                    inst,
                    stopping: false,
                    ..
                }) = self.slots.get(&m.vm)
                else {
                    continue;
                };
                let Some(dest) = state.nodes.get(&m.dest) else {
                    continue;
                };
                self.sending.insert(m.id);
                let node = self.node.clone();
                let inst = inst.clone();
                let tx = self.events.clone();
                let addr = m
                    .listen_addr
                    .clone()
                    .unwrap_or_else(|| dest.spec.migration_addr.clone());
                let migration = m.clone();
                let csv = self.cfg.csv.clone();
                let configured = self.configuring.remove(&m.id);
                tracing::info!(vm = %m.vm, migration = m.id, to = m.dest, "sending the VM");
                tokio::spawn(async move {
                    let end =
                        crate::migrate::drive_source(node, csv, inst, migration, addr, configured)
                            .await;
                    let _ = tx.send(Event::Sent {
                        migration: m.id,
                        end,
                    });
                });
            }
        }
    }

    /// The switchover of `m` is committed: the VM is this node's; resume it (in the
    /// background: a post-copy destination needs the source until the last page).
    async fn resume_here(&mut self, m: &MigrationRecord) {
        // None: resumed already (a post-copy's end is awaited in the background).
        let Some(inst) = self.take_incoming(m.vm, m.id) else {
            return;
        };
        self.slots.insert(
            m.vm,
            Slot::Running {
                inst: inst.clone(),
                stopping: false,
                restarts: 0,
            },
        );
        let detail = self.accel_name();
        let (node, m, me) = (self.node.clone(), m.clone(), self.me());
        let csv = self.cfg.csv.clone();
        tokio::spawn(async move {
            let running = async {
                let state = if m.paused {
                    tracing::info!(vm = %m.vm, migration = m.id, "migrated here: the guest is loaded, paused");
                    VmState::Paused
                } else {
                    tracing::info!(vm = %m.vm, migration = m.id, "migrated here: the guest runs");
                    VmState::Running
                };
                let report = Command::ReportVm {
                    id: m.vm,
                    node: me,
                    state,
                    detail,
                    restarts: 0,
                    at_ms: now_ms(),
                };
                if let Err(e) = node.write(report).await {
                    tracing::debug!(vm = %m.vm, error = %e, "VM report not recorded");
                }
            };
            let resumed = async {
                if m.state_disk.is_some() {
                    crate::migrate::restore_from_volume(&node, &csv, &inst, &m).await?;
                }
                crate::migrate::resume_destination(&node, &inst, &m, running).await
            };
            if let Err(why) = resumed.await {
                tracing::error!(vm = %m.vm, error = %why, "migrated here but cannot run: restarting the guest from its disk");
                let _ = crate::migrate::write(
                    &node,
                    Command::FinishMigration {
                        id: m.id,
                        phase: MigrationPhase::Failed,
                        error: Some(format!(
                            "{why}; the guest was restarted from its disk on node {me}"
                        )),
                        total_ms: None,
                        downtime_ms: None,
                        now_ms: now_ms(),
                        committed: true,
                    },
                )
                .await;
                // Its end reads as a crash; the restart policy boots the guest afresh here.
                inst.kill().await;
            }
        });
    }

    /// Takes `vm`'s slot if it holds the destination QEMU of `migration`, and only then.
    fn take_incoming(&mut self, vm: Uuid, migration: MigrationId) -> Option<Instance> {
        match self.slots.get(&vm) {
            Some(Slot::Incoming { migration: m, .. }) if *m == migration => {}
            _ => return None,
        }
        match self.slots.remove(&vm) {
            Some(Slot::Incoming { inst, .. }) => Some(inst),
            _ => None,
        }
    }

    /// The VM whose destination QEMU for `migration` runs here.
    fn incoming_for(&self, migration: MigrationId) -> Option<Uuid> {
        self.slots.iter().find_map(|(vm, s)| match s {
            Slot::Incoming { migration: m, .. } if *m == migration => Some(*vm),
            _ => None,
        })
    }

    /// Starts the destination QEMU of migration `m`, listening on this node's migration
    /// address or a free port above it (the result comes back as an event).
    fn receive(&mut self, state: &ClusterState, m: &MigrationRecord) {
        let (id, migration) = (m.vm, m.id);
        let tx = self.events.clone();
        let fail = |why: String| {
            let _ = tx.send(Event::Incoming {
                id,
                migration,
                result: Err(why),
            });
        };
        let accel = match &self.accel {
            Ok(d) => d.accel,
            Err(e) => return fail(format!("this node cannot run guests: {e}")),
        };
        let Some(vm) = state.vms.get(&m.vm) else {
            return fail("the VM is gone".into());
        };
        let listen = state
            .nodes
            .get(&self.me())
            .map(|n| n.spec.migration_addr.clone())
            .unwrap_or_default();
        let mut spec = match launch_spec(state, vm, &self.cfg, accel) {
            Ok(s) => s,
            Err(why) => return fail(why),
        };
        spec.incoming = true;
        self.receiving.insert(migration);
        self.slots.insert(id, Slot::Starting);
        let qemu = self.cfg.qemu.clone();
        let record = m.clone();
        let node = self.node.clone();
        let admitted_ms_ago = now_ms().saturating_sub(m.started_at_ms.unwrap_or(0));
        tracing::info!(vm = %id, migration, from = m.source, "receiving a VM");
        tokio::spawn(async move {
            let start = async {
                prepare_nics(&spec.nics).await?;
                let inst = Instance::start(&qemu, &spec, START_TIMEOUT)
                    .await
                    .map_err(|e| e.to_string())?;
                match crate::migrate::listen_incoming(&inst.qmp, &record, &listen).await {
                    Ok(addr) => Ok((inst, addr)),
                    Err(e) => {
                        inst.kill().await;
                        Err(e)
                    }
                }
            };
            // A migration admitted a while ago may have ended meanwhile without this node
            // seeing it yet (it was frozen or cut off): the leader confirms it still waits
            // for this node before anything starts. A young one cannot have been given up
            // for this node being down, and a cancel is seen when `ready` is refused.
            let result = if admitted_ms_ago >= CONFIRM_AFTER.as_millis() as u64 {
                match still_preparing(&node, migration).await {
                    Ok(()) => start.await,
                    Err(why) => Err(why),
                }
            } else {
                start.await
            };
            if result.is_err() {
                remove_taps(&spec.nics).await;
            }
            let _ = tx.send(Event::Incoming {
                id,
                migration,
                result,
            });
        });
    }

    /// The destination QEMU of `migration` started (or not): say `ready`, or fail it.
    async fn incoming_started(
        &mut self,
        id: Uuid,
        migration: MigrationId,
        result: Result<(Instance, Option<String>), String>,
    ) {
        self.receiving.remove(&migration);
        match result {
            Ok((inst, listen)) => {
                tracing::info!(vm = %id, migration, addr = ?listen, "listening for the VM's state");
                self.watch(id, &inst);
                self.slots.insert(id, Slot::Incoming { inst, migration });
                let _ = crate::migrate::write(
                    &self.node,
                    Command::AdvanceMigration {
                        id: migration,
                        from: MigrationPhase::Preparing,
                        to: MigrationPhase::Ready,
                        at_ms: Some(now_ms()),
                        listen,
                    },
                )
                .await;
            }
            Err(why) => {
                if matches!(self.slots.get(&id), Some(Slot::Starting)) {
                    self.slots.remove(&id);
                }
                tracing::warn!(vm = %id, migration, error = %why, "cannot receive the VM");
                let _ = crate::migrate::give_up(
                    &self.node,
                    migration,
                    MigrationPhase::Failed,
                    Some(format!("destination: {why}")),
                )
                .await;
            }
        }
    }
}
