//! The live one-line status on a terminal: events/s, watermark lag, nodes per status.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::metrics::Metrics;

/// Renders one status line from two readings of the record counter `elapsed` apart.
pub fn render(
    records_now: u64,
    records_before: u64,
    elapsed: Duration,
    lag_ms: Option<i64>,
    nodes: [i64; 4],
) -> String {
    let rate = (records_now - records_before.min(records_now)) as f64 / elapsed.as_secs_f64().max(1e-3);
    let lag = lag_ms.map_or_else(|| "-".to_owned(), |ms| format!("{:.1}s", ms as f64 / 1000.0));
    format!(
        "{rate:>10.0} events/s | watermark lag {lag:>8} | healthy {} degraded {} unhealthy {} offline {} | {records_now} records",
        nodes[0], nodes[1], nodes[2], nodes[3]
    )
}

/// Spawns a thread that redraws the status line on standard error about once a second until
/// `stop` is set.
pub fn spawn(metrics: Arc<Metrics>, stop: Arc<AtomicBool>) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("edgeflow-status".into()).spawn(move || {
        let mut before = metrics.records_total.get();
        let mut at = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
            if at.elapsed() < Duration::from_secs(1) {
                continue;
            }
            let now = metrics.records_total.get();
            let line = render(now, before, at.elapsed(), metrics.max_watermark_lag(), metrics.node_counts());
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K{line}");
            let _ = err.flush();
            before = now;
            at = Instant::now();
        }
        let _ = writeln!(std::io::stderr());
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_rate_lag_and_counts() {
        let line = render(3000, 1000, Duration::from_secs(2), Some(1500), [5, 1, 0, 2]);
        assert!(line.contains("1000 events/s"), "{line}");
        assert!(line.contains("watermark lag     1.5s"), "{line}");
        assert!(line.contains("healthy 5 degraded 1 unhealthy 0 offline 2"), "{line}");
    }
}
