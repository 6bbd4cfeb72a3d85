//! `migrator vm ...`: define, list, start, stop and delete virtual machines.
//!
//! A VM's definition lives in the cluster state; its owner node's csvd runs its QEMU. `vm
//! start` and `vm stop` record what the operator wants and, unless `--no-wait`, wait until
//! the owner reports that it happened (or why it could not).

use std::path::Path;
use std::time::Duration;

use csvd_raft::ClusterState;
use csvd_raft::api::ClusterClient;
use csvd_raft::command::Command;
use csvd_raft::state::NodeAdminState;
use csvd_raft::vm::{
    NicSpec, VmBoot, VmDesired, VmRecord, VmSpec, VmState, host_reserve_bytes, valid_mac,
};
use serde::Serialize;
use uuid::Uuid;

use crate::cli::VmCmd;
use crate::volumes::{find_disk, human, json, table};

/// How long `vm start` and `vm stop` wait for the owner's report by default.
const WAIT: Duration = Duration::from_secs(180);

/// A VM as `vm show --json` and `vm list --json` print it.
#[derive(Debug, Serialize)]
struct VmView<'a> {
    #[serde(flatten)]
    vm: &'a VmRecord,
    /// What runs, by the owner's last report (`stopped` when it never reported).
    state: &'static str,
}

fn view(vm: &VmRecord) -> VmView<'_> {
    VmView {
        vm,
        state: state_of(vm),
    }
}

/// The VM's state by its owner's last report.
fn state_of(vm: &VmRecord) -> &'static str {
    match &vm.runtime {
        Some(r) if r.node == vm.owner => r.state.as_str(),
        _ => VmState::Stopped.as_str(),
    }
}

fn find_vm<'a>(state: &'a ClusterState, key: &str) -> Result<&'a VmRecord, String> {
    state
        .vms
        .values()
        .find(|v| v.name == key || v.id.to_string() == key)
        .ok_or_else(|| format!("no VM named or with id {key:?}"))
}

/// Parses `--nic SWITCH[,mac=MAC]`.
pub fn parse_nic(s: &str) -> Result<(String, Option<String>), String> {
    let mut parts = s.split(',');
    let switch = parts.next().unwrap_or("").trim().to_string();
    if switch.is_empty() {
        return Err(format!("{s:?}: a NIC needs a virtual switch name"));
    }
    let mut mac = None;
    for p in parts {
        match p.split_once('=') {
            Some(("mac", m)) if valid_mac(m) => mac = Some(m.to_ascii_lowercase()),
            Some(("mac", m)) => return Err(format!("{m:?} is not a unicast MAC address")),
            _ => return Err(format!("{s:?}: unknown NIC option {p:?} (mac=…)")),
        }
    }
    Ok((switch, mac))
}

/// A local file's absolute path (the nodes read it at the same path).
fn absolute(flag: &str, p: &Path) -> Result<String, String> {
    let abs = std::fs::canonicalize(p).or_else(|e| {
        if p.is_absolute() {
            Ok(p.to_path_buf())
        } else {
            Err(format!("--{flag} {}: {e}", p.display()))
        }
    })?;
    Ok(abs.to_string_lossy().into_owned())
}

/// The node a new VM goes to when none is named: an active node with every switch the VM
/// needs and the most memory left for it.
pub fn place(state: &ClusterState, spec: &VmSpec) -> Result<u64, String> {
    let mut best: Option<(u64, u64)> = None;
    let now = csvd_raft::node::now_ms();
    for (id, n) in &state.nodes {
        if n.admin_state != NodeAdminState::Active
            || !state.node_up(*id, now)
            || !spec
                .nics
                .iter()
                .all(|nic| n.spec.switches.contains(&nic.switch))
        {
            continue;
        }
        let usable = (n.spec.memory_bytes - host_reserve_bytes(n.spec.memory_bytes)) >> 20;
        let free = usable.saturating_sub(state.committed_memory_mib(*id, None));
        if free >= spec.memory_mib && best.is_none_or(|(_, f)| free > f) {
            best = Some((*id, free));
        }
    }
    best.map(|(id, _)| id).ok_or_else(|| {
        format!(
            "no node that is up and active has {} MiB free{}",
            spec.memory_mib,
            if spec.nics.is_empty() {
                String::new()
            } else {
                let names: Vec<&str> = spec.nics.iter().map(|n| n.switch.as_str()).collect();
                format!(" and the virtual switches {}", names.join(", "))
            }
        )
    })
}

