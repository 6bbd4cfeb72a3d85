//! `migrator migrate VM --to NODE` and `migrator migration list|show|cancel`.
//!
//! The migration itself runs in the daemons (see the `csvd_raft::migration` record); this
//! command asks for it, then follows the record as the node pushes each change to it (see
//! [`ClusterClient::watch_migration`]): a progress line on stderr (transferred,
//! remaining, dirty rate, predicted completion and downtime), or with `--json` one JSON
//! object per change on stdout, the last one carrying the outcome with `total_ms` and
//! `downtime_ms`.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use csvd_raft::ClusterState;
use csvd_raft::api::{ClientError, ClusterClient, MigrationWatch};
use csvd_raft::command::{Command, Outcome};
use csvd_raft::migration::{
    DEFAULT_DOWNTIME_MS, MigrationId, MigrationParams, MigrationPhase, MigrationPolicy,
    MigrationRecord,
};
use csvd_raft::state::NodeAdminState;
use csvd_raft::vm::{VmDesired, VmState};
use serde::Serialize;
use tonic::Code;

use crate::cli::MigrationCmd;
use crate::volumes::{human, json, table};

/// Parses `--policy`.
pub fn parse_policy(s: &str) -> Result<MigrationPolicy, String> {
    match s {
        "precopy" => Ok(MigrationPolicy::Precopy),
        "auto-converge" => Ok(MigrationPolicy::AutoConverge),
        "quick" => Ok(MigrationPolicy::Quick),
        "postcopy" => Ok(MigrationPolicy::Postcopy),
        other => Err(format!(
            "{other:?} is not a policy (precopy, postcopy, auto-converge or quick)"
        )),
    }
}

/// One line of `--json` output.
#[derive(Debug, Serialize)]
struct EventLine<'a> {
    migration: MigrationId,
    vm: &'a str,
    phase: &'static str,
    source: u64,
    dest: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    transferred_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remaining_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dirty_pages_rate: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expected_downtime_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    predicted_completion_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    total_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    downtime_ms: Option<u64>,
    /// Of the total: from admission to the destination ready, and from then to the copy
    /// done (the rest is the switchover and the resumption).
    #[serde(skip_serializing_if = "Option::is_none")]
    prepare_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    copy_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

/// How long the destination took to be ready, and then the copy, once the migration is
/// over (node clocks are assumed to agree).
fn phase_times(m: &MigrationRecord) -> (Option<u64>, Option<u64>) {
    if m.total_ms.is_none() {
        return (None, None);
    }
    let prepare = m
        .ready_at_ms
        .zip(m.started_at_ms)
        .map(|(r, s)| r.saturating_sub(s));
    let copy = m
        .switchover_at_ms
        .zip(m.ready_at_ms)
        .map(|(c, r)| c.saturating_sub(r));
    (prepare, copy)
}

/// Milliseconds until the copy is done at the current rate, if there is one.
fn predicted_ms(m: &MigrationRecord) -> Option<u64> {
    let p = m.progress.as_ref()?;
    (p.bytes_per_sec > 0).then(|| p.remaining_bytes.saturating_mul(1000) / p.bytes_per_sec)
}

fn event(m: &MigrationRecord) -> EventLine<'_> {
    let p = m.progress.as_ref();
    let outcome = m.phase.is_terminal().then(|| m.phase.as_str());
    let (prepare_ms, copy_ms) = phase_times(m);
    EventLine {
        migration: m.id,
        vm: &m.vm_name,
        phase: m.phase.as_str(),
        source: m.source,
        dest: m.dest,
        transferred_bytes: p.map(|p| p.transferred_bytes),
        remaining_bytes: p.map(|p| p.remaining_bytes),
        dirty_pages_rate: p.map(|p| p.dirty_pages_rate),
        expected_downtime_ms: p.map(|p| p.expected_downtime_ms),
        predicted_completion_ms: predicted_ms(m),
        outcome,
        total_ms: m.total_ms,
        downtime_ms: m.downtime_ms,
        prepare_ms,
        copy_ms,
        error: m.error.as_deref(),
    }
}

