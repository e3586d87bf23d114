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

#[cfg(test)]
mod tests {
    #[test]
    fn limiting_arenas_is_accepted_on_glibc() {
        let took = super::limit_arenas(super::SERVER_ARENAS);
        assert_eq!(took, cfg!(all(target_os = "linux", target_env = "gnu")));
    }
}
