//! One QEMU instance's life on a node: start it daemonized (so it outlives a restart of the
//! daemon that started it), adopt it again after such a restart, ask the guest to shut down
//! and kill it when it does not, and tell whether it still runs.
//!
//! An instance is identified by its run directory: the pid file, QMP socket, console socket
//! and serial log live there (see [`RunPaths`]).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cmdline::{LaunchSpec, RunPaths, qemu_args};
use crate::qmp::{Qmp, QmpError};
use crate::spawn::run_as_guest;

/// How long [`Instance::shutdown`] waits before pressing the power button again.
const PRESS_AGAIN: Duration = Duration::from_secs(5);

/// Why an instance could not be started or adopted.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot prepare {path}: {source}")]
    RunDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start {qemu}: {source}")]
    Spawn {
        qemu: PathBuf,
        source: std::io::Error,
    },
    #[error("QEMU refused to start: {0}")]
    Refused(String),
    #[error("QEMU {0} is already running from {1}")]
    AlreadyRunning(i32, PathBuf),
    #[error("QEMU started but wrote no pid file at {0}")]
    NoPid(PathBuf),
    #[error(transparent)]
    Qmp(#[from] QmpError),
}

/// How a shutdown ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// The guest powered off when asked.
    Guest,
    /// QEMU quit when told to (the guest ignored the request).
    Quit,
    /// QEMU was killed.
    Killed,
    /// It was not running.
    NotRunning,
}

/// A running QEMU instance.
#[derive(Clone, Debug)]
pub struct Instance {
    pub pid: i32,
    pub qmp: Qmp,
    pub paths: RunPaths,
}

/// Reads a pid file; `None` when it is missing or does not hold a pid.
fn read_pid(pidfile: &Path) -> Option<i32> {
    std::fs::read_to_string(pidfile)
        .ok()?
        .trim()
        .parse::<i32>()
        .ok()
        .filter(|p| *p > 0)
}

/// Whether `pid` is a live QEMU that writes `pidfile` (a pid alone may have been reused).
fn is_our_qemu(pid: i32, pidfile: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    if std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
    }) {
        return false;
    }
    let needle = pidfile.to_string_lossy();
    cmdline
        .split(|b| *b == 0)
        .any(|arg| arg == needle.as_bytes())
}

fn signal(pid: i32, sig: rustix::process::Signal) -> bool {
    rustix::process::Pid::from_raw(pid)
        .is_some_and(|p| rustix::process::kill_process(p, sig).is_ok())
}

