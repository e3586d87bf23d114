//! Real NBD clients against the server: libnbd's nbdinfo and nbdcopy, qemu-img.

use super::*;

/// `nbdinfo --map` lines as (offset, length, type).
fn map(uri: &str) -> Vec<(u64, u64, String)> {
    run_ok("nbdinfo", &["--map", uri])
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() >= 4, "odd map line {l:?}");
            (
                f[0].parse().expect("offset"),
                f[1].parse().expect("length"),
                f[3].to_string(),
            )
        })
        .collect()
}

fn expected_map() -> Vec<(u64, u64, String)> {
    vec![
        (0, MIB, "data".into()),
        (MIB, MIB, "hole,zero".into()),
        (2 * MIB, MIB + 4096, "data".into()),
        (3 * MIB + 4096, 8192, "hole,zero".into()),
        (3 * MIB + 12288, MIB, "data".into()),
    ]
}

#[test]
fn nbdinfo_over_tcp_shows_size_flags_and_map() {
    let (e, dev) = export("root", std_device());
    let srv = serve_tcp(vec![e]);
    let info = run_ok("nbdinfo", &[&srv.uri]);
    assert!(
        info.contains(&format!("export-size: {}", dev.size())),
        "{info}"
    );
    assert!(info.contains("is_read_only: true"), "{info}");
    assert!(info.contains("can_multi_conn: true"), "{info}");
    assert!(info.contains("can_cache: true"), "{info}");
    assert!(info.contains("can_flush: true"), "{info}");
    assert!(info.contains("can_df: true"), "{info}");
    assert!(info.contains("block_size_preferred: 4096"), "{info}");
    assert!(info.contains("block_size_maximum: 33554432"), "{info}");
    assert!(info.contains("description: test export root"), "{info}");
    assert_eq!(map(&srv.uri), expected_map());
    srv.stop();
}

#[test]
fn nbdinfo_over_unix_socket() {
    let (e, dev) = export("root", std_device());
    let srv = serve_unix(vec![e]);
    let size = run_ok("nbdinfo", &["--size", &srv.uri]);
    assert_eq!(size.trim(), dev.size().to_string());
    assert_eq!(map(&srv.uri), expected_map());
    srv.stop();
}

#[test]
fn nbdinfo_list_shows_every_export() {
    let (a, _) = export("root", std_device());
    let (b, small) = export("small", MemDevice::new(65536, &[]));
    let srv = serve_tcp(vec![a, b]);
    let list = run_ok("nbdinfo", &["--list", &srv.uri]);
    assert!(list.contains("export=\"root\""), "{list}");
    assert!(list.contains("export=\"small\""), "{list}");
    assert!(list.contains("description: test export small"), "{list}");
    let named = run_ok("nbdinfo", &["--size", &format!("{}/small", srv.uri)]);
    assert_eq!(named.trim(), small.size().to_string());
    let missing = run("nbdinfo", &[&format!("{}/nope", srv.uri)]);
    assert!(!missing.status.success());
    srv.stop();
}

#[test]
fn nbdcopy_tcp_and_unix_equal_device_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Odd size: the last request is short.
    let (e, dev) = export("root", MemDevice::new(3 * MIB + 777, &[(512, 100_000)]));
    let tcp = serve_tcp(vec![e.clone()]);
    let unix = serve_unix(vec![e]);
    for (i, srv) in [&tcp, &unix].into_iter().enumerate() {
        let out = dir.path().join(format!("out{i}"));
        run_ok("nbdcopy", &[&srv.uri, out.to_str().expect("utf8")]);
        assert!(read_file(&out) == dev.bytes(), "copy {i} differs");
    }
    tcp.stop();
    unix.stop();
}

#[test]
fn qemu_img_info_and_compare() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (e, dev) = export("root", std_device());
    let srv = serve_tcp(vec![e]);
    let file = dir.path().join("ref.img");
    std::fs::write(&file, dev.bytes()).expect("write ref");
    let info = run_ok("qemu-img", &["info", "--output=json", &srv.uri]);
    assert!(
        info.contains(&format!("\"virtual-size\": {}", dev.size())),
        "{info}"
    );
    let file = file.to_str().expect("utf8");
    run_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", file, &srv.uri],
    );
    // And a difference is noticed (the comparison is real).
    let mut other = dev.bytes();
    other[5] ^= 1;
    let other_file = dir.path().join("other.img");
    std::fs::write(&other_file, other).expect("write other");
    let diff = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            other_file.to_str().expect("utf8"),
            &srv.uri,
        ],
    );
    assert_eq!(
        diff.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&diff.stdout)
    );
    srv.stop();
}

