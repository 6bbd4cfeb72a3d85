//! Touches MIB mebibytes of fresh memory in transparent huge pages, then exits and so frees
//! them. The migration benchmark (scripts/bench-migration) runs it before each migration of
//! either side.
//!
//! Why: on a host that is itself a virtual machine with free page reporting
//! (virtio-balloon), memory that stayed free for a while has been handed back to the
//! hypervisor. The first touch of each of its huge pages then costs about 2 ms instead of
//! 0.1 ms. A destination QEMU loading 256 MiB of guest memory could spend half a second on
//! that, depending only on when the host last took memory back, which made single
//! migrations two to five times slower at random. Memory touched and freed just before a
//! migration is what the destination gets next, warm, on both sides alike. On a host
//! without free page reporting this changes nothing.
//!
//! ```sh
//! cargo run --release -p csvd-hypervisor --example warm_memory -- MIB
//! ```
//!
//! Prints how long the touch took.

use std::time::Instant;

fn main() {
    let Some(mib) = std::env::args()
        .nth(1)
        .and_then(|a| a.parse::<usize>().ok())
    else {
        eprintln!("usage: warm_memory MIB");
        std::process::exit(2);
    };
    let started = Instant::now();
    if let Err(e) = touch(mib << 20) {
        eprintln!("warm_memory: {e}");
        std::process::exit(1);
    }
    println!("{mib} MiB touched in {} ms", started.elapsed().as_millis());
}

/// Maps `len` bytes of anonymous memory, asks for huge pages (as QEMU does for guest
/// memory) and writes to every 4 KiB page of it.
#[allow(unsafe_code)]
fn touch(len: usize) -> std::io::Result<()> {
    // SAFETY: a new private anonymous mapping, written only within its `len` bytes and
    // unmapped before returning; nothing else refers to it.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // Without huge pages the touch still warms every page, only slower.
        libc::madvise(p, len, libc::MADV_HUGEPAGE);
        let bytes = p.cast::<u8>();
        for offset in (0..len).step_by(4096) {
            bytes.add(offset).write_volatile(1);
        }
        libc::munmap(p, len);
    }
    Ok(())
}
