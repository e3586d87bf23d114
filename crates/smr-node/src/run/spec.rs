//! The OCI runtime `config.json` of `smr run`, from the image config kept
//! in the recipe, with Docker's rules for the command, env and user.

use std::path::Path;

use serde_json::{json, Value};
use smr_format::config::ImageConfig;

use super::{Result, RunError};

/// The `PATH` Docker gives containers whose image sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Capabilities granted: containerd's default set, which is Docker's
/// without `CAP_NET_RAW` (raw sockets let a container forge packets on
/// its network).
const CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Who the process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Supplementary groups (from the image's `/etc/group`).
    pub additional_gids: Vec<u32>,
    /// Home directory (for `HOME`), from `/etc/passwd`, else `/`.
    pub home: String,
}

/// What the user asked for on top of the image config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// Arguments after `--`: they replace `Cmd` (the entrypoint is kept).
    pub command: Vec<String>,
    /// `-e K=V` (set) or `-e K` (taken from `host_env`).
    pub env: Vec<String>,
    /// Allocate a terminal.
    pub terminal: bool,
}

/// The process arguments by Docker's rule: `Entrypoint + (override or Cmd)`.
pub fn process_args(cfg: &ImageConfig, command: &[String]) -> Result<Vec<String>> {
    let cmd = if command.is_empty() {
        &cfg.cmd
    } else {
        command
    };
    let args: Vec<String> = cfg.entrypoint.iter().chain(cmd).cloned().collect();
    if args.is_empty() {
        return Err(RunError::NoCommand);
    }
    Ok(args)
}

/// Image env, then `PATH` if missing, `HOME` if missing, then each `-e`
/// (replacing a variable of the same name); `-e K` copies `K` from
/// `host_env` (and is skipped when unset there), as `docker run` does.
pub fn environment(
    cfg: &ImageConfig,
    user: &User,
    extra: &[String],
    host_env: impl Fn(&str) -> Option<String>,
) -> Vec<String> {
    fn put(env: &mut Vec<(String, String)>, k: &str, v: String, replace: bool) {
        match env.iter_mut().find(|(ek, _)| ek == k) {
            Some(e) if replace => e.1 = v,
            Some(_) => {}
            None => env.push((k.to_string(), v)),
        }
    }
    let mut env: Vec<(String, String)> = Vec::new();
    for e in &cfg.env {
        let (k, v) = e.split_once('=').unwrap_or((e, ""));
        put(&mut env, k, v.to_string(), true);
    }
    put(&mut env, "PATH", DEFAULT_PATH.to_string(), false);
    put(&mut env, "HOME", user.home.clone(), false);
    for e in extra {
        match e.split_once('=') {
            Some((k, v)) => put(&mut env, k, v.to_string(), true),
            None => {
                if let Some(v) = host_env(e) {
                    put(&mut env, e, v, true);
                }
            }
        }
    }
    env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// Parses `/etc/passwd` text: `(name, uid, gid, home)` records.
fn passwd(text: &str) -> Vec<(String, u32, u32, String)> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some((
                (*f.first()?).to_string(),
                f.get(2)?.parse().ok()?,
                f.get(3)?.parse().ok()?,
                f.get(5).copied().unwrap_or("/").to_string(),
            ))
        })
        .collect()
}

/// Parses `/etc/group` text: `(name, gid, members)` records.
fn group(text: &str) -> Vec<(String, u32, Vec<String>)> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            let members = f.get(3).map(|m| {
                m.split(',')
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            });
            Some((
                (*f.first()?).to_string(),
                f.get(2)?.parse().ok()?,
                members.unwrap_or_default(),
            ))
        })
        .collect()
}

/// Resolves Docker's `User` (`""`, `uid`, `name`, `uid:gid`, `name:group`,
/// ...) against the image's `/etc/passwd` and `/etc/group` text (empty if
/// the image has none). A numeric uid missing from passwd is allowed (gid
/// 0 unless given); a missing name is an error.
pub fn resolve_user(spec: &str, passwd_text: &str, group_text: &str) -> Result<User> {
    let users = passwd(passwd_text);
    let groups = group(group_text);
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let u = if u.is_empty() { "0" } else { u };
    let entry = match u.parse::<u32>() {
        Ok(uid) => {
            users
                .iter()
                .find(|e| e.1 == uid)
                .cloned()
                .or(Some((String::new(), uid, 0, "/".into())))
        }
        Err(_) => users.iter().find(|e| e.0 == u).cloned(),
    };
    let (name, uid, mut gid, home) =
        entry.ok_or_else(|| RunError::UnknownUser(spec.to_string()))?;
    if let Some(g) = g {
        gid = match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => groups
                .iter()
                .find(|e| e.0 == g)
                .map(|e| e.1)
                .ok_or_else(|| RunError::UnknownUser(spec.to_string()))?,
        };
    }
    let mut additional_gids: Vec<u32> = if name.is_empty() {
        Vec::new()
    } else {
        groups
            .iter()
            .filter(|e| e.2.contains(&name))
            .map(|e| e.1)
            .collect()
    };
    additional_gids.retain(|x| *x != gid);
    additional_gids.sort_unstable();
    additional_gids.dedup();
    Ok(User {
        uid,
        gid,
        additional_gids,
        home,
    })
}

