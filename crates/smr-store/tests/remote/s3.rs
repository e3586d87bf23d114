//! The S3 store against s3s-fs (`scripts/s3.sh`).

use crate::contract;
use crate::support::{chunk, S3Server, ACCESS_KEY, BUCKET, SECRET_KEY};
use smr_store::{ChunkStore, RemoteOptions, S3Store, StoreError};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn store(server: &S3Server, prefix: &str, secret: &str, deadline: f64) -> S3Store {
    S3Store::builder(&format!("s3://{BUCKET}/{prefix}"))
        .unwrap()
        .endpoint(&server.endpoint)
        .allow_http(true)
        .region("us-east-1")
        .credentials(ACCESS_KEY, secret)
        .options(RemoteOptions::default().with_deadline(Duration::from_secs_f64(deadline)))
        .build()
        .unwrap()
}

#[test]
fn read_write_round_trip() {
    let Some(server) = S3Server::start() else {
        return;
    };
    let s = store(&server, "images/prod", SECRET_KEY, 10.0);
    assert_eq!(s.describe(), format!("s3://{BUCKET}/images/prod"));
    contract::read_write(Arc::new(s.clone()));

    // The local store's layout under the prefix.
    let (id, data) = chunk(5000);
    s.put(&id, &data).unwrap();
    let hex = id.to_hex();
    let on_disk = server.object_path(&format!("images/prod/chunks/{}/{hex}", &hex[..2]));
    assert_eq!(std::fs::read(on_disk).unwrap(), data);
}

#[test]
fn ranged_reads() {
    let Some(server) = S3Server::start() else {
        return;
    };
    let s = store(&server, "images/prod", SECRET_KEY, 10.0);
    let root = server.object_path("images/prod");
    let (object, data) = contract::pack_object(&root, 100_000);
    contract::ranged(&s, &object, &data);
}

#[test]
fn missing_chunk_names_chunk_and_store() {
    let Some(server) = S3Server::start() else {
        return;
    };
    let s = store(&server, "p", SECRET_KEY, 10.0);
    let (id, _) = chunk(10);
    let t = Instant::now();
    let e = s.get(&id).unwrap_err();
    let msg = e.to_string();
    eprintln!("{msg}");
    assert!(matches!(e, StoreError::Missing { .. }), "{msg}");
    assert!(
        msg.contains(&id.to_hex()) && msg.contains("s3://smr-test/p"),
        "{msg}"
    );
    assert!(t.elapsed() < Duration::from_secs(2), "not retried");
}

#[test]
fn wrong_credentials_are_a_clear_permanent_error() {
    let Some(server) = S3Server::start() else {
        return;
    };
    let s = store(&server, "p", "not-the-secret", 10.0);
    let (id, data) = chunk(10);
    let t = Instant::now();
    for e in [
        s.get(&id).unwrap_err(),
        s.put(&id, &data).unwrap_err(),
        s.exists(&id).unwrap_err(),
    ] {
        let msg = e.to_string();
        eprintln!("{msg}");
        assert!(matches!(e, StoreError::Denied { .. }), "{msg}");
        assert!(
            msg.contains("denied") && msg.contains("credentials"),
            "{msg}"
        );
        assert!(
            msg.contains("s3://smr-test/p") && msg.contains(&id.to_hex()),
            "{msg}"
        );
        assert!(!msg.contains("not-the-secret"), "{msg}");
    }
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "not retried: {:?}",
        t.elapsed()
    );
}

#[test]
fn outage_fails_in_time_then_recovers() {
    let Some(server) = S3Server::start() else {
        return;
    };
    let s = store(&server, "p", SECRET_KEY, 2.0);
    let (id, data) = chunk(3000);
    s.put(&id, &data).unwrap();
    server.stop();
    let t = Instant::now();
    let e = s.get(&id).unwrap_err();
    let elapsed = t.elapsed();
    let msg = e.to_string();
    eprintln!("{msg}");
    assert!(matches!(e, StoreError::GaveUp { .. }), "{msg}");
    assert!(
        msg.contains("gave up after 2.") && msg.contains(&id.to_hex()),
        "{msg}"
    );
    assert!(elapsed < Duration::from_millis(3500), "{elapsed:?}");

    server.restart();
    assert_eq!(s.get(&id).unwrap(), data);
}