impl Instance {
    /// Starts QEMU for `spec` and connects to its QMP socket, within `timeout`. A QEMU that
    /// already runs from the same run directory is an error (never two instances of one
    /// VM on a node).
    pub async fn start(
        qemu: &Path,
        spec: &LaunchSpec,
        timeout: Duration,
    ) -> Result<Instance, ProcessError> {
        let paths = RunPaths::new(&spec.run_dir);
        let dir_err = |source| ProcessError::RunDir {
            path: spec.run_dir.clone(),
            source,
        };
        std::fs::create_dir_all(&spec.run_dir).map_err(dir_err)?;
        if let Some(pid) = read_pid(&paths.pidfile)
            && is_our_qemu(pid, &paths.pidfile)
        {
            return Err(ProcessError::AlreadyRunning(pid, spec.run_dir.clone()));
        }
        for stale in [&paths.pidfile, &paths.qmp, &paths.console] {
            match std::fs::remove_file(stale) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(dir_err(e)),
            }
        }
        // With -daemonize the command returns once the guest is set up (or has failed).
        let args = qemu_args(spec).into_iter().map(Into::into).collect();
        let out = tokio::time::timeout(timeout, run_as_guest(qemu.as_os_str(), args))
            .await
            .map_err(|_| ProcessError::Refused(format!("no answer within {timeout:?}")))?
            .map_err(|source| ProcessError::Spawn {
                qemu: qemu.to_path_buf(),
                source,
            })?;
        if !out.status.success() {
            let text = String::from_utf8_lossy(&out.stderr);
            let why = text
                .lines()
                .map(|l| l.trim().trim_start_matches("qemu-system-x86_64: "))
                .filter(|l| !l.is_empty() && !l.contains("warning:"))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(ProcessError::Refused(if why.is_empty() {
                format!("it exited with {}", out.status)
            } else {
                why
            }));
        }
        let pid =
            read_pid(&paths.pidfile).ok_or_else(|| ProcessError::NoPid(paths.pidfile.clone()))?;
        let qmp = match Qmp::connect_retry(&paths.qmp, timeout).await {
            Ok(q) => q,
            Err(e) => {
                signal(pid, rustix::process::Signal::KILL);
                return Err(e.into());
            }
        };
        Ok(Instance { pid, qmp, paths })
    }

    /// Finds the QEMU that runs from `run_dir` (after a daemon restart) and connects to it.
    /// `Ok(None)` when none runs there.
    pub async fn adopt(
        run_dir: &Path,
        timeout: Duration,
    ) -> Result<Option<Instance>, ProcessError> {
        let paths = RunPaths::new(run_dir);
        let Some(pid) = read_pid(&paths.pidfile) else {
            return Ok(None);
        };
        if !is_our_qemu(pid, &paths.pidfile) {
            return Ok(None);
        }
        let qmp = Qmp::connect_retry(&paths.qmp, timeout).await?;
        Ok(Some(Instance { pid, qmp, paths }))
    }

    /// Whether the QEMU process still runs.
    pub fn alive(&self) -> bool {
        is_our_qemu(self.pid, &self.paths.pidfile)
    }

    /// Waits up to `timeout` for the process to end; true when it has.
    pub async fn wait_exit(&self, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        loop {
            if !self.alive() {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills QEMU at once and waits for it to be gone.
    pub async fn kill(&self) {
        if self.alive() {
            signal(self.pid, rustix::process::Signal::KILL);
        }
        self.wait_exit(Duration::from_secs(10)).await;
    }

    /// Asks the guest to power off (ACPI power button) and waits up to `grace`; then tells
    /// QEMU to quit; then kills it. The button is pressed again every few seconds: a guest
    /// still booting misses a press that comes before it listens.
    pub async fn shutdown(&self, grace: Duration) -> Stopped {
        if !self.alive() {
            return Stopped::NotRunning;
        }
        let until = Instant::now() + grace;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() || self.qmp.system_powerdown().await.is_err() {
                break;
            }
            if self.wait_exit(left.min(PRESS_AGAIN)).await {
                return Stopped::Guest;
            }
        }
        if self.qmp.quit().await.is_ok() && self.wait_exit(Duration::from_secs(5)).await {
            return Stopped::Quit;
        }
        self.kill().await;
        Stopped::Killed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accel::Accel;
    use crate::cmdline::Boot;
    use crate::qmp::RunState;

    /// QEMU and the test guest (scripts/build-guest), or a skip line.
    fn guest() -> Option<(PathBuf, PathBuf)> {
        let qemu = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("qemu-system-x86_64"))
                .find(|p| p.is_file())
        });
        let Some(qemu) = qemu else {
            println!("skipping: qemu-system-x86_64 not found");
            return None;
        };
        let dir = std::env::var_os("CSVD_GUEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp/csvd-guest"));
        if !dir.join("vmlinuz").is_file() {
            println!(
                "skipping: no test guest in {} (scripts/build-guest)",
                dir.display()
            );
            return None;
        }
        Some((qemu, dir))
    }

    fn spec(guest: &Path, run_dir: &Path) -> LaunchSpec {
        LaunchSpec {
            name: "t".into(),
            uuid: "5e1f3b0c-8b8a-4c8e-9d57-2b0c4a3f9e10".into(),
            accel: Accel::Tcg,
            cpu: "max".into(),
            vcpus: 1,
            memory_mib: 128,
            disks: Vec::new(),
            nics: Vec::new(),
            boot: Boot::Kernel {
                kernel: guest.join("vmlinuz"),
                initrd: Some(guest.join("initrd.img")),
                append: "console=ttyS0 quiet panic=-1 csvd.period_ms=50".into(),
            },
            run_dir: run_dir.to_path_buf(),
            incoming: false,
        }
    }

    async fn wait_for_log(path: &Path, needle: &str, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if std::fs::read_to_string(path).is_ok_and(|s| s.contains(needle)) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    #[tokio::test]
    async fn test_instance_runs_a_guest_and_shuts_it_down() {
        let Some((qemu, g)) = guest() else { return };
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("vm");
        let inst = Instance::start(&qemu, &spec(&g, &run), Duration::from_secs(30))
            .await
            .unwrap();
        assert!(inst.alive());
        assert_eq!(inst.qmp.query_status().await.unwrap(), RunState::Running);
        // The guest's agent reports on the serial console, which is logged.
        assert!(
            wait_for_log(
                &inst.paths.serial_log,
                "csvd-agent boot=",
                Duration::from_secs(60)
            )
            .await,
            "no agent line in the serial log"
        );
        // A second instance from the same run directory is refused.
        let err = Instance::start(&qemu, &spec(&g, &run), Duration::from_secs(30))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ProcessError::AlreadyRunning(pid, _) if pid == inst.pid),
            "{err}"
        );
        // The guest powers off when asked (its agent watches the power button).
        assert_eq!(inst.shutdown(Duration::from_secs(30)).await, Stopped::Guest);
        assert!(!inst.alive());
        assert_eq!(
            inst.shutdown(Duration::from_secs(1)).await,
            Stopped::NotRunning
        );
    }

    #[tokio::test]
    async fn test_shutdown_during_boot_still_powers_the_guest_off() {
        let Some((qemu, g)) = guest() else { return };
        let tmp = tempfile::tempdir().unwrap();
        let inst = Instance::start(
            &qemu,
            &spec(&g, &tmp.path().join("vm")),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        // The first press comes before the guest listens for it; a later one powers it off.
        assert_eq!(inst.shutdown(Duration::from_secs(60)).await, Stopped::Guest);
        let log = std::fs::read_to_string(&inst.paths.serial_log).unwrap();
        assert!(log.contains("power button: powering off"), "{log}");
    }

    #[tokio::test]
    async fn test_instance_is_adopted_after_its_starter_is_gone() {
        let Some((qemu, g)) = guest() else { return };
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("vm");
        assert!(
            Instance::adopt(&run, Duration::from_secs(1))
                .await
                .unwrap()
                .is_none()
        );
        let first = Instance::start(&qemu, &spec(&g, &run), Duration::from_secs(30))
            .await
            .unwrap();
        let pid = first.pid;
        // The daemon goes away: its QMP connection closes, QEMU keeps running.
        drop(first);
        let adopted = Instance::adopt(&run, Duration::from_secs(10))
            .await
            .unwrap()
            .expect("the running QEMU is found");
        assert_eq!(adopted.pid, pid);
        assert_eq!(adopted.qmp.query_status().await.unwrap(), RunState::Running);
        adopted.kill().await;
        assert!(!adopted.alive());
        assert!(
            Instance::adopt(&run, Duration::from_secs(1))
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn test_instance_start_failure_says_why() {
        let Some((qemu, g)) = guest() else { return };
        let tmp = tempfile::tempdir().unwrap();
        let mut s = spec(&g, &tmp.path().join("vm"));
        s.boot = Boot::Kernel {
            kernel: tmp.path().join("no-such-kernel"),
            initrd: None,
            append: String::new(),
        };
        let err = Instance::start(&qemu, &s, Duration::from_secs(30))
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, ProcessError::Refused(_)), "{text}");
        assert!(text.contains("no-such-kernel"), "{text}");
    }
}
