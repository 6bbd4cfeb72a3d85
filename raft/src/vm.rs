//! Virtual machines in the replicated state: each VM's definition, the node that owns (runs)
//! it, what the operator wants (running or stopped) and what its owner last reported.
//!
//! A definition lives only here, so no node can start a guest from a stale copy. The owner
//! is the only node that runs the VM's QEMU and the only node whose reports count; moving
//! the VM to another node is one command ([`crate::Command::SetVmOwner`]) that names the
//! owner it expects, so two racing moves cannot both win.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::NodeId;
use crate::command::Outcome;
use crate::state::{ApplyError, ClusterState, NodeAdminState};
use crate::volume::DiskId;

/// The most vCPUs a VM may have.
pub const MAX_VCPUS: u32 = 256;
/// The least memory a VM may have, in MiB.
pub const MIN_MEMORY_MIB: u64 = 16;
/// The most disks (and, separately, NICs) a VM may have.
pub const MAX_DEVICES: usize = 16;

/// One virtual machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// The VM's identity (also the guest's SMBIOS UUID).
    pub id: Uuid,
    /// Unique name.
    pub name: String,
    /// What the VM is made of.
    pub spec: VmSpec,
    /// The node that runs it.
    pub owner: NodeId,
    /// What the operator wants.
    pub desired: VmDesired,
    /// The owner's last report, if any.
    #[serde(default)]
    pub runtime: Option<VmRuntime>,
    /// When the VM was defined (proposer's clock, ms since the Unix epoch).
    pub created_at_ms: u64,
}

/// A VM's hardware and boot method.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub vcpus: u32,
    pub memory_mib: u64,
    /// `host`, `cluster-baseline` (the features every node has) or a QEMU CPU model name.
    pub cpu: String,
    /// Its disks (LUNs), in boot order.
    pub disks: Vec<DiskId>,
    /// Its NICs, each on a virtual switch.
    pub nics: Vec<NicSpec>,
    pub boot: VmBoot,
}

/// A NIC: the virtual switch it plugs into and its MAC address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    pub switch: String,
    pub mac: String,
}

/// How a VM boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum VmBoot {
    /// From its first disk.
    Disk,
    /// Directly into a kernel; the paths must exist on every node that may run the VM.
    Kernel {
        kernel: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        initrd: Option<String>,
        #[serde(default)]
        append: String,
    },
}

/// What the operator wants of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmDesired {
    Running,
    /// QEMU runs with the guest's processors stopped; its memory stays allocated.
    Paused,
    Stopped,
}

impl VmDesired {
    pub fn as_str(self) -> &'static str {
        match self {
            VmDesired::Running => "running",
            VmDesired::Paused => "paused",
            VmDesired::Stopped => "stopped",
        }
    }

    /// Whether the VM should have a QEMU (running or paused).
    pub fn wants_qemu(self) -> bool {
        self != VmDesired::Stopped
    }
}

/// What the owner reports about its VM's QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// QEMU is being started.
    Starting,
    /// The guest runs.
    Running,
    /// The guest is paused (by an operator, or for a migration's switchover).
    Paused,
    /// No QEMU runs (stopped on request, or the guest powered off).
    Stopped,
    /// QEMU ended without being asked to.
    Crashed,
    /// QEMU could not be started; the report's detail says why.
    Failed,
}

impl VmState {
    /// The lower-case name used in listings.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopped => "stopped",
            VmState::Crashed => "crashed",
            VmState::Failed => "failed",
        }
    }
}

/// The owner's last report on a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRuntime {
    /// The reporting node (the owner when it reported).
    pub node: NodeId,
    pub state: VmState,
    /// A human-readable detail: the accelerator, why a start failed, how QEMU ended.
    #[serde(default)]
    pub detail: String,
    /// Restarts after crashes since the VM was last started on request.
    #[serde(default)]
    pub restarts: u32,
    /// The node's clock at the report, ms since the Unix epoch.
    pub at_ms: u64,
}

fn invalid(field: &str, reason: impl Into<String>) -> ApplyError {
    ApplyError::InvalidArgument {
        field: field.into(),
        reason: reason.into(),
    }
}

fn precondition(reason: impl Into<String>) -> ApplyError {
    ApplyError::PreconditionFailed {
        reason: reason.into(),
    }
}

/// A locally administered unicast MAC (QEMU's 52:54:00 prefix) derived from `seed`.
pub fn mac_from(seed: &[u8]) -> String {
    // FNV-1a: stable across releases, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[5], b[6], b[7])
}

