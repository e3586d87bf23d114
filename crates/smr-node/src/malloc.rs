//! Keeping a serving process's heap small.
//!
//! glibc's malloc gives threads their own arenas (up to 8 per core) and
//! keeps what they free for reuse. A server whose requests run on dozens of
//! threads, each allocating and freeing chunk-sized buffers, so holds
//! freed memory in many arenas: measured with `smr serve-nbd` serving 4
//! images under 4 concurrent `nbdcopy`, about 17 MiB of its 60 MiB peak
//! (docs/BENCHMARKS.md, "Memory"). Two arenas are plenty: allocations are
//! per request or per chunk, not per byte, so there is little contention.

/// Arenas a serving process uses (see [`limit_arenas`]).
pub const SERVER_ARENAS: i32 = 2;

/// Caps glibc malloc at `n` arenas, process-wide; best called early, before
/// threads start. Returns whether the allocator took the setting (always
/// `false` off glibc, where there is nothing to do).
// An FFI call with no memory-safety contract.
#[allow(unsafe_code)]
pub fn limit_arenas(n: i32) -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `mallopt` only changes an allocator tunable; glibc
        // serializes it internally, so it may be called from any thread at
        // any time, and M_ARENA_MAX accepts any positive value.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, n.max(1)) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = n;
        false
    }
}

/// Allocations at or above this size get pages of their own, returned on
/// free (see [`bound_heap`]).
pub const MMAP_THRESHOLD: i32 = 1 << 20;

/// Fixes glibc's mmap and trim thresholds at [`MMAP_THRESHOLD`]. By default
/// the mmap threshold grows (up to 32 MiB) each time a large block is
/// freed, after which multi-megabyte buffers (pack reads, decompression)
/// come from the arenas and stay there when freed: an image server of the
/// node daemon measured 38 MiB of anonymous memory right after mounting,
/// 4 MiB with the thresholds fixed (docs/BENCHMARKS.md, "Node daemon").
/// For processes that live long next to many others; returns whether
/// glibc took both settings.
// An FFI call with no memory-safety contract.
#[allow(unsafe_code)]
pub fn bound_heap() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: as in `limit_arenas`: allocator tunables, serialized by
        // glibc, any positive value accepted.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, MMAP_THRESHOLD) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn limiting_arenas_is_accepted_on_glibc() {
        let took = super::limit_arenas(super::SERVER_ARENAS);
        assert_eq!(took, cfg!(all(target_os = "linux", target_env = "gnu")));
    }

    #[test]
    fn bounding_the_heap_is_accepted_on_glibc() {
        assert_eq!(
            super::bound_heap(),
            cfg!(all(target_os = "linux", target_env = "gnu"))
        );
    }
}
