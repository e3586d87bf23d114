//! The container's default seccomp profile, and `--security-opt seccomp=…`.
//!
//! The default has the effect of containerd's `RuntimeDefault` for a
//! container with smr's capability set (no `CAP_SYS_ADMIN`,
//! `CAP_SYS_PTRACE`, `CAP_SYS_MODULE`, `CAP_SYS_TIME`, ...): the system
//! calls that profile refuses to such a container fail with `EPERM`. It is
//! written the other way round, though: everything is allowed except a
//! list, where containerd allows a list and refuses the rest. A denylist
//! cannot break a program that uses a system call newer than the profile
//! (containerd's profile returns `EPERM` for those until it is updated);
//! the price is that a new kernel interface that should be refused is
//! allowed until it is listed here.
//!
//! Refused, as in `RuntimeDefault`:
//! - new namespaces: `unshare`, `setns`, and `clone` with any
//!   `CLONE_NEW*` flag (so `unshare -Ur` cannot hand the container a full
//!   capability set in a user namespace); `clone3` returns `ENOSYS`, as
//!   in containerd, so that libc falls back to `clone`, whose flags can be
//!   inspected;
//! - mounting: `mount`, `umount2`, `pivot_root` and the new mount API;
//! - the kernel's keyrings, modules, kexec, BPF, perf events,
//!   `userfaultfd`, swap, reboot, quotas, `syslog`, `acct`, the clocks,
//!   file handles (`open_by_handle_at`), `ptrace`-like memory access
//!   (`process_vm_*`, `kcmp`), I/O ports, `io_uring`, `AF_VSOCK` sockets,
//!   and obsolete calls (`uselib`, `ustat`, `sysfs`, `_sysctl`, `vm86`).

use std::path::Path;

use serde_json::{json, Value};

/// `EPERM`.
const EPERM: u32 = 1;
/// `ENOSYS`.
const ENOSYS: u32 = 38;
/// The `CLONE_NEW*` flags: `NEWNS`, `NEWCGROUP`, `NEWUTS`, `NEWIPC`,
/// `NEWUSER`, `NEWPID`, `NEWNET`.
const CLONE_NEW: [u64; 7] = [
    0x0002_0000,
    0x0200_0000,
    0x0400_0000,
    0x0800_0000,
    0x1000_0000,
    0x2000_0000,
    0x4000_0000,
];
/// `AF_VSOCK`.
const AF_VSOCK: u64 = 40;

/// Refused whatever their arguments.
const DENIED: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "fanotify_init",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "init_module",
    "io_uring_enter",
    "io_uring_register",
    "io_uring_setup",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "mount_setattr",
    "move_mount",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "query_module",
    "quotactl",
    "quotactl_fd",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "stime",
    "swapoff",
    "swapon",
    "_sysctl",
    "sysfs",
    "syslog",
    "umount",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
    "vm86",
    "vm86old",
];

/// The seccomp architectures of the machine smr runs on: the native one
/// and the ones its kernel also runs (so a 32-bit binary meets the same
/// rules).
fn architectures() -> Vec<&'static str> {
    match std::env::consts::ARCH {
        "x86_64" => vec!["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "aarch64" => vec!["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
        "x86" => vec!["SCMP_ARCH_X86"],
        "arm" => vec!["SCMP_ARCH_ARM"],
        "riscv64" => vec!["SCMP_ARCH_RISCV64"],
        "s390x" => vec!["SCMP_ARCH_S390X", "SCMP_ARCH_S390"],
        "powerpc64" => vec!["SCMP_ARCH_PPC64", "SCMP_ARCH_PPC64LE"],
        _ => Vec::new(),
    }
}

/// The default profile (OCI `linux.seccomp`); see the module docs.
pub fn default_profile() -> Value {
    let mut syscalls = vec![json!({
        "names": DENIED,
        "action": "SCMP_ACT_ERRNO",
        "errnoRet": EPERM,
    })];
    // libseccomp has no "masked not-equal": one rule per flag, ORed.
    // s390 passes clone's flags second; everywhere else first.
    let flags_arg = if std::env::consts::ARCH == "s390x" {
        1
    } else {
        0
    };
    for flag in CLONE_NEW {
        syscalls.push(json!({
            "names": ["clone"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": EPERM,
            "args": [{"index": flags_arg, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}],
        }));
    }
    syscalls.push(json!({
        "names": ["clone3"],
        "action": "SCMP_ACT_ERRNO",
        "errnoRet": ENOSYS,
    }));
    syscalls.push(json!({
        "names": ["socket"],
        "action": "SCMP_ACT_ERRNO",
        "errnoRet": EPERM,
        "args": [{"index": 0, "value": AF_VSOCK, "op": "SCMP_CMP_EQ"}],
    }));
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": architectures(),
        "syscalls": syscalls,
    })
}