/// Whether `mac` is six colon-separated hex octets of a unicast address.
pub fn valid_mac(mac: &str) -> bool {
    let octets: Vec<&str> = mac.split(':').collect();
    octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.chars().all(|c| c.is_ascii_hexdigit()))
        && u8::from_str_radix(octets[0], 16).is_ok_and(|first| first & 1 == 0)
}

/// What a node's guests run on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCpu {
    /// `kvm` or `tcg`.
    pub accel: String,
    /// The named QEMU CPU models this node can run guests with (migration-safe, nothing
    /// missing on this host), as QEMU reports them.
    pub models: Vec<String>,
}

/// QEMU's named x86 CPU models, newest first within each vendor, then the generic ones.
/// `cluster-baseline` is the first of these that every KVM node can run.
pub const CPU_MODELS_NEWEST_FIRST: &[&str] = &[
    "GraniteRapids",
    "SierraForest",
    "SapphireRapids",
    "Icelake-Server",
    "Cooperlake",
    "Cascadelake-Server",
    "Skylake-Server",
    "Skylake-Client",
    "Broadwell",
    "Haswell",
    "IvyBridge",
    "SandyBridge",
    "Westmere",
    "Nehalem",
    "Penryn",
    "Conroe",
    "EPYC-Genoa",
    "EPYC-Milan",
    "EPYC-Rome",
    "EPYC",
    "Opteron_G5",
    "Opteron_G4",
    "Opteron_G3",
    "Opteron_G2",
    "Opteron_G1",
    "kvm64",
    "qemu64",
];

/// The iSCSI initiator name a node's QEMUs log in with: one per node, so the target can
/// tell which node a VM's I/O comes from.
pub fn node_initiator_name(cluster: Uuid, node: NodeId) -> String {
    format!("iqn.2025-11.org.csvd:{cluster}:node-{node}")
}

/// Memory a node keeps for itself: an eighth of it, at most 1 GiB.
pub fn host_reserve_bytes(memory_bytes: u64) -> u64 {
    (memory_bytes / 8).min(1 << 30)
}

impl ClusterState {
    /// The VM named `name`.
    pub fn vm_by_name(&self, name: &str) -> Option<&VmRecord> {
        self.vms.values().find(|v| v.name == name)
    }