/// Resolves the image's user with the files of the root filesystem `rootfs`.
pub fn resolve_user_in(spec: &str, rootfs: &Path) -> Result<User> {
    let read = |p: &str| std::fs::read_to_string(rootfs.join(p)).unwrap_or_default();
    resolve_user(spec, &read("etc/passwd"), &read("etc/group"))
}

/// Everything `config.json` is built from.
#[derive(Debug, Clone)]
pub struct SpecInput<'a> {
    /// The image config from the recipe.
    pub image: &'a ImageConfig,
    /// The resolved user.
    pub user: &'a User,
    /// Process arguments.
    pub args: Vec<String>,
    /// Process environment.
    pub env: Vec<String>,
    /// Allocate a terminal.
    pub terminal: bool,
    /// The root filesystem (the overlay).
    pub rootfs: &'a Path,
    /// Container host name.
    pub hostname: &'a str,
    /// The network namespace.
    pub network: NetNs<'a>,
    /// The file bind-mounted on the container's `/etc/resolv.conf`.
    pub resolv_conf: &'a Path,
    /// The seccomp filter (`linux.seccomp`), if any.
    pub seccomp: Option<Value>,
}

/// The container's network namespace in the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetNs<'a> {
    /// The host's (no `network` namespace in the spec).
    Host,
    /// A new one made by the runtime (loopback only).
    New,
    /// The namespace at this path (made by smr, see [`super::net`]).
    Path(&'a Path),
}

/// Paths the container cannot read (containerd's default list).
const MASKED: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
    "/sys/devices/virtual/powercap",
];

