//! The daemon's own counters: snapshotter calls by operation and result,
//! with a latency histogram, and what the remote-snapshot path decided.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the latency buckets, seconds.
const BUCKETS: [f64; 10] = [0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// Counters of one daemon process.
#[derive(Default)]
pub struct Metrics {
    calls: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    latency: Mutex<BTreeMap<&'static str, Histogram>>,
    /// Layers committed as remote snapshots.
    pub remote_layers: AtomicU64,
    /// Layers with remote-snapshot labels that fell back to unpacking.
    pub fallbacks: AtomicU64,
    /// Inner layers of lazy images unpacked on their own.
    pub materialized: AtomicU64,
}

/// Writes the `# HELP` and `# TYPE` lines of metric `name`.
pub fn header(o: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Writes one histogram series of `name` with `labels` (`k="v",…`, without
/// braces): the cumulative `buckets` as (upper bound in seconds, count),
/// then `+Inf`, sum and count.
pub fn histogram(
    o: &mut String,
    name: &str,
    labels: &str,
    buckets: impl IntoIterator<Item = (f64, u64)>,
    count: u64,
    sum: f64,
) {
    for (le, n) in buckets {
        let _ = writeln!(o, "{name}_bucket{{{labels},le=\"{le}\"}} {n}");
    }
    let _ = writeln!(
        o,
        "{name}_bucket{{{labels},le=\"+Inf\"}} {count}\n{name}_sum{{{labels}}} {sum}\n{name}_count{{{labels}}} {count}"
    );
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Metrics {
    /// Records one call of `op` that ended with gRPC code `code`.
    pub fn observe(&self, op: &'static str, code: &'static str, took: Duration) {
        *lock(&self.calls).entry((op, code)).or_default() += 1;
        let mut l = lock(&self.latency);
        let h = l.entry(op).or_default();
        let s = took.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += s;
    }

    /// Appends the Prometheus text of these counters to `o`.
    pub fn write_prometheus(&self, o: &mut String) {
        header(
            o,
            "smr_snapshotter_calls_total",
            "Snapshotter calls by operation and gRPC code.",
            "counter",
        );
        for ((op, code), n) in lock(&self.calls).iter() {
            let _ = writeln!(
                o,
                "smr_snapshotter_calls_total{{op=\"{op}\",code=\"{code}\"}} {n}"
            );
        }
        let name = "smr_snapshotter_call_seconds";
        header(o, name, "Snapshotter call latency.", "histogram");
        for (op, h) in lock(&self.latency).iter() {
            let buckets = BUCKETS.iter().copied().zip(h.counts);
            histogram(o, name, &format!("op=\"{op}\""), buckets, h.count, h.sum);
        }
        for (name, help, v) in [
            (
                "smr_remote_layers_total",
                "Layers served lazily (remote snapshots).",
                &self.remote_layers,
            ),
            (
                "smr_fallbacks_total",
                "Layers unpacked by containerd: no lazy image.",
                &self.fallbacks,
            ),
            (
                "smr_materialized_layers_total",
                "Inner layers of lazy images unpacked on their own.",
                &self.materialized,
            ),
        ] {
            header(o, name, help, "counter");
            let _ = writeln!(o, "{name} {}", v.load(Ordering::Relaxed));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let m = Metrics::default();
        m.observe("prepare", "Ok", Duration::from_millis(2));
        m.observe("prepare", "AlreadyExists", Duration::from_secs(2));
        let mut o = String::new();
        m.write_prometheus(&mut o);
        assert!(
            o.contains("smr_snapshotter_calls_total{op=\"prepare\",code=\"Ok\"} 1"),
            "{o}"
        );
        assert!(
            o.contains("smr_snapshotter_call_seconds_bucket{op=\"prepare\",le=\"0.005\"} 1"),
            "{o}"
        );
        assert!(
            o.contains("smr_snapshotter_call_seconds_bucket{op=\"prepare\",le=\"5\"} 2"),
            "{o}"
        );
        assert!(
            o.contains("smr_snapshotter_call_seconds_count{op=\"prepare\"} 2"),
            "{o}"
        );
    }
}