/// The progress line for people.
fn progress_line(m: &MigrationRecord) -> String {
    match &m.progress {
        Some(p) if m.phase == MigrationPhase::Copying => {
            let pct = (100 * p.transferred_bytes.min(p.total_bytes))
                .checked_div(p.total_bytes)
                .unwrap_or(0);
            let filled = (pct / 5) as usize;
            format!(
                "{} [{}{}] {pct:>3}%  sent {}  left {}  dirty {}/s  done in ~{}  downtime ~{} ms",
                m.vm_name,
                "#".repeat(filled),
                " ".repeat(20 - filled),
                human(p.transferred_bytes),
                human(p.remaining_bytes),
                human(p.dirty_pages_rate.saturating_mul(p.page_size.max(1))),
                predicted_ms(m).map_or("?".into(), |ms| format!("{:.1} s", ms as f64 / 1000.0)),
                p.expected_downtime_ms
            )
        }
        _ => format!("{} {}", m.vm_name, m.phase.as_str()),
    }
}

fn find_migration(state: &ClusterState, key: &str) -> Result<MigrationRecord, String> {
    if let Ok(id) = key.parse::<MigrationId>()
        && let Some(m) = state.migrations.get(&id)
    {
        return Ok(m.clone());
    }
    // A VM name: its open migration, else its latest.
    state
        .migrations
        .values()
        .filter(|m| m.vm_name == key || m.vm.to_string() == key)
        .max_by_key(|m| (!m.phase.is_terminal(), m.id))
        .cloned()
        .ok_or_else(|| format!("no migration with id or of a VM named {key:?}"))
}

/// Follows migration `id` until it ends; prints progress; the outcome is the result.
pub async fn follow(
    client: &mut ClusterClient,
    id: MigrationId,
    as_json: bool,
) -> Result<String, String> {
    let tty = std::io::stderr().is_terminal();
    let mut last: Option<String> = None;
    let mut follower = Follower::new(id);
    loop {
        let m = follower.next(client).await?;
        let line = if as_json {
            serde_json::to_string(&event(&m)).unwrap_or_default()
        } else {
            progress_line(&m)
        };
        if last.as_ref() != Some(&line) {
            if as_json {
                if !m.phase.is_terminal() {
                    println!("{line}");
                }
            } else if tty {
                eprint!("\r\x1b[2K{line}");
            } else {
                eprintln!("{line}");
            }
            last = Some(line.clone());
        }
        if m.phase.is_terminal() {
            if tty && !as_json {
                eprintln!();
            }
            return match m.phase {
                MigrationPhase::Completed if as_json => Ok(line),
                MigrationPhase::Completed => Ok(format!(
                    "VM {} moved from node {} to node {} in {} ms ({})",
                    m.vm_name,
                    m.source,
                    m.dest,
                    m.total_ms.unwrap_or(0),
                    match m.downtime_ms {
                        _ if m.paused => "paused, as it stays".to_string(),
                        d => format!("downtime {} ms", d.unwrap_or(0)),
                    }
                )),
                _ if as_json => {
                    println!("{line}");
                    Err(format!("migration {id} {}", m.phase.as_str()))
                }
                MigrationPhase::Cancelled => Err(format!(
                    "migration {id} was cancelled: VM {} stays on node {}",
                    m.vm_name, m.source
                )),
                _ => Err(format!(
                    "migration {id} failed: {}",
                    m.error.as_deref().unwrap_or("no reason recorded")
                )),
            };
        }
    }
}

/// `migrator migrate VM --to NODE ...`
#[allow(clippy::too_many_arguments)]
pub async fn migrate(
    client: &mut ClusterClient,
    vm: &str,
    to: u64,
    bandwidth: Option<u64>,
    downtime_ms: Option<u64>,
    policy: MigrationPolicy,
    no_wait: bool,
    as_json: bool,
) -> Result<String, String> {
    let state = client.state().await.map_err(|e| e.to_string())?;
    let v = state
        .vms
        .values()
        .find(|v| v.name == vm || v.id.to_string() == vm)
        .ok_or_else(|| format!("no VM named or with id {vm:?}"))?;
    let (outcome, _) = client
        .write(Command::StartMigration {
            vm: v.id,
            dest: to,
            params: MigrationParams {
                bandwidth_mibps: bandwidth,
                downtime_ms: downtime_ms.unwrap_or(DEFAULT_DOWNTIME_MS),
                policy,
            },
            now_ms: csvd_raft::node::now_ms(),
        })
        .await
        .map_err(|e| e.to_string())?;
    let Outcome::Created { id } = outcome else {
        return Err(format!("unexpected outcome {outcome:?}"));
    };
    if no_wait {
        let state = client.state().await.map_err(|e| e.to_string())?;
        let phase = state.migrations.get(&id).map_or("?", |m| m.phase.as_str());
        return Ok(if as_json {
            json(&serde_json::json!({ "migration": id, "vm": v.name, "phase": phase }))
        } else {
            format!("migration {id} of VM {} to node {to}: {phase}", v.name)
        });
    }
    follow(client, id, as_json).await
}

