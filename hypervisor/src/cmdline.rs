//! QEMU command lines: what one guest instance needs, in; QEMU's arguments, out. Pure, so
//! every rule is tested without starting QEMU.
//!
//! An instance gets:
//! - its disks from iSCSI LUNs through QEMU's own initiator (`iscsi://portal/target/lun`)
//!   with `cache=none` and the node's initiator name, so the target sees which node writes;
//! - a QMP socket, and a serial console that is both logged to a file and reachable on a
//!   socket for `vm console`;
//! - NICs on tap devices that the caller has put on the virtual switch (a Linux bridge);
//! - for a migration's destination, `-incoming defer` and `-S`: QEMU waits for
//!   `migrate-incoming`, so migration parameters can be set first, and stays paused once the
//!   state has arrived, until the switchover is committed and it is told to continue.
//!
//! The source and the destination of a migration must present the same devices in the same
//! order with the same ids; building both from one [`LaunchSpec`] guarantees it.

use std::path::{Path, PathBuf};

use crate::accel::Accel;

/// One guest instance on one node.
#[derive(Clone, Debug, PartialEq)]
pub struct LaunchSpec {
    /// The VM's name (shown by QEMU and in process lists).
    pub name: String,
    /// The VM's UUID (the guest's SMBIOS UUID).
    pub uuid: String,
    pub accel: Accel,
    /// QEMU's `-cpu` value (a resolved model: `host`, `max`, `Skylake-Server`, ...).
    pub cpu: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disks: Vec<DiskAttach>,
    pub nics: Vec<NicAttach>,
    pub boot: Boot,
    /// Where the instance keeps its sockets, log and pid file.
    pub run_dir: PathBuf,
    /// Start paused, waiting for an incoming migration.
    pub incoming: bool,
}

/// A LUN attached as a virtio disk.
#[derive(Clone, Debug, PartialEq)]
pub struct DiskAttach {
    /// `iscsi://host:port/target-iqn/lun`.
    pub url: String,
    /// The initiator name QEMU logs in with (one per node: two QEMUs with the default name
    /// would look like one initiator to the target).
    pub initiator_name: String,
    /// CHAP user and the file holding the secret, when the portal requires CHAP.
    pub chap: Option<(String, PathBuf)>,
}

/// A NIC on a tap device, which the caller creates and attaches to the virtual switch's
/// bridge before QEMU starts.
#[derive(Clone, Debug, PartialEq)]
pub struct NicAttach {
    pub tap: String,
    pub mac: String,
    /// The bridge (virtual switch) the tap belongs on.
    pub bridge: String,
}

/// How the guest boots.
#[derive(Clone, Debug, PartialEq)]
pub enum Boot {
    /// Directly into a kernel.
    Kernel {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        append: String,
    },
    /// From its first disk.
    Disk,
}

/// The files of an instance's run directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunPaths {
    pub qmp: PathBuf,
    pub console: PathBuf,
    pub serial_log: PathBuf,
    pub pidfile: PathBuf,
}

impl RunPaths {
    pub fn new(run_dir: &Path) -> Self {
        RunPaths {
            qmp: run_dir.join("qmp.sock"),
            console: run_dir.join("console.sock"),
            serial_log: run_dir.join("serial.log"),
            pidfile: run_dir.join("qemu.pid"),
        }
    }
}

/// Doubles commas, QEMU's escape inside an option value.
fn esc(value: &str) -> String {
    value.replace(',', ",,")
}

fn esc_path(p: &Path) -> String {
    esc(&p.to_string_lossy())
}