/// Builds the OCI runtime config: namespaces pid, mount, ipc, uts, cgroup
/// and (unless [`NetNs::Host`]) network, the usual `/proc`, `/dev`,
/// `/dev/pts`, `/dev/shm`, `/dev/mqueue` and read-only `/sys` mounts,
/// containerd's default capabilities, masked and read-only kernel paths,
/// and the seccomp filter. docs/ARCHITECTURE.md ("Container defaults")
/// compares it with `runc spec` and containerd.
pub fn build(i: &SpecInput<'_>) -> Value {
    let cwd = if i.image.working_dir.is_empty() {
        "/"
    } else {
        i.image.working_dir.as_str()
    };
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "mount"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "cgroup"}),
    ];
    match i.network {
        NetNs::Host => {}
        NetNs::New => namespaces.push(json!({"type": "network"})),
        NetNs::Path(p) => namespaces.push(json!({"type": "network", "path": p})),
    }
    let mut linux = json!({
        "namespaces": namespaces,
        "maskedPaths": MASKED,
        "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
    });
    if let Some(seccomp) = &i.seccomp {
        linux["seccomp"] = seccomp.clone();
    }
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": i.terminal,
            "user": {"uid": i.user.uid, "gid": i.user.gid, "additionalGids": i.user.additional_gids},
            "args": i.args,
            "env": i.env,
            "cwd": cwd,
            "capabilities": {"bounding": CAPS, "effective": CAPS, "permitted": CAPS},
            // containerd's default: the container does not inherit the
            // open-file limit smr raised for its cache (cache/handles.rs).
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": i.rootfs, "readonly": false},
        "hostname": i.hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/etc/resolv.conf", "type": "bind", "source": i.resolv_conf,
             "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]}
        ],
        "linux": linux
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\napp:x:1000:1000::/home/app:/bin/sh\nbroken line\n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:app\napp:x:1000:\nnogroup:x:65534:\n";

    fn cfg() -> ImageConfig {
        ImageConfig {
            entrypoint: vec!["/ep".into()],
            cmd: vec!["default".into()],
            env: vec!["PATH=/x".into(), "A=1".into()],
            ..ImageConfig::default()
        }
    }

    #[test]
    fn command_follows_docker() {
        let c = cfg();
        assert_eq!(process_args(&c, &[]).expect("args"), vec!["/ep", "default"]);
        assert_eq!(
            process_args(&c, &["x".into(), "y".into()]).expect("args"),
            vec!["/ep", "x", "y"]
        );
        let bare = ImageConfig::default();
        assert!(matches!(process_args(&bare, &[]), Err(RunError::NoCommand)));
        assert_eq!(
            process_args(&bare, &["sh".into()]).expect("args"),
            vec!["sh"]
        );
    }

    #[test]
    fn env_overrides_and_defaults() {
        let u = resolve_user("app", PASSWD, GROUP).expect("user");
        let host = |k: &str| (k == "FROM_HOST").then(|| "h".to_string());
        let e = environment(
            &cfg(),
            &u,
            &[
                "A=2".into(),
                "B=3".into(),
                "FROM_HOST".into(),
                "UNSET".into(),
            ],
            host,
        );
        assert_eq!(
            e,
            vec!["PATH=/x", "A=2", "HOME=/home/app", "B=3", "FROM_HOST=h"]
        );
        let e = environment(
            &ImageConfig::default(),
            &resolve_user("", "", "").expect("root"),
            &[],
            host,
        );
        assert_eq!(e, vec![format!("PATH={DEFAULT_PATH}"), "HOME=/".into()]);
    }

    #[test]
    fn users_resolve_like_docker() {
        let r = resolve_user("", PASSWD, GROUP).expect("root");
        assert_eq!((r.uid, r.gid, r.home.as_str()), (0, 0, "/root"));
        let a = resolve_user("app", PASSWD, GROUP).expect("app");
        assert_eq!(
            (a.uid, a.gid, a.additional_gids.clone()),
            (1000, 1000, vec![50])
        );
        let n = resolve_user("1234:5", PASSWD, GROUP).expect("numeric");
        assert_eq!((n.uid, n.gid, n.home.as_str()), (1234, 5, "/"));
        let g = resolve_user("nobody:staff", PASSWD, GROUP).expect("named group");
        assert_eq!((g.uid, g.gid), (65534, 50));
        assert!(resolve_user("ghost", PASSWD, GROUP).is_err());
        assert!(resolve_user("app:ghosts", PASSWD, GROUP).is_err());
    }

    #[test]
    fn spec_has_what_runc_needs() {
        let u = resolve_user("app", PASSWD, GROUP).expect("app");
        let c = cfg();
        let s = build(&SpecInput {
            image: &c,
            user: &u,
            args: vec!["sh".into()],
            env: vec!["A=1".into()],
            terminal: false,
            rootfs: Path::new("/r"),
            hostname: "h",
            network: NetNs::New,
            resolv_conf: Path::new("/etc/resolv.conf"),
            seccomp: super::super::seccomp::Seccomp::Default.spec(),
        });
        assert_eq!(s["process"]["user"]["uid"], 1000);
        assert_eq!(s["process"]["cwd"], "/");
        assert_eq!(s["process"]["rlimits"][0]["soft"], 1024);
        assert_eq!(s["root"]["path"], "/r");
        assert!(s.get("hooks").is_none(), "no hook runs before the process");
        let ns: Vec<&str> = s["linux"]["namespaces"]
            .as_array()
            .expect("namespaces")
            .iter()
            .filter_map(|n| n["type"].as_str())
            .collect();
        assert_eq!(ns, vec!["pid", "mount", "ipc", "uts", "cgroup", "network"]);
        let caps = s["process"]["capabilities"]["bounding"]
            .as_array()
            .expect("caps");
        assert!(!caps.iter().any(|c| c == "CAP_NET_RAW"), "{caps:?}");
        assert!(s["linux"]["maskedPaths"]
            .as_array()
            .expect("masked")
            .iter()
            .any(|p| p == "/sys/devices/virtual/powercap"));
        assert_eq!(s["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ALLOW");
    }

    #[test]
    fn network_choices() {
        let u = resolve_user("", "", "").expect("root");
        let c = cfg();
        let spec = |network| {
            build(&SpecInput {
                image: &c,
                user: &u,
                args: vec!["sh".into()],
                env: vec![],
                terminal: false,
                rootfs: Path::new("/r"),
                hostname: "h",
                network,
                resolv_conf: Path::new("/b/resolv.conf"),
                seccomp: None,
            })
        };
        let net = |s: &Value| -> Option<Value> {
            s["linux"]["namespaces"]
                .as_array()
                .expect("namespaces")
                .iter()
                .find(|n| n["type"] == "network")
                .cloned()
        };
        assert!(net(&spec(NetNs::Host)).is_none());
        assert_eq!(net(&spec(NetNs::New)), Some(json!({"type": "network"})));
        let p = spec(NetNs::Path(Path::new("/proc/1/task/2/ns/net")));
        assert_eq!(net(&p).expect("ns")["path"], "/proc/1/task/2/ns/net");
        assert!(p["linux"].get("seccomp").is_none());
        assert_eq!(p["mounts"][6]["source"], "/b/resolv.conf");
    }
}
