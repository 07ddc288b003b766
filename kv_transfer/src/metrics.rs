//! Counters a worker exposes for its transfers.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::Serialize;

use crate::TransferError;

/// Transfer counters, shared by a worker's senders and receiver.
#[derive(Debug, Default)]
pub struct TransferMetrics {
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    pieces_received: AtomicU64,
    blocks_received: AtomicU64,
    transfers_sent: AtomicU64,
    shm_transfers_sent: AtomicU64,
    transfers_received: AtomicU64,
    receive_micros: AtomicU64,
    send_micros: AtomicU64,
    failures: [AtomicU64; FAILURE_KINDS.len()],
    handshake_failures: AtomicU64,
}

const FAILURE_KINDS: [&str; 8] = [
    "unknown_transfer",
    "descriptor_mismatch",
    "invalid_pieces",
    "deadline",
    "disconnected",
    "incomplete",
    "checksum",
    "other",
];

/// A point-in-time copy of the counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MetricsSnapshot {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub pieces_received: u64,
    pub blocks_received: u64,
    pub transfers_sent: u64,
    /// Of those, the ones through shared memory on this host.
    pub shm_transfers_sent: u64,
    pub transfers_received: u64,
    pub receive_seconds_total: f64,
    pub send_seconds_total: f64,
    /// Failed transfers on either side, by kind.
    pub failures: Vec<(String, u64)>,
    /// Peers refused during the TLS handshake.
    pub handshake_failures: u64,
}

impl TransferMetrics {
    pub(crate) fn sent(&self, bytes: u64) {
        self.bytes_sent.fetch_add(bytes, Relaxed);
    }

    pub(crate) fn send_done(&self, took: Duration) {
        self.transfers_sent.fetch_add(1, Relaxed);
        self.send_micros.fetch_add(took.as_micros() as u64, Relaxed);
    }

    pub(crate) fn sent_through_shm(&self) {
        self.shm_transfers_sent.fetch_add(1, Relaxed);
    }

    pub(crate) fn received(&self, bytes: u64, pieces: u64) {
        self.bytes_received.fetch_add(bytes, Relaxed);
        self.pieces_received.fetch_add(pieces, Relaxed);
    }

    pub(crate) fn receive_done(&self, blocks: u64, took: Duration) {
        self.transfers_received.fetch_add(1, Relaxed);
        self.blocks_received.fetch_add(blocks, Relaxed);
        self.receive_micros
            .fetch_add(took.as_micros() as u64, Relaxed);
    }

    pub(crate) fn failed(&self, e: &TransferError) {
        let i = FAILURE_KINDS
            .iter()
            .position(|k| *k == e.kind())
            .unwrap_or(FAILURE_KINDS.len() - 1);
        self.failures[i].fetch_add(1, Relaxed);
    }

    pub(crate) fn handshake_failed(&self) {
        self.handshake_failures.fetch_add(1, Relaxed);
    }

    /// Failed transfers of one kind (see [`TransferError::kind`]).
    pub fn failures(&self, kind: &str) -> u64 {
        FAILURE_KINDS
            .iter()
            .position(|k| *k == kind)
            .map_or(0, |i| self.failures[i].load(Relaxed))
    }

    /// Copies the counters.
    pub fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            bytes_sent: self.bytes_sent.load(Relaxed),
            bytes_received: self.bytes_received.load(Relaxed),
            pieces_received: self.pieces_received.load(Relaxed),
            blocks_received: self.blocks_received.load(Relaxed),
            transfers_sent: self.transfers_sent.load(Relaxed),
            shm_transfers_sent: self.shm_transfers_sent.load(Relaxed),
            transfers_received: self.transfers_received.load(Relaxed),
            receive_seconds_total: self.receive_micros.load(Relaxed) as f64 / 1e6,
            send_seconds_total: self.send_micros.load(Relaxed) as f64 / 1e6,
            failures: FAILURE_KINDS
                .iter()
                .zip(&self.failures)
                .map(|(k, c)| (k.to_string(), c.load(Relaxed)))
                .collect(),
            handshake_failures: self.handshake_failures.load(Relaxed),
        }
    }

    /// The counters in Prometheus text format.
    pub fn render_prometheus(&self) -> String {
        use std::fmt::Write;
        let s = self.snapshot();
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        counter(
            "tandem_kv_transfer_sent_bytes_total",
            "KV bytes sent.",
            s.bytes_sent.to_string(),
        );
        counter(
            "tandem_kv_transfer_received_bytes_total",
            "KV bytes received into reserved blocks.",
            s.bytes_received.to_string(),
        );
        counter(
            "tandem_kv_transfer_received_pieces_total",
            "Block-layer pieces received into reserved blocks.",
            s.pieces_received.to_string(),
        );
        counter(
            "tandem_kv_transfer_received_blocks_total",
            "KV blocks received by completed transfers.",
            s.blocks_received.to_string(),
        );
        counter(
            "tandem_kv_transfer_sent_transfers_total",
            "Transfers sent and confirmed by the receiver.",
            s.transfers_sent.to_string(),
        );
        counter(
            "tandem_kv_transfer_shm_sent_transfers_total",
            "Transfers sent through shared memory to a worker on this host.",
            s.shm_transfers_sent.to_string(),
        );
        counter(
            "tandem_kv_transfer_received_transfers_total",
            "Transfers received complete.",
            s.transfers_received.to_string(),
        );
        counter(
            "tandem_kv_transfer_receive_seconds_total",
            "Time from a transfer's first byte to its verified end, summed.",
            s.receive_seconds_total.to_string(),
        );
        counter(
            "tandem_kv_transfer_send_seconds_total",
            "Time from opening a transfer to its confirmation, summed.",
            s.send_seconds_total.to_string(),
        );
        counter(
            "tandem_kv_transfer_handshake_failures_total",
            "Peers refused during the TLS handshake.",
            s.handshake_failures.to_string(),
        );
        let _ = writeln!(
            out,
            "# HELP tandem_kv_transfer_failures_total Failed transfers by kind.\n# TYPE tandem_kv_transfer_failures_total counter"
        );
        for (kind, n) in &s.failures {
            let _ = writeln!(
                out,
                "tandem_kv_transfer_failures_total{{kind=\"{kind}\"}} {n}"
            );
        }
        out
    }
}