/// Set in the environment of [`env_child`]'s process: the store location.
const CHILD_LOCATION: &str = "SMR_TEST_S3_CHILD_LOCATION";

#[test]
fn open_store_reads_the_aws_environment() {
    let Some(server) = S3Server::start() else {
        return;
    };
    // The environment is process-wide: run the check in a child process
    // (this test binary, running only `env_child`).
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["s3::env_child", "--exact", "--nocapture"])
        .env(CHILD_LOCATION, format!("s3://{BUCKET}/from-env"))
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT_URL", &server.endpoint)
        .env("AWS_ALLOW_HTTP", "true")
        .env("SMR_STORE_DEADLINE", "5")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("env_child: ok"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The child of [`open_store_reads_the_aws_environment`]; passes trivially
/// when run on its own.
#[test]
fn env_child() {
    let Ok(location) = std::env::var(CHILD_LOCATION) else {
        return;
    };
    let s = smr_store::open_store(&location).unwrap();
    assert_eq!(s.describe(), location);
    let (id, data) = chunk(4000);
    assert_eq!(s.put(&id, &data).unwrap(), smr_store::PutOutcome::Written);
    assert_eq!(s.get(&id).unwrap(), data);
    println!("env_child: ok");
}

/// The lease objects under `prefix/leases/` on the server's disk.
fn leases(server: &S3Server, prefix: &str) -> Vec<String> {
    let dir = server.object_path(&format!("{prefix}/leases"));
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n == "gc" || n.starts_with("writer-"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn writers_and_the_collector_exclude_each_other() {
    let Some(server) = S3Server::start() else {
        return;
    };
    let writer = store(&server, "gc", SECRET_KEY, 10.0);
    let (id, data) = chunk(1000);
    writer.put(&id, &data).unwrap();
    let held = leases(&server, "gc");
    assert!(
        held.len() == 1 && held[0].starts_with("writer-"),
        "{held:?}"
    );

    // A collection cannot start while a writer holds its lease.
    let collector = store(&server, "gc", SECRET_KEY, 10.0);
    let e = collector.begin_collection().unwrap_err();
    assert!(matches!(e, StoreError::Busy { .. }), "{e}");
    assert!(e.to_string().contains("being written by pid"), "{e}");
    assert_eq!(leases(&server, "gc"), held, "the collector stepped back");
    drop(writer);
    assert!(
        leases(&server, "gc").is_empty(),
        "the writer's lease is gone"
    );

    // While one runs, a writer waits for it to end.
    let lease = collector.begin_collection().unwrap();
    assert_eq!(leases(&server, "gc"), ["gc"]);
    let e = collector.begin_collection().unwrap_err();
    assert!(e.to_string().contains("another collection"), "{e}");
    let listed = collector.chunk_objects().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].id, listed[0].len), (id, data.len() as u64));
    let late = store(&server, "gc", SECRET_KEY, 10.0);
    let (id2, data2) = chunk(2000);
    let t = Instant::now();
    let put = std::thread::spawn(move || late.put(&id2, &data2).map(|_| late));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!put.is_finished(), "the writer waits for the collection");
    collector.delete_chunk(&id).unwrap();
    drop(lease);
    let late = put.join().unwrap().unwrap();
    assert!(t.elapsed() >= Duration::from_millis(1500));
    assert!(!late.exists(&id).unwrap() && late.exists(&id2).unwrap());
    drop(late);

    // A writer that died leaves a lease that goes stale: the next
    // collection removes it.
    let crashed = store(&server, "gc", SECRET_KEY, 10.0);
    crashed.put(&id, &data).unwrap();
    std::mem::forget(crashed);
    let stale = leases(&server, "gc");
    let path = server.object_path(&format!("gc/leases/{}", stale[0]));
    let old = std::time::SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let lease = collector.begin_collection().unwrap();
    assert_eq!(leases(&server, "gc"), ["gc"]);
    drop(lease);
}