/// Waits until the owner reports one of `wanted` for `id`; a failure report ends the wait
/// with its detail.
async fn wait_for(
    client: &mut ClusterClient,
    id: Uuid,
    wanted: &[VmState],
    timeout: Duration,
) -> Result<VmRecord, String> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let state = client.state().await.map_err(|e| e.to_string())?;
        let vm = state
            .vms
            .get(&id)
            .ok_or_else(|| format!("VM {id} is gone"))?;
        if let Some(r) = &vm.runtime
            && r.node == vm.owner
        {
            if wanted.contains(&r.state) {
                return Ok(vm.clone());
            }
            if r.state == VmState::Failed && !wanted.contains(&VmState::Failed) {
                return Err(format!(
                    "VM {:?} failed on node {}: {}",
                    vm.name, r.node, r.detail
                ));
            }
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "VM {:?} is still {} after {} s",
                vm.name,
                state_of(vm),
                timeout.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Ctrl-] ends an interactive console, as in telnet.
const ESCAPE: u8 = 0x1d;

/// `vm console`: the VM's serial console, through the node that runs it. Interactive on a
/// terminal (raw mode; Ctrl-] leaves); otherwise stdin's bytes are sent and the output is
/// printed until `linger` after stdin ends.
async fn console(
    client: &mut ClusterClient,
    state: &ClusterState,
    vm: &VmRecord,
    history: u32,
    linger: Duration,
) -> Result<String, String> {
    use std::io::{IsTerminal, Read, Write};
    use tokio_stream::StreamExt;
    let owner = state
        .nodes
        .get(&vm.owner)
        .ok_or_else(|| format!("VM {}'s node {} is gone", vm.name, vm.owner))?;
    let mut node = ClusterClient::new(&owner.spec.grpc_addr, None).map_err(|e| e.to_string())?;
    let _ = client;
    let tty = std::io::stdin().is_terminal();
    let (tx, rx) = tokio::sync::mpsc::channel::<csvd_raft::pb::ConsoleInput>(64);
    tx.send(csvd_raft::pb::ConsoleInput {
        vm: vm.id.to_string(),
        history,
        data: Vec::new(),
    })
    .await
    .map_err(|e| e.to_string())?;
    let mut output = node
        .console(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|e| e.to_string())?;
    let raw = tty.then(RawMode::enter).flatten();
    if tty {
        eprint!(
            "connected to {}'s console on node {} (Ctrl-] leaves)\r\n",
            vm.name, vm.owner
        );
    }
    // stdin on its own thread: reads block.
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let mut chunk = &buf[..n];
                    let mut leave = false;
                    if tty && let Some(at) = chunk.iter().position(|b| *b == ESCAPE) {
                        chunk = &chunk[..at];
                        leave = true;
                    }
                    if !chunk.is_empty()
                        && tx
                            .blocking_send(csvd_raft::pb::ConsoleInput {
                                vm: String::new(),
                                history: 0,
                                data: chunk.to_vec(),
                            })
                            .is_err()
                    {
                        break;
                    }
                    if leave {
                        break;
                    }
                }
            }
        }
        let _ = done_tx.send(());
    });
    let mut out = std::io::stdout();
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = output.next() => match msg {
                Some(Ok(m)) => {
                    let _ = out.write_all(&m.data);
                    let _ = out.flush();
                }
                Some(Err(e)) => {
                    drop(raw);
                    return Err(format!("console: {}", e.message()));
                }
                None => break,
            },
            _ = &mut done_rx, if deadline.is_none() => {
                if tty {
                    break;
                }
                deadline = Some(tokio::time::Instant::now() + linger);
            }
            _ = sleep => break,
        }
    }
    drop(raw);
    if tty {
        eprintln!();
    }
    Ok(String::new())
}

