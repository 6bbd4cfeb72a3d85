//! Which accelerator a node's guests run on, and whether its QEMU is new enough.
//!
//! `/dev/kvm` existing proves little: on a nested hypervisor it can open, accept a VM and
//! run real-mode code, yet hang every Linux kernel before its first message. So the probe
//! boots a real kernel under KVM and accepts KVM only when that kernel gets as far as
//! trying to mount its root file system (it then panics on purpose, which ends QEMU at
//! once). With no kernel to boot, it falls back to a boot-sector guest, which proves that
//! QEMU can run code under KVM at all.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;

use crate::qmp::QemuVersion;

/// The oldest QEMU csvd runs guests on. Older versions corrupt busy guests' memory during
/// TCG migrations now and then (7.2 did in about 1 of 20).
pub const MIN_QEMU: QemuVersion = QemuVersion {
    major: 10,
    minor: 0,
    micro: 0,
};

/// How guests execute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization through /dev/kvm.
    Kvm,
    /// QEMU's binary translator: slower, runs anywhere.
    Tcg,
}

impl Accel {
    /// The name QEMU's `-accel` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a node asks for in its configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    /// Probe: KVM when a guest really runs under it, TCG otherwise.
    #[default]
    Auto,
    /// KVM without probing (the operator knows it works).
    Kvm,
    /// TCG always.
    Tcg,
}

impl std::str::FromStr for AccelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Kvm),
            "tcg" => Ok(AccelChoice::Tcg),
            other => Err(format!(
                "`{other}` is not an accelerator (auto, kvm or tcg)"
            )),
        }
    }
}

/// The accelerator chosen and why, for logs and `node list`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AccelDecision {
    pub accel: Accel,
    pub reason: String,
}

/// Reads QEMU's version from `qemu -version` ("QEMU emulator version 10.0.2 (...)").
pub async fn qemu_version(qemu: &Path) -> Result<QemuVersion, String> {
    let out = tokio::process::Command::new(qemu)
        .arg("-version")
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot run {}: {e}", qemu.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_version(&text).ok_or_else(|| {
        format!(
            "{} -version printed no version: {}",
            qemu.display(),
            text.lines().next().unwrap_or("")
        )
    })
}

/// The version in the first line of `qemu -version`'s output.
pub fn parse_version(text: &str) -> Option<QemuVersion> {
    let line = text.lines().next()?;
    let at = line.find("version ")? + "version ".len();
    let word = line[at..].split_whitespace().next()?;
    let mut parts = word.split('.').map(|p| {
        p.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse::<u32>()
    });
    let major = parts.next()?.ok()?;
    let minor = parts.next().and_then(Result::ok).unwrap_or(0);
    let micro = parts.next().and_then(Result::ok).unwrap_or(0);
    Some(QemuVersion {
        major,
        minor,
        micro,
    })
}

/// Refuses a QEMU older than [`MIN_QEMU`], with the reason.
pub fn check_version(found: QemuVersion) -> Result<(), String> {
    if found < MIN_QEMU {
        return Err(format!(
            "QEMU {found} is too old: csvd needs {MIN_QEMU} or newer (on Debian 12: \
             apt-get install -t bookworm-backports qemu-system-x86)"
        ));
    }
    Ok(())
}