/// `migrator node drain NODE`: no new VMs on the node, and every VM it owns moves away.
pub async fn drain(
    client: &mut ClusterClient,
    node: u64,
    no_wait: bool,
    as_json: bool,
) -> Result<String, String> {
    client
        .write(Command::SetNodeState {
            id: node,
            state: NodeAdminState::Draining,
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut started: Vec<MigrationId> = Vec::new();
    let mut moved_cold: Vec<String> = Vec::new();
    let mut problems: Vec<String> = Vec::new();
    let state = client.state().await.map_err(|e| e.to_string())?;
    let mut vms: Vec<_> = state
        .vms
        .values()
        .filter(|v| v.owner == node)
        .cloned()
        .collect();
    vms.sort_by(|a, b| a.name.cmp(&b.name));
    for v in vms {
        // Placement sees the migrations already started, so VMs spread out.
        let state = client.state().await.map_err(|e| e.to_string())?;
        if let Some(m) = state.open_migration(v.id) {
            started.push(m.id);
            continue;
        }
        let dest = match crate::vms::place(&state, &v.spec) {
            Ok(d) => d,
            Err(e) => {
                problems.push(format!("{}: {e}", v.name));
                continue;
            }
        };
        // Running, or paused (it moves paused), as wanted.
        let settled = |want: VmState| {
            v.runtime
                .as_ref()
                .is_some_and(|r| r.node == node && r.state == want)
        };
        let live = match v.desired {
            VmDesired::Running => settled(VmState::Running),
            VmDesired::Paused => settled(VmState::Paused),
            VmDesired::Stopped => false,
        };
        if live {
            let cmd = Command::StartMigration {
                vm: v.id,
                dest,
                // Auto-converge: it is pre-copy for a quiet guest, and throttles a busy one
                // until it converges, so that maintenance empties the node either way.
                params: MigrationParams {
                    bandwidth_mibps: None,
                    downtime_ms: DEFAULT_DOWNTIME_MS,
                    policy: MigrationPolicy::AutoConverge,
                },
                now_ms: csvd_raft::node::now_ms(),
            };
            match client.write(cmd).await {
                Ok((Outcome::Created { id }, _)) => started.push(id),
                Ok((o, _)) => problems.push(format!("{}: unexpected outcome {o:?}", v.name)),
                Err(e) => problems.push(format!("{}: {e}", v.name)),
            }
        } else if v.desired == VmDesired::Stopped {
            match client
                .write(Command::SetVmOwner {
                    id: v.id,
                    owner: dest,
                    expected: node,
                })
                .await
            {
                Ok(_) => moved_cold.push(format!("{} -> node {dest}", v.name)),
                Err(e) => problems.push(format!("{}: {e}", v.name)),
            }
        } else {
            problems.push(format!(
                "{}: it is starting or stopping; drain again when it settles",
                v.name
            ));
        }
    }
    let mut outcomes = Vec::new();
    if !no_wait {
        for id in &started {
            let end = follow_quiet(client, *id).await?;
            if end.phase != MigrationPhase::Completed {
                problems.push(format!(
                    "{}: migration {} {}{}",
                    end.vm_name,
                    end.id,
                    end.phase.as_str(),
                    end.error
                        .as_ref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                ));
            }
            outcomes.push(end);
        }
    }
    if as_json {
        let out = json(&serde_json::json!({
            "node": node,
            "migrations": if no_wait { serde_json::json!(started) } else { serde_json::to_value(&outcomes).unwrap_or_default() },
            "moved_stopped": moved_cold,
            "problems": problems,
        }));
        return if problems.is_empty() {
            Ok(out)
        } else {
            Err(out.replace('\n', " "))
        };
    }
    let mut lines = vec![format!("node {node} is draining: it takes no new VMs")];
    for m in &outcomes {
        lines.push(format!(
            "  {} -> node {}: {} ({} ms, downtime {} ms)",
            m.vm_name,
            m.dest,
            m.phase.as_str(),
            m.total_ms.unwrap_or(0),
            m.downtime_ms.unwrap_or(0)
        ));
    }
    if no_wait {
        lines.push(format!("  {} migrations started or queued", started.len()));
    }
    for c in &moved_cold {
        lines.push(format!("  {c} (stopped)"));
    }
    if problems.is_empty() {
        Ok(lines.join("\n"))
    } else {
        Err(format!(
            "{}; not moved: {}",
            lines.join("; "),
            problems.join("; ")
        ))
    }
}

/// Reads migration `id`'s record.
async fn fetch(client: &mut ClusterClient, id: MigrationId) -> Result<MigrationRecord, String> {
    let state = client.state().await.map_err(|e| e.to_string())?;
    state
        .migrations
        .get(&id)
        .cloned()
        .ok_or_else(|| format!("migration {id} is gone"))
}

/// How long a follower keeps trying to reach the cluster again (a leader change, a node
/// restarting) before it gives up on following; the migration itself goes on regardless.
const REGAIN: Duration = Duration::from_secs(30);
/// How often a follower polls a node too old to push changes.
const POLL: Duration = Duration::from_millis(100);

/// Follows one migration's record: pushed by the node on each change
/// ([`ClusterClient::watch_migration`]), or polled from a node too old to offer that.
struct Follower {
    id: MigrationId,
    watch: Option<MigrationWatch>,
    /// The node does not push: poll, every [`POLL`] after the first read.
    polling: bool,
    polled: bool,
    /// Since when the cluster has not answered, while it does not.
    lost_since: Option<Instant>,
}

impl Follower {
    fn new(id: MigrationId) -> Self {
        Self {
            id,
            watch: None,
            polling: false,
            polled: false,
            lost_since: None,
        }
    }

    /// The record's next version (the first call: the current one).
    async fn next(&mut self, client: &mut ClusterClient) -> Result<MigrationRecord, String> {
        loop {
            if self.polling {
                if self.polled {
                    tokio::time::sleep(POLL).await;
                }
                self.polled = true;
                return fetch(client, self.id).await;
            }
            let failure = match &mut self.watch {
                Some(w) => match w.next().await {
                    Some(Ok(m)) => {
                        self.lost_since = None;
                        return Ok(m);
                    }
                    Some(Err(e)) => e,
                    // Ended without a final phase: the node went away.
                    None => ClientError::Unreachable {
                        endpoint: client.endpoint().to_string(),
                        reason: "the node ended the watch".into(),
                    },
                },
                None => match client.watch_migration(self.id).await {
                    Ok(w) => {
                        self.watch = Some(w);
                        continue;
                    }
                    // A csvd too old to offer the watch.
                    Err(ClientError::Refused {
                        code: Code::Unimplemented,
                        ..
                    }) => {
                        self.polling = true;
                        continue;
                    }
                    Err(e) => e,
                },
            };
            self.watch = None;
            // The node answered this migrator before (the migration exists), so a reply
            // that is not gRPC is a connection broken mid-way, as when the node dies.
            let transient = matches!(
                failure,
                ClientError::Unreachable { .. }
                    | ClientError::NotCsvd { .. }
                    | ClientError::Refused {
                        code: Code::Unavailable,
                        ..
                    }
            );
            let since = *self.lost_since.get_or_insert_with(Instant::now);
            if !transient || since.elapsed() > REGAIN {
                return Err(failure.to_string());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Waits for migration `id` to end, without printing.
async fn follow_quiet(
    client: &mut ClusterClient,
    id: MigrationId,
) -> Result<MigrationRecord, String> {
    let mut follower = Follower::new(id);
    loop {
        let m = follower.next(client).await?;
        if m.phase.is_terminal() {
            return Ok(m);
        }
    }
}

/// Runs a `migration` subcommand.
pub async fn run(
    client: &mut ClusterClient,
    cmd: &MigrationCmd,
    as_json: bool,
) -> Result<String, String> {
    let state = client.state().await.map_err(|e| e.to_string())?;
    match cmd {
        MigrationCmd::List => {
            let ms: Vec<&MigrationRecord> = state.migrations.values().collect();
            if as_json {
                return Ok(json(&ms));
            }
            let mut rows = vec![
                [
                    "ID", "VM", "FROM", "TO", "PHASE", "TOTAL", "DOWNTIME", "ERROR",
                ]
                .map(String::from)
                .to_vec(),
            ];
            for m in ms {
                rows.push(vec![
                    m.id.to_string(),
                    m.vm_name.clone(),
                    format!("node {}", m.source),
                    format!("node {}", m.dest),
                    m.phase.as_str().to_string(),
                    m.total_ms.map_or("-".into(), |t| format!("{t} ms")),
                    m.downtime_ms.map_or("-".into(), |t| format!("{t} ms")),
                    m.error.clone().unwrap_or_default(),
                ]);
            }
            Ok(table(rows))
        }
        MigrationCmd::Show { migration } => {
            let m = find_migration(&state, migration)?;
            if as_json {
                return Ok(json(&m));
            }
            let mut out = format!(
                "migration {}\nvm        {}\nfrom      node {}\nto        node {}\nphase     {}{}\npolicy    {}\ndowntime  limit {} ms\nbandwidth {}\n",
                m.id,
                m.vm_name,
                m.source,
                m.dest,
                m.phase.as_str(),
                if m.cancel_requested && !m.phase.is_terminal() {
                    " (cancelling)"
                } else {
                    ""
                },
                m.params.policy.as_str(),
                m.params.downtime_ms,
                m.params
                    .bandwidth_mibps
                    .map_or("uncapped".into(), |b| format!("{b} MiB/s")),
            );
            if m.paused {
                out.push_str("guest     paused: it moves paused and stays so\n");
            }
            if m.phase == MigrationPhase::Copying {
                out.push_str(&format!("progress  {}\n", progress_line(&m)));
            }
            if let Some(t) = m.total_ms {
                out.push_str(&format!("total     {t} ms"));
                if let (Some(p), Some(c)) = phase_times(&m) {
                    out.push_str(&format!(
                        " (destination ready {p} ms, copy {c} ms, switchover and resumption {} ms)",
                        t.saturating_sub(p + c)
                    ));
                }
                out.push('\n');
            }
            if let Some(d) = m.downtime_ms {
                out.push_str(&format!(
                    "downtime  {d} ms (QEMU: {} ms)\n",
                    m.qemu_downtime_ms.unwrap_or(0)
                ));
            }
            if let Some(e) = &m.error {
                out.push_str(&format!("error     {e}\n"));
            }
            Ok(out.trim_end().to_string())
        }
        MigrationCmd::Limits {
            per_node,
            cluster,
            no_cluster_cap,
        } => {
            let mut limits = state.migration_limits;
            let change = per_node.is_some() || cluster.is_some() || *no_cluster_cap;
            if let Some(n) = per_node {
                limits.per_node = *n;
            }
            if let Some(c) = cluster {
                limits.cluster = Some(*c);
            }
            if *no_cluster_cap {
                limits.cluster = None;
            }
            if change {
                client
                    .write(Command::SetMigrationLimits {
                        limits,
                        now_ms: csvd_raft::node::now_ms(),
                    })
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok(if as_json {
                json(&limits)
            } else {
                format!(
                    "per node: {}\ncluster:  {}",
                    limits.per_node,
                    limits.cluster.map_or("no cap".into(), |c| c.to_string())
                )
            })
        }
        MigrationCmd::Cancel { migration } => {
            let m = find_migration(&state, migration)?;
            client
                .write(Command::CancelMigration {
                    id: m.id,
                    now_ms: csvd_raft::node::now_ms(),
                })
                .await
                .map_err(|e| e.to_string())?;
            Ok(if as_json {
                json(&serde_json::json!({ "migration": m.id, "cancel_requested": true }))
            } else {
                format!("migration {} of VM {}: cancel requested", m.id, m.vm_name)
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_policy() {
        assert_eq!(parse_policy("precopy"), Ok(MigrationPolicy::Precopy));
        assert_eq!(
            parse_policy("auto-converge"),
            Ok(MigrationPolicy::AutoConverge)
        );
        assert_eq!(parse_policy("quick"), Ok(MigrationPolicy::Quick));
        assert_eq!(parse_policy("postcopy"), Ok(MigrationPolicy::Postcopy));
        assert!(
            parse_policy("fast")
                .unwrap_err()
                .contains("is not a policy")
        );
    }
}