/// A terminal in raw mode until dropped.
struct RawMode(rustix::termios::Termios);

impl RawMode {
    fn enter() -> Option<RawMode> {
        let stdin = std::io::stdin();
        let saved = rustix::termios::tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw).ok()?;
        Some(RawMode(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin(),
            rustix::termios::OptionalActions::Now,
            &self.0,
        );
    }
}

impl std::fmt::Debug for RawMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RawMode")
    }
}

/// Runs a `vm` subcommand.
pub async fn run(client: &mut ClusterClient, cmd: &VmCmd, as_json: bool) -> Result<String, String> {
    let state = client.state().await.map_err(|e| e.to_string())?;
    match cmd {
        VmCmd::Create {
            name,
            memory,
            vcpus,
            cpu,
            disks,
            nics,
            kernel,
            initrd,
            append,
            node,
        } => {
            let id = Uuid::new_v4();
            let disk_ids = disks
                .iter()
                .map(|d| find_disk(&state, d).map(|d| d.id))
                .collect::<Result<Vec<_>, _>>()?;
            let mut nic_specs = Vec::new();
            for (i, n) in nics.iter().enumerate() {
                let (switch, mac) = parse_nic(n)?;
                let mac =
                    mac.unwrap_or_else(|| csvd_raft::vm::mac_from(format!("{id}/{i}").as_bytes()));
                nic_specs.push(NicSpec { switch, mac });
            }
            let boot = match kernel {
                Some(k) => VmBoot::Kernel {
                    kernel: absolute("kernel", k)?,
                    initrd: initrd
                        .as_deref()
                        .map(|i| absolute("initrd", i))
                        .transpose()?,
                    append: append.clone().unwrap_or_default(),
                },
                None if initrd.is_some() || append.is_some() => {
                    return Err("--initrd and --append need --kernel".into());
                }
                None => VmBoot::Disk,
            };
            let spec = VmSpec {
                vcpus: *vcpus,
                memory_mib: *memory,
                cpu: cpu.clone(),
                disks: disk_ids,
                nics: nic_specs,
                boot,
            };
            let owner = match node {
                Some(n) => *n,
                None => place(&state, &spec)?,
            };
            client
                .write(Command::CreateVm {
                    id,
                    name: name.clone(),
                    spec,
                    owner,
                    now_ms: csvd_raft::node::now_ms(),
                })
                .await
                .map_err(|e| e.to_string())?;
            Ok(if as_json {
                json(&serde_json::json!({ "id": id, "name": name, "owner": owner }))
            } else {
                format!("created VM {name} ({id}) on node {owner}")
            })
        }
        VmCmd::List => {
            let vms: Vec<&VmRecord> = state.vms.values().collect();
            if as_json {
                return Ok(json(&vms.iter().map(|v| view(v)).collect::<Vec<_>>()));
            }
            let mut rows = vec![
                [
                    "NAME", "OWNER", "STATE", "WANTED", "VCPUS", "MEMORY", "DISKS", "NICS",
                ]
                .map(String::from)
                .to_vec(),
            ];
            let mut sorted = vms;
            sorted.sort_by(|a, b| a.name.cmp(&b.name));
            for v in sorted {
                rows.push(vec![
                    v.name.clone(),
                    format!("node {}", v.owner),
                    state_of(v).to_string(),
                    v.desired.as_str().into(),
                    v.spec.vcpus.to_string(),
                    human(v.spec.memory_mib << 20),
                    v.spec.disks.len().to_string(),
                    v.spec.nics.len().to_string(),
                ]);
            }
            Ok(table(rows))
        }
        VmCmd::Show { vm } => {
            let v = find_vm(&state, vm)?;
            if as_json {
                return Ok(json(&view(v)));
            }
            Ok(render(&state, v))
        }
        VmCmd::Start { vm, no_wait }
        | VmCmd::Stop { vm, no_wait }
        | VmCmd::Pause { vm, no_wait }
        | VmCmd::Resume { vm, no_wait } => {
            let v = find_vm(&state, vm)?;
            let (desired, wanted, verb) = match cmd {
                VmCmd::Start { .. } => (VmDesired::Running, VmState::Running, "started"),
                VmCmd::Pause { .. } => (VmDesired::Paused, VmState::Paused, "paused"),
                VmCmd::Resume { .. } => {
                    if v.desired != VmDesired::Paused {
                        return Err(format!(
                            "VM {} is not paused (it is meant to be {})",
                            v.name,
                            v.desired.as_str()
                        ));
                    }
                    (VmDesired::Running, VmState::Running, "resumed")
                }
                _ => (VmDesired::Stopped, VmState::Stopped, "stopped"),
            };
            client
                .write(Command::SetVmDesired { id: v.id, desired })
                .await
                .map_err(|e| e.to_string())?;
            if *no_wait {
                return Ok(if as_json {
                    json(&serde_json::json!({ "id": v.id, "name": v.name, "wanted": desired }))
                } else {
                    format!("VM {} will be {verb} by node {}", v.name, v.owner)
                });
            }
            let done = wait_for(client, v.id, &[wanted], WAIT).await?;
            Ok(if as_json {
                json(&view(&done))
            } else {
                format!("VM {} {verb} on node {}", done.name, done.owner)
            })
        }
        VmCmd::Console {
            vm,
            history,
            linger_ms,
        } => {
            let v = find_vm(&state, vm)?.clone();
            console(
                client,
                &state,
                &v,
                *history,
                Duration::from_millis(*linger_ms),
            )
            .await
        }
        VmCmd::Delete { vm } => {
            let v = find_vm(&state, vm)?;
            client
                .write(Command::DeleteVm { id: v.id })
                .await
                .map_err(|e| e.to_string())?;
            Ok(if as_json {
                json(&serde_json::json!({ "deleted": v.id, "name": v.name }))
            } else {
                format!("deleted VM {} ({}); its disks remain", v.name, v.id)
            })
        }
    }
}