#[test]
fn eight_concurrent_nbdcopy_clients() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (e, dev) = export("root", std_device());
    let srv = serve_tcp(vec![e]);
    let children: Vec<_> = (0..8)
        .map(|i| {
            let out = dir.path().join(format!("c{i}"));
            let child = Command::new("timeout")
                .args(["120", "nbdcopy", &srv.uri, out.to_str().expect("utf8")])
                .spawn()
                .expect("spawn nbdcopy");
            (child, out)
        })
        .collect();
    let want = dev.bytes();
    for (mut child, out) in children {
        assert!(child.wait().expect("wait").success());
        assert!(read_file(&out) == want, "{} differs", out.display());
    }
    srv.stop();
}

#[test]
fn nbdcopy_multi_conn_many_requests_in_flight() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (e, dev) = export("root", MemDevice::new(16 * MIB, &[(4 * MIB, 3 * MIB)]));
    let srv = serve_tcp(vec![e]);
    let out = dir.path().join("out");
    let out_s = out.to_str().expect("utf8");
    run_ok(
        "nbdcopy",
        &[
            "--connections=4",
            "--requests=64",
            "--request-size=65536",
            &srv.uri,
            out_s,
        ],
    );
    assert!(read_file(&out) == dev.bytes());
    srv.stop();
}

#[test]
fn read_error_fails_nbdcopy_but_other_reads_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (e, dev) = export("root", std_device().failing(3 * MIB + 65536, 4096));
    let srv = serve_tcp(vec![e]);
    let out = dir.path().join("out");
    let copy = run("nbdcopy", &[&srv.uri, out.to_str().expect("utf8")]);
    assert!(!copy.status.success(), "nbdcopy must see the EIO");
    // Simple replies: the failing read gets error 5, its neighbours data.
    let mut c = raw::Raw::go(&srv.addr, false);
    assert_eq!(
        c.read(1, 3 * MIB + 65536, 4096),
        Err(crate::nbd::proto::EIO)
    );
    let good = c
        .read(2, 3 * MIB, 65536)
        .expect("read before the bad chunk");
    assert!(good == dev.bytes()[3 * MIB as usize..(3 * MIB + 65536) as usize]);
    assert!(c.read(3, 0, 4096).is_ok());
    srv.stop();
}

/// A tiny server-wide budget (2 requests, 64 KiB in flight) shared by two
/// exports: concurrent multi-conn clients of both, with requests larger
/// than the whole budget, still get every byte (requests queue, never
/// deadlock).
#[test]
fn tiny_server_budget_serves_concurrent_clients_of_two_exports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, dev_a) = export("a", std_device());
    let (b, dev_b) = export("b", MemDevice::new(3 * MIB, &[(MIB, 4096)]));
    let config = ServerConfig {
        server_max_in_flight: 2,
        server_max_in_flight_bytes: 64 << 10,
        ..ServerConfig::default()
    };
    let srv = serve_tcp_with(vec![a, b], config);
    let children: Vec<_> = [("a", 65536), ("b", 262144), ("a", 262144), ("b", 4096)]
        .iter()
        .enumerate()
        .map(|(i, (name, size))| {
            let out = dir.path().join(format!("c{i}"));
            let child = Command::new("timeout")
                .args(["120", "nbdcopy", "--connections=2", "--requests=16"])
                .arg(format!("--request-size={size}"))
                .arg(format!("{}/{name}", srv.uri))
                .arg(&out)
                .spawn()
                .expect("spawn nbdcopy");
            (child, out, *name)
        })
        .collect();
    for (mut child, out, name) in children {
        assert!(child.wait().expect("wait").success());
        let want = if name == "a" {
            dev_a.bytes()
        } else {
            dev_b.bytes()
        };
        assert!(read_file(&out) == want, "{} differs", out.display());
    }
    srv.stop();
}
