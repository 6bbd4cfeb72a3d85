//! Starting a guest's QEMU the way it must be started, with `posix_spawn` (see
//! [`run_as_guest`]).

use std::ffi::{CString, OsStr, OsString};
use std::io::{self, Read};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Output};

/// Runs `program` with `args` (QEMU with `-daemonize`, which returns once the guest is set
/// up) to its end and returns its exit status and what it wrote to stderr. The program
/// starts the way a guest's QEMU must:
/// - **At the default niceness (0)**, whatever its daemon's, which runs above its guests.
///   Niceness is per thread on Linux and a child takes its spawning thread's, so the spawn
///   happens in a thread of its own that first lowers itself to 0 (no privilege needed). A
///   daemon started below normal priority starts its guests there too.
/// - **In a session of its own.** Where the kernel shares the CPU out by session first
///   (`autogroup`, on in Debian's kernels), QEMU's start-up before it daemonizes (loading its
///   libraries is a good part of it) would otherwise share the daemon's portion, and lose it
///   to the daemon's threads at their niceness. It also keeps a terminal's Ctrl-C, meant for
///   a daemon run in the foreground, away from a QEMU still starting.
/// - **With `posix_spawn`** (vfork and exec), never `fork`. A fork copies the daemon's page
///   tables and leaves all of its memory copy-on-write, so its threads then fault on each
///   page they write. Under nested virtualization both cost a lot: a fork and exec from a
///   50 MiB process took 3.2 ms against 0.6 ms. The standard library cannot give a spawned
///   process a session of its own without forking, so this calls `posix_spawnp` itself.
///
/// Standard input and output are `/dev/null`; the environment is the daemon's.
pub async fn run_as_guest(program: &OsStr, args: Vec<OsString>) -> io::Result<Output> {
    let program = program.to_owned();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("qemu-spawn".into())
        .spawn(move || {
            let _ = tx.send(at_default_niceness().and_then(|()| spawn_wait(&program, &args)));
        })?;
    rx.await
        .unwrap_or_else(|_| Err(io::Error::other("the thread spawning QEMU ended")))
}

/// Sets the calling thread's niceness (on Linux, niceness is per thread, and threads it
/// starts afterwards inherit it). Raising priority (a negative value) needs privilege.
#[allow(unsafe_code)]
pub fn set_thread_niceness(nice: i32) -> io::Result<()> {
    // SAFETY: setpriority changes only the calling thread's scheduling (PRIO_PROCESS with 0
    // is the calling thread on Linux).
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Lowers the calling thread to niceness 0 if it runs above that (always allowed); a thread
/// at 0 or below priority stays as it is.
#[allow(unsafe_code)]
fn at_default_niceness() -> io::Result<()> {
    // SAFETY: getpriority only reads the calling thread's scheduling.
    if unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) } < 0 {
        set_thread_niceness(0)?;
    }
    Ok(())
}

fn c_string(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "a NUL byte in a command-line argument or environment variable",
        )
    })
}

/// Pointers to `strings` followed by the null pointer that ends an `argv` or `envp`.
fn pointers(strings: &[CString]) -> Vec<*mut libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr().cast_mut())
        .chain(std::iter::once(std::ptr::null_mut()))
        .collect()
}

/// The spawn attributes and file actions of one `posix_spawnp`, destroyed when dropped.
struct SpawnSetup {
    attr: libc::posix_spawnattr_t,
    actions: libc::posix_spawn_file_actions_t,
}

impl Drop for SpawnSetup {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: both were initialized by `SpawnSetup::new` and are destroyed once, here.
        unsafe {
            libc::posix_spawnattr_destroy(&mut self.attr);
            libc::posix_spawn_file_actions_destroy(&mut self.actions);
        }
    }
}

/// `Err` from a `posix_spawn*` return code (they return the error, not -1).
fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

impl SpawnSetup {
    /// A new session, no blocked signals and SIGPIPE at its default (the daemon, like any
    /// Rust program, ignores it); stdin and stdout on `/dev/null`, stderr onto `stderr_fd`.
    #[allow(unsafe_code)]
    fn new(stderr_fd: libc::c_int) -> io::Result<Box<Self>> {
        // SAFETY: the structures are plain C data that the init functions fill in; they
        // are boxed so that they do not move after init, and destroyed by Drop only after
        // both inits succeeded (a failed init returns before the Box exists).
        unsafe {
            let mut attr: libc::posix_spawnattr_t = std::mem::zeroed();
            check(libc::posix_spawnattr_init(&mut attr))?;
            let mut actions: libc::posix_spawn_file_actions_t = std::mem::zeroed();
            if let Err(e) = check(libc::posix_spawn_file_actions_init(&mut actions)) {
                libc::posix_spawnattr_destroy(&mut attr);
                return Err(e);
            }
            let mut s = Box::new(SpawnSetup { attr, actions });
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            let mut default: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut default);
            libc::sigaddset(&mut default, libc::SIGPIPE);
            check(libc::posix_spawnattr_setsigmask(&mut s.attr, &none))?;
            check(libc::posix_spawnattr_setsigdefault(&mut s.attr, &default))?;
            // The flags are small constants, typed c_int or c_short depending on the constant.
            let flags = libc::POSIX_SPAWN_SETSID as libc::c_int
                | libc::POSIX_SPAWN_SETSIGMASK
                | libc::POSIX_SPAWN_SETSIGDEF;
            check(libc::posix_spawnattr_setflags(
                &mut s.attr,
                flags as libc::c_short,
            ))?;
            let null = c"/dev/null";
            check(libc::posix_spawn_file_actions_addopen(
                &mut s.actions,
                0,
                null.as_ptr(),
                libc::O_RDONLY,
                0,
            ))?;
            check(libc::posix_spawn_file_actions_addopen(
                &mut s.actions,
                1,
                null.as_ptr(),
                libc::O_WRONLY,
                0,
            ))?;
            check(libc::posix_spawn_file_actions_adddup2(
                &mut s.actions,
                stderr_fd,
                2,
            ))?;
            Ok(s)
        }
    }
}