fn render(state: &ClusterState, v: &VmRecord) -> String {
    let mut out = format!(
        "name      {}\nid        {}\nowner     node {}\nstate     {}\nwanted    {}\nvcpus     {}\nmemory    {}\ncpu       {}\n",
        v.name,
        v.id,
        v.owner,
        state_of(v),
        v.desired.as_str(),
        v.spec.vcpus,
        human(v.spec.memory_mib << 20),
        v.spec.cpu,
    );
    if let Some(r) = &v.runtime
        && !r.detail.is_empty()
    {
        out.push_str(&format!("detail    {}\n", r.detail));
    }
    if let Some(r) = &v.runtime
        && r.restarts > 0
    {
        out.push_str(&format!("restarts  {}\n", r.restarts));
    }
    match &v.spec.boot {
        VmBoot::Disk => out.push_str("boot      disk\n"),
        VmBoot::Kernel {
            kernel,
            initrd,
            append,
        } => {
            out.push_str(&format!("kernel    {kernel}\n"));
            if let Some(i) = initrd {
                out.push_str(&format!("initrd    {i}\n"));
            }
            if !append.is_empty() {
                out.push_str(&format!("append    {append}\n"));
            }
        }
    }
    for (i, d) in v.spec.disks.iter().enumerate() {
        let name = state.disks.get(d).map(|r| r.name.as_str()).unwrap_or("?");
        out.push_str(&format!("disk {i}    LUN {d} ({name})\n"));
    }
    for (i, n) in v.spec.nics.iter().enumerate() {
        out.push_str(&format!("nic {i}     {} on {}\n", n.mac, n.switch));
    }
    out.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_nic() {
        assert_eq!(parse_nic("lan"), Ok(("lan".into(), None)));
        assert_eq!(
            parse_nic("lan,mac=52:54:00:AB:cd:01"),
            Ok(("lan".into(), Some("52:54:00:ab:cd:01".into())))
        );
        assert!(parse_nic("").is_err());
        assert!(parse_nic(",mac=52:54:00:ab:cd:01").is_err());
        assert!(
            parse_nic("lan,mac=01:00:5e:00:00:01")
                .unwrap_err()
                .contains("unicast")
        );
        assert!(
            parse_nic("lan,vlan=3")
                .unwrap_err()
                .contains("unknown NIC option")
        );
    }
}