/// The kernel the probe boots: `configured`, else the running kernel's image in /boot.
pub fn probe_kernel(configured: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = configured {
        return Some(p.to_path_buf());
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let image = PathBuf::from(format!("/boot/vmlinuz-{}", release.trim()));
    image.is_file().then_some(image)
}

/// Decides the accelerator for `choice` (see the module documentation for the probe).
pub async fn decide(
    qemu: &Path,
    choice: AccelChoice,
    kernel: Option<&Path>,
    timeout: Duration,
) -> AccelDecision {
    let decision = |accel, reason: String| AccelDecision { accel, reason };
    match choice {
        AccelChoice::Tcg => return decision(Accel::Tcg, "configured".into()),
        AccelChoice::Kvm => return decision(Accel::Kvm, "configured".into()),
        AccelChoice::Auto => {}
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return decision(Accel::Tcg, format!("/dev/kvm is not usable: {e}"));
    }
    let outcome = match kernel {
        Some(k) => boot_kernel(qemu, Accel::Kvm, k, timeout).await,
        None => boot_sector(qemu, Accel::Kvm, timeout).await,
    };
    let how = match kernel {
        Some(k) => format!("a probe guest ({}) under KVM", k.display()),
        None => "a boot-sector guest under KVM (no kernel to probe with)".to_string(),
    };
    match outcome {
        Ok(()) => decision(Accel::Kvm, format!("{how} ran")),
        Err(e) => decision(Accel::Tcg, format!("{how} failed: {e}")),
    }
}

/// A short-lived QEMU that must not outlive this process even if it is killed: started
/// through util-linux's `setpriv --pdeathsig KILL` where it is installed.
fn helper_qemu(qemu: &Path) -> tokio::process::Command {
    let setpriv = Path::new("/usr/bin/setpriv");
    if setpriv.is_file() {
        let mut cmd = tokio::process::Command::new(setpriv);
        cmd.args(["--pdeathsig", "KILL", "--"]).arg(qemu);
        cmd
    } else {
        tokio::process::Command::new(qemu)
    }
}

/// The probe's QEMU: a small machine that ends on a panic or the debug-exit port.
fn probe_command(qemu: &Path, accel: Accel) -> tokio::process::Command {
    let mut cmd = helper_qemu(qemu);
    let cpu = match accel {
        Accel::Kvm => "host",
        Accel::Tcg => "max",
    };
    cmd.args([
        "-accel",
        accel.as_str(),
        "-cpu",
        cpu,
        "-m",
        "128",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    cmd
}

/// Boots `kernel` with no root file system: success when it reaches the mount of its root.
async fn boot_kernel(
    qemu: &Path,
    accel: Accel,
    kernel: &Path,
    timeout: Duration,
) -> Result<(), String> {
    let mut cmd = probe_command(qemu, accel);
    cmd.arg("-kernel").arg(kernel).args([
        "-append",
        "console=ttyS0 panic=-1 root=/dev/csvd-probe loglevel=4",
    ]);
    let run = run_probe(cmd, timeout).await?;
    if run.stdout.contains("Unable to mount root") || run.stdout.contains("Kernel panic") {
        Ok(())
    } else {
        Err(first_line_or(&run.stderr, "the kernel did not boot"))
    }
}

/// Boots a 512-byte boot sector that writes 0x42 to the isa-debug-exit port: QEMU then
/// exits with status (0x42 << 1) | 1.
async fn boot_sector(qemu: &Path, accel: Accel, timeout: Duration) -> Result<(), String> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("csvd-kvm-probe-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let image = dir.join("probe.img");
    // mov al, 0x42; out 0xf4, al; hlt; jmp $-1
    let mut sector = vec![0xB0, 0x42, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD];
    sector.resize(510, 0);
    sector.extend_from_slice(&[0x55, 0xAA]);
    std::fs::write(&image, &sector).map_err(|e| e.to_string())?;
    let mut cmd = probe_command(qemu, accel);
    cmd.args([
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-drive",
    ])
    .arg(format!("file={},format=raw,if=floppy", image.display()));
    let result = run_probe(cmd, timeout).await;
    let _ = std::fs::remove_dir_all(&dir);
    let run = result?;
    match run.status {
        Some(133) => Ok(()),
        code => Err(first_line_or(
            &run.stderr,
            &format!("QEMU ended with {code:?}, not the probe's 133"),
        )),
    }
}

/// The named CPU models QEMU can run guests with under `accel` on this host: those it
/// calls migration-safe and reports nothing unavailable for (QMP `query-cpu-definitions`).
pub async fn runnable_cpu_models(qemu: &Path, accel: Accel) -> Result<Vec<String>, String> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("csvd-cpu-models-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let sock = dir.join("qmp.sock");
    let result = async {
        let _child = helper_qemu(qemu)
            .args([
                "-machine",
                "none",
                "-accel",
                accel.as_str(),
                "-nodefaults",
                "-display",
                "none",
                "-qmp",
            ])
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", qemu.display()))?;
        let qmp = crate::qmp::Qmp::connect_retry(&sock, Duration::from_secs(20))
            .await
            .map_err(|e| e.to_string())?;
        let defs = qmp
            .execute("query-cpu-definitions", None)
            .await
            .map_err(|e| e.to_string())?;
        let _ = qmp.quit().await;
        Ok(cpu_models_from(&defs))
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The runnable, migration-safe model names in a `query-cpu-definitions` answer.
pub fn cpu_models_from(defs: &serde_json::Value) -> Vec<String> {
    let mut out: Vec<String> = defs
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|d| d.get("migration-safe").and_then(|m| m.as_bool()) == Some(true))
                .filter(|d| {
                    d.get("unavailable-features")
                        .and_then(|u| u.as_array())
                        .is_some_and(|u| u.is_empty())
                })
                .filter_map(|d| d.get("name").and_then(|n| n.as_str()).map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out.dedup();
    out
}

/// What a probe's QEMU left behind.
struct ProbeRun {
    status: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs a probe to its end, or kills it after `timeout`.
async fn run_probe(
    mut cmd: tokio::process::Command,
    timeout: Duration,
) -> Result<ProbeRun, String> {
    let mut child = cmd.spawn().map_err(|e| format!("cannot start QEMU: {e}"))?;
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let run = async {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let read_out = async {
            if let Some(s) = stdout.as_mut() {
                let _ = s.read_to_end(&mut out).await;
            }
        };
        let read_err = async {
            if let Some(s) = stderr.as_mut() {
                let _ = s.read_to_end(&mut err).await;
            }
        };
        tokio::join!(read_out, read_err);
        let status = child.wait().await.ok().and_then(|s| s.code());
        (status, out, err)
    };
    match tokio::time::timeout(timeout, run).await {
        Ok((status, out, err)) => Ok(ProbeRun {
            status,
            stdout: String::from_utf8_lossy(&out).into_owned(),
            stderr: String::from_utf8_lossy(&err).into_owned(),
        }),
        Err(_) => Err(format!("no result within {} s", timeout.as_secs())),
    }
}

fn first_line_or(text: &str, fallback: &str) -> String {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or(fallback)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(major: u32, minor: u32, micro: u32) -> QemuVersion {
        QemuVersion {
            major,
            minor,
            micro,
        }
    }

    #[test]
    fn test_parse_version() {
        let debian = "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\n\
                      Copyright (c) 2003-2025 Fabrice Bellard and the QEMU Project developers\n";
        assert_eq!(parse_version(debian), Some(v(10, 0, 2)));
        assert_eq!(
            parse_version("QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)"),
            Some(v(7, 2, 19))
        );
        assert_eq!(
            parse_version("QEMU emulator version 9.2.50"),
            Some(v(9, 2, 50))
        );
        assert_eq!(parse_version("QEMU emulator version 11"), Some(v(11, 0, 0)));
        assert_eq!(parse_version("qemu: unknown option"), None);
        assert_eq!(parse_version(""), None);
        assert_eq!(parse_version("QEMU emulator version x.y"), None);
    }

    #[test]
    fn test_check_version() {
        assert!(check_version(v(10, 0, 0)).is_ok());
        assert!(check_version(v(10, 1, 3)).is_ok());
        let err = check_version(v(7, 2, 19)).unwrap_err();
        assert!(err.contains("QEMU 7.2.19 is too old"), "{err}");
        assert!(err.contains("bookworm-backports"), "{err}");
        assert!(check_version(v(9, 99, 99)).is_err());
    }

    #[test]
    fn test_accel_choice_parse() {
        assert_eq!("auto".parse(), Ok(AccelChoice::Auto));
        assert_eq!("kvm".parse(), Ok(AccelChoice::Kvm));
        assert_eq!("tcg".parse(), Ok(AccelChoice::Tcg));
        let err = "hvf".parse::<AccelChoice>().unwrap_err();
        assert!(err.contains("`hvf` is not an accelerator"), "{err}");
    }

    #[tokio::test]
    async fn test_decide_configured_choices_skip_the_probe() {
        let missing = Path::new("/nonexistent/qemu");
        let d = decide(missing, AccelChoice::Tcg, None, Duration::from_secs(1)).await;
        assert_eq!(d.accel, Accel::Tcg);
        let d = decide(missing, AccelChoice::Kvm, None, Duration::from_secs(1)).await;
        assert_eq!(d.accel, Accel::Kvm);
    }

    fn qemu() -> Option<PathBuf> {
        let found = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("qemu-system-x86_64"))
                .find(|p| p.is_file())
        });
        if found.is_none() {
            println!("skipping: qemu-system-x86_64 not found");
        }
        found
    }

    #[test]
    fn test_cpu_models_from() {
        let defs = serde_json::json!([
            { "name": "max", "unavailable-features": [], "migration-safe": false },
            { "name": "Westmere", "unavailable-features": [], "migration-safe": true },
            { "name": "Skylake-Server", "unavailable-features": ["avx512f"], "migration-safe": true },
            { "name": "Nehalem", "unavailable-features": [], "migration-safe": true },
            { "name": "odd" },
        ]);
        assert_eq!(cpu_models_from(&defs), ["Nehalem", "Westmere"]);
        assert!(cpu_models_from(&serde_json::json!({})).is_empty());
    }

    #[tokio::test]
    async fn test_runnable_cpu_models_under_tcg() {
        let Some(q) = qemu() else { return };
        let models = runnable_cpu_models(&q, Accel::Tcg).await.unwrap();
        // TCG emulates the generic models and older named ones everywhere.
        assert!(models.iter().any(|m| m == "qemu64"), "{models:?}");
        assert!(
            !models.iter().any(|m| m == "max"),
            "max is not migration-safe"
        );
    }

    #[tokio::test]
    async fn test_installed_qemu_is_supported() {
        let Some(q) = qemu() else { return };
        let found = qemu_version(&q).await.unwrap();
        check_version(found).unwrap();
    }

    #[tokio::test]
    async fn test_boot_sector_probe_recognises_a_running_guest() {
        let Some(q) = qemu() else { return };
        // Under TCG the probe must succeed: this checks the probe guest and the exit code.
        boot_sector(&q, Accel::Tcg, Duration::from_secs(20))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn test_kernel_probe_recognises_a_booting_kernel() {
        let Some(q) = qemu() else { return };
        let dir = std::env::var_os("CSVD_GUEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp/csvd-guest"));
        let kernel = dir.join("vmlinuz");
        if !kernel.is_file() {
            println!(
                "skipping: no guest kernel at {} (scripts/build-guest)",
                kernel.display()
            );
            return;
        }
        boot_kernel(&q, Accel::Tcg, &kernel, Duration::from_secs(60))
            .await
            .unwrap();
        // Something that is not a kernel never counts as a boot.
        let not_kernel = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(not_kernel.path(), b"not a kernel").unwrap();
        let err = boot_kernel(&q, Accel::Tcg, not_kernel.path(), Duration::from_secs(20))
            .await
            .unwrap_err();
        assert!(!err.is_empty());
    }
}