    /// The `cluster-baseline` CPU model: the newest named model every KVM node can run.
    /// `None` when no node reported KVM or they share none.
    pub fn baseline_cpu(&self) -> Option<&'static str> {
        let kvm: Vec<&NodeCpu> = self
            .nodes
            .keys()
            .filter_map(|n| self.node_cpus.get(n))
            .filter(|c| c.accel == "kvm")
            .collect();
        if kvm.is_empty() {
            return None;
        }
        CPU_MODELS_NEWEST_FIRST
            .iter()
            .find(|m| kvm.iter().all(|c| c.models.iter().any(|x| x == *m)))
            .copied()
    }

    /// The VMs that use disk `id`.
    pub fn vms_using_disk(&self, id: DiskId) -> Vec<&VmRecord> {
        self.vms
            .values()
            .filter(|v| v.spec.disks.contains(&id))
            .collect()
    }

    /// MiB of memory that VMs meant to run on `node` take, leaving out `except`.
    /// Counts VMs migrating to `node` too: their memory is taken there before the switchover.
    pub fn committed_memory_mib(&self, node: NodeId, except: Option<Uuid>) -> u64 {
        let incoming = |v: &VmRecord| {
            self.migrations
                .values()
                .any(|m| m.vm == v.id && m.dest == node && !m.phase.is_terminal())
        };
        self.vms
            .values()
            .filter(|v| {
                Some(v.id) != except && v.desired.wants_qemu() && (v.owner == node || incoming(v))
            })
            .map(|v| v.spec.memory_mib)
            .sum()
    }

    /// Refuses to run `vm` on `node` when the node lacks a switch, or memory for it next to
    /// the VMs meant to run there.
    pub fn check_vm_fits(&self, spec: &VmSpec, id: Uuid, node: NodeId) -> Result<(), ApplyError> {
        let rec = self
            .nodes
            .get(&node)
            .ok_or(ApplyError::UnknownNode { id: node })?;
        for nic in &spec.nics {
            if !rec.spec.switches.contains(&nic.switch) {
                return Err(precondition(format!(
                    "node {node} has no virtual switch {:?} (it has: {})",
                    nic.switch,
                    if rec.spec.switches.is_empty() {
                        "none".to_string()
                    } else {
                        rec.spec.switches.join(", ")
                    }
                )));
            }
        }
        let usable_mib = (rec.spec.memory_bytes - host_reserve_bytes(rec.spec.memory_bytes)) >> 20;
        let committed = self.committed_memory_mib(node, Some(id));
        if committed + spec.memory_mib > usable_mib {
            return Err(precondition(format!(
                "not enough memory on node {node}: the VM needs {} MiB; {} MiB of {usable_mib} \
                 MiB usable are taken by VMs meant to run there",
                spec.memory_mib, committed
            )));
        }
        Ok(())
    }

    fn validate_vm_spec(&self, spec: &VmSpec, id: Uuid) -> Result<(), ApplyError> {
        if spec.vcpus == 0 || spec.vcpus > MAX_VCPUS {
            return Err(invalid(
                "vcpus",
                format!("{} is not between 1 and {MAX_VCPUS}", spec.vcpus),
            ));
        }
        if spec.memory_mib < MIN_MEMORY_MIB || spec.memory_mib > (1 << 24) {
            return Err(invalid(
                "memory",
                format!(
                    "{} MiB is not between {MIN_MEMORY_MIB} MiB and 16 TiB",
                    spec.memory_mib
                ),
            ));
        }
        let cpu_ok = !spec.cpu.is_empty()
            && spec.cpu.len() <= 64
            && spec
                .cpu
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !cpu_ok {
            return Err(invalid(
                "cpu",
                format!(
                    "{:?} is not a CPU model (host, cluster-baseline or a QEMU model name)",
                    spec.cpu
                ),
            ));
        }
        if spec.disks.len() > MAX_DEVICES || spec.nics.len() > MAX_DEVICES {
            return Err(invalid(
                "devices",
                format!("at most {MAX_DEVICES} disks and {MAX_DEVICES} NICs"),
            ));
        }
        for (i, d) in spec.disks.iter().enumerate() {
            if !self.disks.contains_key(d) {
                return Err(ApplyError::UnknownDisk { id: *d });
            }
            if spec.disks[..i].contains(d) {
                return Err(invalid("disks", format!("disk {d} is attached twice")));
            }
        }
        for (i, nic) in spec.nics.iter().enumerate() {
            if !valid_mac(&nic.mac) {
                return Err(invalid(
                    "mac",
                    format!("{:?} is not a unicast MAC address", nic.mac),
                ));
            }
            let mac = nic.mac.to_ascii_lowercase();
            if spec.nics[..i]
                .iter()
                .any(|n| n.mac.eq_ignore_ascii_case(&mac))
            {
                return Err(invalid("mac", format!("{mac} is used twice")));
            }
            if let Some(other) = self.vms.values().find(|v| {
                v.id != id && v.spec.nics.iter().any(|n| n.mac.eq_ignore_ascii_case(&mac))
            }) {
                return Err(invalid(
                    "mac",
                    format!("{mac} is already used by VM {:?}", other.name),
                ));
            }
        }
        match &spec.boot {
            VmBoot::Disk if spec.disks.is_empty() => {
                return Err(invalid("boot", "a VM that boots from disk needs a disk"));
            }
            VmBoot::Kernel { kernel, .. } if !kernel.starts_with('/') => {
                return Err(invalid(
                    "kernel",
                    format!("{kernel:?} is not an absolute path"),
                ));
            }
            VmBoot::Kernel {
                initrd: Some(i), ..
            } if !i.starts_with('/') => {
                return Err(invalid("initrd", format!("{i:?} is not an absolute path")));
            }
            _ => {}
        }
        Ok(())
    }

    pub(crate) fn create_vm(
        &mut self,
        id: Uuid,
        name: &str,
        spec: &VmSpec,
        owner: NodeId,
        now_ms: u64,
    ) -> Result<Outcome, ApplyError> {
        crate::state::validate_name("VM name", name)?;
        if id.is_nil() {
            return Err(invalid("id", "the nil UUID is not a VM identity"));
        }
        if let Some(existing) = self.vms.get(&id) {
            if existing.name == name && existing.spec == *spec && existing.owner == owner {
                return Ok(Outcome::Unchanged);
            }
            return Err(precondition(format!(
                "VM {id} already exists as {:?}",
                existing.name
            )));
        }
        if self.vm_by_name(name).is_some() {
            return Err(ApplyError::DuplicateName {
                kind: "VM".into(),
                name: name.into(),
            });
        }
        self.validate_vm_spec(spec, id)?;
        let node = self
            .nodes
            .get(&owner)
            .ok_or(ApplyError::UnknownNode { id: owner })?;
        if node.admin_state == NodeAdminState::Draining {
            return Err(precondition(format!(
                "node {owner} is draining: it takes no new VMs"
            )));
        }
        self.check_vm_fits(spec, id, owner)?;
        self.vms.insert(
            id,
            VmRecord {
                id,
                name: name.into(),
                spec: spec.clone(),
                owner,
                desired: VmDesired::Stopped,
                runtime: None,
                created_at_ms: now_ms,
            },
        );
        Ok(Outcome::Applied)
    }

    pub(crate) fn delete_vm(&mut self, id: Uuid) -> Result<Outcome, ApplyError> {
        let vm = self.vms.get(&id).ok_or(ApplyError::UnknownVm { id })?;
        let stopped = vm.desired == VmDesired::Stopped
            && vm.runtime.as_ref().is_none_or(|r| {
                matches!(
                    r.state,
                    VmState::Stopped | VmState::Failed | VmState::Crashed
                )
            });
        if !stopped {
            return Err(precondition(format!(
                "VM {:?} is not stopped: stop it first",
                vm.name
            )));
        }
        self.vms.remove(&id);
        Ok(Outcome::Applied)
    }

    pub(crate) fn set_vm_desired(
        &mut self,
        id: Uuid,
        desired: VmDesired,
    ) -> Result<Outcome, ApplyError> {
        let vm = self.vms.get(&id).ok_or(ApplyError::UnknownVm { id })?;
        if vm.desired == desired {
            return Ok(Outcome::Unchanged);
        }
        if let Some(m) = self.open_migration(id) {
            return Err(precondition(format!(
                "VM {:?} is migrating (migration {}, {}): cancel it or let it finish first",
                vm.name,
                m.id,
                m.phase.as_str()
            )));
        }
        if desired == VmDesired::Paused && vm.desired == VmDesired::Stopped {
            return Err(precondition(format!(
                "VM {:?} is stopped: only a started VM pauses",
                vm.name
            )));
        }
        if desired == VmDesired::Running && vm.desired == VmDesired::Stopped {
            let (spec, owner) = (vm.spec.clone(), vm.owner);
            self.validate_vm_spec(&spec, id)?;
            self.check_vm_fits(&spec, id, owner)?;
        }
        if let Some(vm) = self.vms.get_mut(&id) {
            vm.desired = desired;
            if let Some(r) = vm.runtime.as_mut()
                && desired == VmDesired::Running
            {
                r.restarts = 0;
            }
        }
        Ok(Outcome::Applied)
    }

    pub(crate) fn set_vm_owner(
        &mut self,
        id: Uuid,
        owner: NodeId,
        expected: NodeId,
    ) -> Result<Outcome, ApplyError> {
        let vm = self.vms.get(&id).ok_or(ApplyError::UnknownVm { id })?;
        if vm.owner == owner {
            return Ok(Outcome::Unchanged);
        }
        if vm.owner != expected {
            return Err(precondition(format!(
                "VM {:?} is owned by node {}, not {expected}",
                vm.name, vm.owner
            )));
        }
        if !self.nodes.contains_key(&owner) {
            return Err(ApplyError::UnknownNode { id: owner });
        }
        if let Some(vm) = self.vms.get_mut(&id) {
            vm.owner = owner;
        }
        Ok(Outcome::Applied)
    }

    pub(crate) fn report_vm(
        &mut self,
        id: Uuid,
        node: NodeId,
        state: VmState,
        detail: &str,
        restarts: u32,
        at_ms: u64,
    ) -> Result<Outcome, ApplyError> {
        let vm = self.vms.get_mut(&id).ok_or(ApplyError::UnknownVm { id })?;
        if vm.owner != node {
            return Err(precondition(format!(
                "node {node} reported on VM {:?}, which node {} owns",
                vm.name, vm.owner
            )));
        }
        let report = VmRuntime {
            node,
            state,
            detail: detail.chars().take(512).collect(),
            restarts,
            at_ms,
        };
        if let Some(old) = &vm.runtime
            && old.node == node
            && old.state == report.state
            && old.detail == report.detail
            && old.restarts == report.restarts
        {
            return Ok(Outcome::Unchanged);
        }
        vm.runtime = Some(report);
        Ok(Outcome::Applied)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::command::{Command, Request};
    use crate::state::NodeSpec;
    use crate::{PROTOCOL_VERSION, volume::ALLOCATION_UNIT};

    /// A node of the test clusters (here and in the migration tests).
    pub(crate) fn node(id: NodeId, switches: &[&str], memory_gib: u64) -> NodeSpec {
        NodeSpec {
            id,
            grpc_addr: format!("127.0.0.1:{}", 7000 + id),
            iscsi_addr: format!("127.0.0.1:{}", 3260 + id),
            migration_addr: format!("127.0.0.1:{}", 8000 + id),
            io_addr: format!("127.0.0.1:{}", 9000 + id),
            cpu_model: "test cpu".into(),
            cpu_flags: vec!["sse2".into()],
            switches: switches.iter().map(|s| s.to_string()).collect(),
            memory_bytes: memory_gib << 30,
            version: "0.1.0".into(),
            protocol_version: PROTOCOL_VERSION,
        }
    }

    pub(crate) fn apply(s: &mut ClusterState, cmd: Command) -> Result<Outcome, ApplyError> {
        s.apply(&Request::new(cmd))
    }

    /// Two nodes (node 1: switch "lan", 8 GiB; node 2: "lan" and "dmz", 4 GiB), a volume
    /// and two disks (ids 1 and 2).
    fn cluster() -> ClusterState {
        let mut s = ClusterState::default();
        apply(
            &mut s,
            Command::InitCluster {
                cluster_id: Uuid::from_u128(1),
            },
        )
        .unwrap();
        for spec in [node(1, &["lan"], 8), node(2, &["lan", "dmz"], 4)] {
            apply(&mut s, Command::RegisterNode { spec, now_ms: 1 }).unwrap();
        }
        let volume = Uuid::from_u128(77);
        apply(
            &mut s,
            Command::RegisterVolume {
                id: volume,
                name: "vol".into(),
                device_bytes: 1024 * ALLOCATION_UNIT,
                data_offset: ALLOCATION_UNIT,
                coordinator: 1,
                now_ms: 1,
            },
        )
        .unwrap();
        for name in ["d1", "d2"] {
            apply(
                &mut s,
                Command::CreateDisk {
                    name: name.into(),
                    volume,
                    size_bytes: 16 * ALLOCATION_UNIT,
                    block_size: None,
                },
            )
            .unwrap();
        }
        s
    }

    fn spec() -> VmSpec {
        VmSpec {
            vcpus: 2,
            memory_mib: 1024,
            cpu: "host".into(),
            disks: vec![1],
            nics: vec![NicSpec {
                switch: "lan".into(),
                mac: "52:54:00:00:00:01".into(),
            }],
            boot: VmBoot::Kernel {
                kernel: "/var/tmp/vmlinuz".into(),
                initrd: Some("/var/tmp/initrd.img".into()),
                append: "console=ttyS0".into(),
            },
        }
    }

    fn create(
        s: &mut ClusterState,
        id: u128,
        name: &str,
        spec: VmSpec,
        owner: NodeId,
    ) -> Result<Outcome, ApplyError> {
        apply(
            s,
            Command::CreateVm {
                id: Uuid::from_u128(id),
                name: name.into(),
                spec,
                owner,
                now_ms: 5,
            },
        )
    }

    fn reason(e: ApplyError) -> String {
        e.to_string()
    }

    #[test]
    fn test_create_vm_defines_a_stopped_vm() {
        let mut s = cluster();
        assert_eq!(create(&mut s, 10, "web", spec(), 1), Ok(Outcome::Applied));
        let vm = s.vm_by_name("web").unwrap();
        assert_eq!(vm.owner, 1);
        assert_eq!(vm.desired, VmDesired::Stopped);
        assert_eq!(vm.runtime, None);
        assert_eq!(vm.created_at_ms, 5);
        // The same command again is a retry.
        assert_eq!(create(&mut s, 10, "web", spec(), 1), Ok(Outcome::Unchanged));
        // Another VM may not take the name.
        let mut other = spec();
        other.nics[0].mac = "52:54:00:00:00:02".into();
        assert!(matches!(
            create(&mut s, 11, "web", other, 1),
            Err(ApplyError::DuplicateName { .. })
        ));
    }

    #[test]
    fn test_create_vm_validation_errors_are_clear() {
        let mut s = cluster();
        let mut bad = spec();
        bad.disks = vec![9];
        assert_eq!(
            create(&mut s, 10, "a", bad, 1),
            Err(ApplyError::UnknownDisk { id: 9 })
        );

        let mut bad = spec();
        bad.nics[0].switch = "dmz".into();
        let e = reason(create(&mut s, 10, "a", bad.clone(), 1).unwrap_err());
        assert!(
            e.contains("node 1 has no virtual switch \"dmz\" (it has: lan)"),
            "{e}"
        );
        // Node 2 has that switch.
        assert_eq!(create(&mut s, 10, "a", bad, 2), Ok(Outcome::Applied));

        let mut big = spec();
        big.memory_mib = 8 * 1024;
        big.nics.clear();
        let e = reason(create(&mut s, 11, "big", big, 1).unwrap_err());
        assert!(
            e.contains("not enough memory on node 1: the VM needs 8192 MiB"),
            "{e}"
        );

        // Each bad field is named (spec2 avoids the MAC "a" took).
        let spec2 = || {
            let mut x = spec();
            x.nics[0].mac = "52:54:00:00:00:02".into();
            x
        };
        let field = |r: Result<Outcome, ApplyError>| match r {
            Err(ApplyError::InvalidArgument { field, .. }) => field,
            other => panic!("expected an invalid argument, got {other:?}"),
        };
        let mut bad = spec2();
        bad.vcpus = 0;
        assert_eq!(field(create(&mut s, 12, "b", bad, 1)), "vcpus");
        let mut bad = spec2();
        bad.memory_mib = 8;
        assert_eq!(field(create(&mut s, 12, "b", bad, 1)), "memory");
        let mut bad = spec2();
        bad.cpu = "host; rm -rf".into();
        assert_eq!(field(create(&mut s, 12, "b", bad, 1)), "cpu");
        let mut bad = spec2();
        bad.nics[0].mac = "01:00:5e:00:00:01".into();
        assert_eq!(field(create(&mut s, 12, "b", bad, 1)), "mac");
        let mut bad = spec2();
        bad.disks = vec![1, 1];
        assert_eq!(field(create(&mut s, 12, "b", bad, 1)), "disks");
        let mut bad = spec2();
        bad.disks.clear();
        bad.boot = VmBoot::Disk;
        assert_eq!(field(create(&mut s, 12, "b", bad, 1)), "boot");
        let mut bad = spec2();
        bad.boot = VmBoot::Kernel {
            kernel: "vmlinuz".into(),
            initrd: None,
            append: String::new(),
        };
        assert_eq!(field(create(&mut s, 12, "b", bad, 1)), "kernel");
        assert_eq!(
            create(&mut s, 12, "b", spec2(), 3),
            Err(ApplyError::UnknownNode { id: 3 })
        );
        assert_eq!(field(create(&mut s, 12, "bad name", spec2(), 1)), "VM name");
        // A MAC another VM uses ("a" took 52:54:00:00:00:01).
        let e = reason(create(&mut s, 12, "b", spec(), 1).unwrap_err());
        assert!(
            e.contains("52:54:00:00:00:01 is already used by VM \"a\""),
            "{e}"
        );
        // Nothing but "a" was created.
        assert_eq!(s.vms.len(), 1);
    }

    #[test]
    fn test_create_vm_refused_on_a_draining_node() {
        let mut s = cluster();
        apply(
            &mut s,
            Command::SetNodeState {
                id: 1,
                state: NodeAdminState::Draining,
            },
        )
        .unwrap();
        let e = reason(create(&mut s, 10, "web", spec(), 1).unwrap_err());
        assert!(e.contains("node 1 is draining"), "{e}");
    }

    #[test]
    fn test_memory_is_counted_for_vms_meant_to_run() {
        let mut s = cluster();
        // Node 2: 4 GiB, 512 MiB kept for the host: 3584 MiB usable.
        let mut a = spec();
        a.memory_mib = 2048;
        a.nics.clear();
        let mut b = a.clone();
        b.memory_mib = 2048;
        create(&mut s, 10, "a", a, 2).unwrap();
        // Stopped VMs do not count: "b" fits as well.
        create(&mut s, 11, "b", b, 2).unwrap();
        let start = |s: &mut ClusterState, id| {
            apply(
                s,
                Command::SetVmDesired {
                    id: Uuid::from_u128(id),
                    desired: VmDesired::Running,
                },
            )
        };
        assert_eq!(start(&mut s, 10), Ok(Outcome::Applied));
        assert_eq!(start(&mut s, 10), Ok(Outcome::Unchanged));
        let e = reason(start(&mut s, 11).unwrap_err());
        assert!(e.contains("not enough memory on node 2"), "{e}");
        assert!(e.contains("2048 MiB of 3584 MiB usable"), "{e}");
        assert_eq!(s.committed_memory_mib(2, None), 2048);
        // A paused VM keeps its memory; only a started one pauses.
        let desire = |s: &mut ClusterState, id, desired| {
            apply(
                s,
                Command::SetVmDesired {
                    id: Uuid::from_u128(id),
                    desired,
                },
            )
        };
        assert_eq!(desire(&mut s, 10, VmDesired::Paused), Ok(Outcome::Applied));
        assert_eq!(s.committed_memory_mib(2, None), 2048);
        let e = reason(start(&mut s, 11).unwrap_err());
        assert!(e.contains("not enough memory on node 2"), "{e}");
        let e = reason(desire(&mut s, 11, VmDesired::Paused).unwrap_err());
        assert!(e.contains("is stopped: only a started VM pauses"), "{e}");
        assert_eq!(desire(&mut s, 10, VmDesired::Running), Ok(Outcome::Applied));
        // Stopping "a" frees its memory for "b".
        apply(
            &mut s,
            Command::SetVmDesired {
                id: Uuid::from_u128(10),
                desired: VmDesired::Stopped,
            },
        )
        .unwrap();
        assert_eq!(start(&mut s, 11), Ok(Outcome::Applied));
    }

    #[test]
    fn test_only_the_owner_reports_and_owner_moves_are_compare_and_set() {
        let mut s = cluster();
        create(&mut s, 10, "web", spec(), 1).unwrap();
        let id = Uuid::from_u128(10);
        let report = |node, state| Command::ReportVm {
            id,
            node,
            state,
            detail: "tcg".into(),
            restarts: 0,
            at_ms: 9,
        };
        assert_eq!(
            apply(&mut s, report(1, VmState::Running)),
            Ok(Outcome::Applied)
        );
        assert_eq!(
            apply(&mut s, report(1, VmState::Running)),
            Ok(Outcome::Unchanged)
        );
        assert!(matches!(
            apply(&mut s, report(2, VmState::Stopped)),
            Err(ApplyError::PreconditionFailed { .. })
        ));
        assert_eq!(s.vms[&id].runtime.as_ref().unwrap().state, VmState::Running);

        // A move names the owner it expects.
        assert!(matches!(
            apply(
                &mut s,
                Command::SetVmOwner {
                    id,
                    owner: 2,
                    expected: 2
                }
            ),
            Err(ApplyError::PreconditionFailed { .. })
        ));
        assert_eq!(
            apply(
                &mut s,
                Command::SetVmOwner {
                    id,
                    owner: 2,
                    expected: 1
                }
            ),
            Ok(Outcome::Applied)
        );
        assert_eq!(
            apply(
                &mut s,
                Command::SetVmOwner {
                    id,
                    owner: 2,
                    expected: 1
                }
            ),
            Ok(Outcome::Unchanged)
        );
        assert_eq!(s.vms[&id].owner, 2);
        // Now node 1's reports are stale and refused; node 2's count.
        assert!(apply(&mut s, report(1, VmState::Stopped)).is_err());
        assert_eq!(
            apply(&mut s, report(2, VmState::Running)),
            Ok(Outcome::Applied)
        );
        assert_eq!(
            apply(
                &mut s,
                Command::SetVmOwner {
                    id,
                    owner: 9,
                    expected: 2
                }
            ),
            Err(ApplyError::UnknownNode { id: 9 })
        );
    }

    #[test]
    fn test_delete_vm_needs_it_stopped_and_disks_in_use_stay() {
        let mut s = cluster();
        create(&mut s, 10, "web", spec(), 1).unwrap();
        let id = Uuid::from_u128(10);
        // Its disk cannot be deleted while the VM uses it.
        let e = reason(apply(&mut s, Command::DeleteDisk { id: 1 }).unwrap_err());
        assert!(e.contains("disk 1 is attached to VM web"), "{e}");
        // Nor its node removed.
        let e = reason(apply(&mut s, Command::RemoveNode { id: 1 }).unwrap_err());
        assert!(e.contains("node 1 still owns VMs web"), "{e}");

        apply(
            &mut s,
            Command::SetVmDesired {
                id,
                desired: VmDesired::Running,
            },
        )
        .unwrap();
        let e = reason(apply(&mut s, Command::DeleteVm { id }).unwrap_err());
        assert!(e.contains("stop it first"), "{e}");
        apply(
            &mut s,
            Command::SetVmDesired {
                id,
                desired: VmDesired::Stopped,
            },
        )
        .unwrap();
        apply(
            &mut s,
            Command::ReportVm {
                id,
                node: 1,
                state: VmState::Running,
                detail: String::new(),
                restarts: 0,
                at_ms: 1,
            },
        )
        .unwrap();
        // Still running by its owner's report.
        assert!(apply(&mut s, Command::DeleteVm { id }).is_err());
        apply(
            &mut s,
            Command::ReportVm {
                id,
                node: 1,
                state: VmState::Stopped,
                detail: String::new(),
                restarts: 0,
                at_ms: 2,
            },
        )
        .unwrap();
        assert_eq!(
            apply(&mut s, Command::DeleteVm { id }),
            Ok(Outcome::Applied)
        );
        assert_eq!(
            apply(&mut s, Command::DeleteVm { id }),
            Err(ApplyError::UnknownVm { id })
        );
        assert_eq!(
            apply(&mut s, Command::DeleteDisk { id: 1 }),
            Ok(Outcome::Applied)
        );
    }

    #[test]
    fn test_cluster_baseline_is_the_newest_model_every_kvm_node_runs() {
        let mut s = cluster();
        assert_eq!(s.baseline_cpu(), None, "no node reported");
        let report = |s: &mut ClusterState, node, accel: &str, models: &[&str]| {
            apply(
                s,
                Command::ReportNodeCpu {
                    node,
                    cpu: NodeCpu {
                        accel: accel.into(),
                        models: models.iter().map(|m| m.to_string()).collect(),
                    },
                },
            )
        };
        report(
            &mut s,
            1,
            "kvm",
            &["Haswell", "Broadwell", "Skylake-Client", "qemu64"],
        )
        .unwrap();
        assert_eq!(s.baseline_cpu(), Some("Skylake-Client"));
        report(&mut s, 2, "kvm", &["Haswell", "SandyBridge", "qemu64"]).unwrap();
        assert_eq!(s.baseline_cpu(), Some("Haswell"));
        // A TCG node does not hold the baseline back.
        report(&mut s, 2, "tcg", &["qemu64"]).unwrap();
        assert_eq!(s.baseline_cpu(), Some("Skylake-Client"));
        // Different vendors meet on the generic model.
        report(&mut s, 2, "kvm", &["EPYC-Rome", "EPYC", "qemu64"]).unwrap();
        assert_eq!(s.baseline_cpu(), Some("qemu64"));
        assert_eq!(
            report(&mut s, 2, "kvm", &["EPYC-Rome", "EPYC", "qemu64"]),
            Ok(Outcome::Unchanged)
        );
        assert_eq!(
            report(&mut s, 9, "kvm", &[]),
            Err(ApplyError::UnknownNode { id: 9 })
        );
    }

    #[test]
    fn test_mac_from_is_stable_and_valid() {
        let a = mac_from(b"vm-uuid/0");
        assert_eq!(a, mac_from(b"vm-uuid/0"));
        assert_ne!(a, mac_from(b"vm-uuid/1"));
        assert!(a.starts_with("52:54:00:"));
        assert!(valid_mac(&a), "{a}");
    }

    #[test]
    fn test_valid_mac() {
        assert!(valid_mac("52:54:00:ab:cd:ef"));
        assert!(valid_mac("02:00:00:00:00:01"));
        assert!(!valid_mac("01:00:5e:00:00:01"), "multicast");
        assert!(!valid_mac("52:54:00:ab:cd"));
        assert!(!valid_mac("52:54:00:ab:cd:eg"));
        assert!(!valid_mac("5254.00ab.cdef"));
        assert!(!valid_mac(""));
    }

    #[test]
    fn test_vm_record_json_round_trip() {
        let mut s = cluster();
        create(&mut s, 10, "web", spec(), 1).unwrap();
        let json = serde_json::to_string(&s).unwrap();
        let back: ClusterState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        // A state written before VMs existed still loads.
        let mut old: serde_json::Value = serde_json::to_value(&s).unwrap();
        old.as_object_mut().unwrap().remove("vms");
        let back: ClusterState = serde_json::from_value(old).unwrap();
        assert!(back.vms.is_empty());
    }
}