/// QEMU's arguments (without the program) for `spec`, daemonizing into the background
/// with a pid file, so the guest outlives a restart of the daemon that started it.
pub fn qemu_args(spec: &LaunchSpec) -> Vec<String> {
    let paths = RunPaths::new(&spec.run_dir);
    let mut a: Vec<String> = Vec::new();
    let mut push = |parts: &[&str]| a.extend(parts.iter().map(|s| s.to_string()));
    push(&[
        "-name",
        &format!("guest={},debug-threads=on", esc(&spec.name)),
    ]);
    push(&["-uuid", &spec.uuid]);
    push(&["-machine", "q35"]);
    push(&["-accel", spec.accel.as_str()]);
    push(&["-cpu", &spec.cpu]);
    push(&["-smp", &spec.vcpus.to_string()]);
    push(&["-m", &format!("{}M", spec.memory_mib)]);
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    push(&["-daemonize", "-pidfile", &paths.pidfile.to_string_lossy()]);
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", esc_path(&paths.qmp)),
    ]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=serial0,path={},server=on,wait=off,logfile={},logappend=on",
            esc_path(&paths.console),
            esc_path(&paths.serial_log)
        ),
        "-serial",
        "chardev:serial0",
    ]);
    for (i, d) in spec.disks.iter().enumerate() {
        let mut drive = format!(
            "file={},if=none,id=disk{i},format=raw,cache=none,file.initiator-name={}",
            esc(&d.url),
            esc(&d.initiator_name)
        );
        if let Some((user, secret_file)) = &d.chap {
            push(&[
                "-object",
                &format!("secret,id=chap{i},file={}", esc_path(secret_file)),
            ]);
            drive.push_str(&format!(
                ",file.user={},file.password-secret=chap{i}",
                esc(user)
            ));
        }
        push(&["-drive", &drive]);
        let mut device = format!("virtio-blk-pci,drive=disk{i},id=vd{i}");
        if matches!(spec.boot, Boot::Disk) {
            device.push_str(&format!(",bootindex={i}"));
        }
        push(&["-device", &device]);
    }
    for (i, n) in spec.nics.iter().enumerate() {
        push(&[
            "-netdev",
            &format!(
                "tap,id=net{i},ifname={},script=no,downscript=no",
                esc(&n.tap)
            ),
            "-device",
            // No option ROM: guests boot from disks or kernels, never from the network.
            &format!(
                "virtio-net-pci,netdev=net{i},id=nic{i},mac={},romfile=",
                esc(&n.mac)
            ),
        ]);
    }
    if let Boot::Kernel {
        kernel,
        initrd,
        append,
    } = &spec.boot
    {
        push(&["-kernel", &kernel.to_string_lossy()]);
        if let Some(i) = initrd {
            push(&["-initrd", &i.to_string_lossy()]);
        }
        push(&["-append", append]);
    }
    if spec.incoming {
        push(&["-S", "-incoming", "defer"]);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> LaunchSpec {
        LaunchSpec {
            name: "web,1".into(),
            uuid: "5e1f3b0c-8b8a-4c8e-9d57-2b0c4a3f9e10".into(),
            accel: Accel::Tcg,
            cpu: "max".into(),
            vcpus: 2,
            memory_mib: 256,
            disks: vec![DiskAttach {
                url: "iscsi://127.0.0.1:3260/iqn.2025-11.org.csvd:abc/1".into(),
                initiator_name: "iqn.2025-11.org.csvd:node-1".into(),
                chap: None,
            }],
            nics: vec![NicAttach {
                tap: "c1tap0".into(),
                mac: "52:54:00:12:34:56".into(),
                bridge: "lan".into(),
            }],
            boot: Boot::Kernel {
                kernel: "/k/vmlinuz".into(),
                initrd: Some("/k/initrd.img".into()),
                append: "console=ttyS0 csvd.period_ms=100".into(),
            },
            run_dir: "/run/csvd/vm/web".into(),
            incoming: false,
        }
    }

    /// The value following `flag`, for each occurrence.
    fn values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn test_qemu_args_core() {
        let a = qemu_args(&spec());
        assert_eq!(values(&a, "-name"), ["guest=web,,1,debug-threads=on"]);
        assert_eq!(values(&a, "-accel"), ["tcg"]);
        assert_eq!(values(&a, "-cpu"), ["max"]);
        assert_eq!(values(&a, "-smp"), ["2"]);
        assert_eq!(values(&a, "-m"), ["256M"]);
        assert_eq!(values(&a, "-pidfile"), ["/run/csvd/vm/web/qemu.pid"]);
        assert!(a.contains(&"-daemonize".to_string()));
        assert!(a.contains(&"-nodefaults".to_string()));
        assert_eq!(
            values(&a, "-qmp"),
            ["unix:/run/csvd/vm/web/qmp.sock,server=on,wait=off"]
        );
        assert_eq!(
            values(&a, "-chardev"),
            [
                "socket,id=serial0,path=/run/csvd/vm/web/console.sock,server=on,wait=off,\
              logfile=/run/csvd/vm/web/serial.log,logappend=on"
            ]
        );
        assert_eq!(values(&a, "-serial"), ["chardev:serial0"]);
        assert!(values(&a, "-incoming").is_empty());
    }

    #[test]
    fn test_qemu_args_disks_and_nics() {
        let a = qemu_args(&spec());
        assert_eq!(
            values(&a, "-drive"),
            [
                "file=iscsi://127.0.0.1:3260/iqn.2025-11.org.csvd:abc/1,if=none,id=disk0,\
              format=raw,cache=none,file.initiator-name=iqn.2025-11.org.csvd:node-1"
            ]
        );
        assert_eq!(
            values(&a, "-device"),
            [
                "virtio-blk-pci,drive=disk0,id=vd0",
                "virtio-net-pci,netdev=net0,id=nic0,mac=52:54:00:12:34:56,romfile="
            ]
        );
        assert_eq!(
            values(&a, "-netdev"),
            ["tap,id=net0,ifname=c1tap0,script=no,downscript=no"]
        );
        assert!(values(&a, "-object").is_empty());
    }

    #[test]
    fn test_qemu_args_kernel_boot() {
        let a = qemu_args(&spec());
        assert_eq!(values(&a, "-kernel"), ["/k/vmlinuz"]);
        assert_eq!(values(&a, "-initrd"), ["/k/initrd.img"]);
        // The kernel command line is one argument, passed as is.
        assert_eq!(values(&a, "-append"), ["console=ttyS0 csvd.period_ms=100"]);
    }

    #[test]
    fn test_qemu_args_disk_boot_sets_boot_order() {
        let mut s = spec();
        s.boot = Boot::Disk;
        s.disks.push(DiskAttach {
            url: "iscsi://127.0.0.1:3260/iqn.2025-11.org.csvd:abc/2".into(),
            initiator_name: "iqn.2025-11.org.csvd:node-1".into(),
            chap: None,
        });
        let a = qemu_args(&s);
        assert!(values(&a, "-kernel").is_empty());
        assert!(values(&a, "-append").is_empty());
        let devices = values(&a, "-device");
        assert_eq!(devices[0], "virtio-blk-pci,drive=disk0,id=vd0,bootindex=0");
        assert_eq!(devices[1], "virtio-blk-pci,drive=disk1,id=vd1,bootindex=1");
    }

    #[test]
    fn test_qemu_args_chap_uses_a_secret_object() {
        let mut s = spec();
        s.disks[0].chap = Some(("node1".into(), "/run/csvd/chap,secret".into()));
        let a = qemu_args(&s);
        assert_eq!(
            values(&a, "-object"),
            ["secret,id=chap0,file=/run/csvd/chap,,secret"]
        );
        assert!(values(&a, "-drive")[0].ends_with(",file.user=node1,file.password-secret=chap0"));
        // The secret itself never appears on the command line.
        assert!(!a.iter().any(|x| x.contains("password=")));
    }

    #[test]
    fn test_qemu_args_incoming_waits_for_the_migration() {
        let mut s = spec();
        s.incoming = true;
        let a = qemu_args(&s);
        assert_eq!(values(&a, "-incoming"), ["defer"]);
        assert!(a.contains(&"-S".to_string()), "stays paused after the copy");
    }

    #[test]
    fn test_source_and_destination_present_the_same_devices() {
        let src = spec();
        let mut dst = spec();
        dst.incoming = true;
        dst.run_dir = "/run/csvd-node2/vm/web".into();
        dst.disks[0].url = "iscsi://127.0.0.1:3262/iqn.2025-11.org.csvd:abc/1".into();
        let ids = |a: &[String]| -> Vec<String> {
            values(a, "-device")
                .iter()
                .map(|d| {
                    d.split(',')
                        .find(|p| p.starts_with("id="))
                        .unwrap()
                        .to_string()
                })
                .collect()
        };
        assert_eq!(ids(&qemu_args(&src)), ids(&qemu_args(&dst)));
    }
}