/// The container's seccomp filter (`--security-opt seccomp=…`).
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Seccomp {
    /// [`default_profile`].
    #[default]
    Default,
    /// No filter (`seccomp=unconfined`).
    Unconfined,
    /// A profile from a file: an OCI `LinuxSeccomp` object.
    Profile(Value),
}

/// Errors of [`Seccomp::parse`].
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The option is not `seccomp=…`.
    #[error("unsupported security option {0:?} (expected seccomp=unconfined or seccomp=FILE)")]
    Option(String),
    /// The profile file cannot be read.
    #[error("seccomp profile {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The profile is not an OCI `LinuxSeccomp` object.
    #[error("seccomp profile {path}: {why}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
}

/// Largest profile file read (containerd's own is about 20 KiB).
const MAX_PROFILE: u64 = 1 << 20;

impl Seccomp {
    /// Parses a `--security-opt` value: `seccomp=unconfined`,
    /// `seccomp=default` or `seccomp=FILE` (an OCI `LinuxSeccomp` JSON
    /// object, as in a runtime spec's `linux.seccomp`).
    pub fn parse(opt: &str) -> Result<Self, SeccompError> {
        let v = opt
            .strip_prefix("seccomp=")
            .or_else(|| opt.strip_prefix("seccomp:"))
            .ok_or_else(|| SeccompError::Option(opt.to_string()))?;
        match v {
            "unconfined" => Ok(Seccomp::Unconfined),
            "default" | "runtime/default" => Ok(Seccomp::Default),
            path => Self::from_file(Path::new(path)).map(Seccomp::Profile),
        }
    }

    fn from_file(path: &Path) -> Result<Value, SeccompError> {
        let name = path.display().to_string();
        let text =
            smr_format::read_bounded(path, MAX_PROFILE).map_err(|source| SeccompError::Read {
                path: name.clone(),
                source,
            })?;
        let invalid = |why: String| SeccompError::Invalid {
            path: name.clone(),
            why,
        };
        let v: Value = serde_json::from_slice(&text).map_err(|e| invalid(e.to_string()))?;
        match v.get("defaultAction") {
            Some(Value::String(_)) => Ok(v),
            _ => Err(invalid(
                "not an OCI LinuxSeccomp object (no \"defaultAction\" string)".into(),
            )),
        }
    }

    /// The value of the spec's `linux.seccomp`, if any.
    pub fn spec(&self) -> Option<Value> {
        match self {
            Seccomp::Default => Some(default_profile()),
            Seccomp::Unconfined => None,
            Seccomp::Profile(v) => Some(v.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_refuses_namespaces_and_mounts() {
        let p = default_profile();
        assert_eq!(p["defaultAction"], "SCMP_ACT_ALLOW");
        let names: Vec<&str> = p["syscalls"][0]["names"]
            .as_array()
            .expect("names")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        for s in ["unshare", "setns", "mount", "keyctl", "bpf", "pivot_root"] {
            assert!(names.contains(&s), "{s} not refused");
        }
        let clone_rules = p["syscalls"]
            .as_array()
            .expect("rules")
            .iter()
            .filter(|r| r["names"][0] == "clone")
            .count();
        assert_eq!(clone_rules, CLONE_NEW.len());
        assert_eq!(
            CLONE_NEW.iter().fold(0, |a, f| a | f),
            0x7E02_0000,
            "every CLONE_NEW* flag"
        );
    }

    #[test]
    fn options_parse() {
        assert_eq!(
            Seccomp::parse("seccomp=unconfined").expect("unconfined"),
            Seccomp::Unconfined
        );
        assert!(Seccomp::parse("seccomp=unconfined")
            .expect("unconfined")
            .spec()
            .is_none());
        assert!(matches!(
            Seccomp::parse("apparmor=x"),
            Err(SeccompError::Option(_))
        ));
        let t = tempfile::tempdir().expect("tmp");
        let good = t.path().join("p.json");
        std::fs::write(&good, br#"{"defaultAction":"SCMP_ACT_LOG"}"#).expect("write");
        let p = Seccomp::parse(&format!("seccomp={}", good.display())).expect("profile");
        assert_eq!(p.spec().expect("spec")["defaultAction"], "SCMP_ACT_LOG");
        let bad = t.path().join("bad.json");
        std::fs::write(&bad, b"[1,2]").expect("write");
        let e = Seccomp::parse(&format!("seccomp={}", bad.display())).expect_err("bad");
        assert!(e.to_string().contains("bad.json"), "{e}");
        let e = Seccomp::parse("seccomp=/dev/zero").expect_err("endless");
        assert!(e.to_string().contains("/dev/zero"), "{e}");
        let e = Seccomp::parse("seccomp=/no/such").expect_err("missing");
        assert!(e.to_string().contains("/no/such"), "{e}");
    }
}