/// Spawns `program` (looked up in `PATH` if it has no slash) and waits for its end,
/// collecting its stderr.
#[allow(unsafe_code)]
fn spawn_wait(program: &OsStr, args: &[OsString]) -> io::Result<Output> {
    let mut argv = vec![c_string(program.as_bytes())?];
    for a in args {
        argv.push(c_string(a.as_bytes())?);
    }
    let env = std::env::vars_os()
        .map(|(k, v)| c_string(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
        .collect::<io::Result<Vec<_>>>()?;
    let (argv_p, env_p) = (pointers(&argv), pointers(&env));
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills in two new descriptors, owned from here on by `read` and `write`.
    let (mut read, write) = unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return Err(io::Error::last_os_error());
        }
        (
            std::fs::File::from_raw_fd(fds[0]),
            OwnedFd::from_raw_fd(fds[1]),
        )
    };
    // Both ends are close-on-exec: the child keeps only the copy made on its fd 2.
    let setup = SpawnSetup::new(fds[1])?;
    let mut pid: libc::pid_t = 0;
    // SAFETY: every pointer is to a live, NUL-terminated string or array ended by a null
    // pointer (`argv`, `env` and `setup` outlive the call); posix_spawnp only reads them.
    check(unsafe {
        libc::posix_spawnp(
            &mut pid,
            argv[0].as_ptr(),
            &setup.actions,
            &setup.attr,
            argv_p.as_ptr(),
            env_p.as_ptr(),
        )
    })?;
    drop(write);
    let mut stderr = Vec::new();
    let read_result = read.read_to_end(&mut stderr);
    let mut status = 0;
    loop {
        // SAFETY: waits for the child spawned above, which nothing else reaps.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    read_result?;
    Ok(Output {
        status: ExitStatus::from_raw(status),
        stdout: Vec::new(),
        stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a child gets: a session of its own, niceness 0 even when the thread that asks
    /// runs above that (as the daemon's threads do), SIGPIPE at its default, `/dev/null`
    /// for input, and its stderr collected.
    #[tokio::test]
    async fn test_a_guest_starts_in_a_session_of_its_own_at_niceness_zero() {
        // Ask from a thread of niceness -5, so that the reset is seen. Niceness is per
        // thread on Linux, and this thread is the test's own.
        #[allow(unsafe_code)]
        // SAFETY: setpriority on the calling thread only changes its scheduling.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, -5) } != 0 {
            println!("skipping: no privilege to raise a thread's priority (run as root)");
            return;
        }
        let script = "cat /proc/$$/stat >&2; grep SigIgn /proc/$$/status >&2; \
                      read x && echo read >&2; exit 3";
        let out = run_as_guest(OsStr::new("sh"), vec!["-c".into(), script.into()])
            .await
            .expect("sh runs");
        #[allow(unsafe_code)]
        // SAFETY: as above.
        unsafe {
            libc::setpriority(libc::PRIO_PROCESS, 0, 0)
        };
        assert_eq!(out.status.code(), Some(3), "its exit status");
        let text = String::from_utf8(out.stderr).unwrap();
        let stat = text.lines().next().unwrap();
        // The fields after the command name (which may hold spaces) in its parentheses.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        let pid: i32 = stat.split_whitespace().next().unwrap().parse().unwrap();
        assert_eq!(
            fields[3].parse::<i32>().unwrap(),
            pid,
            "session leader: {stat}"
        );
        assert_eq!(fields[16], "0", "niceness 0: {stat}");
        // SIGPIPE is signal 13: bit 12 of the ignored set.
        let ignored = text.lines().nth(1).unwrap();
        let mask = u64::from_str_radix(ignored.split_whitespace().nth(1).unwrap(), 16).unwrap();
        assert_eq!(mask & (1 << 12), 0, "SIGPIPE not ignored: {ignored}");
        assert!(!text.contains("read"), "stdin is /dev/null: {text}");
    }

    /// A program that is not there is an error of the spawn, not an exit status.
    #[tokio::test]
    async fn test_a_missing_program_is_an_error() {
        let err = run_as_guest(OsStr::new("/nonexistent/qemu"), Vec::new())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    }
}
