use std::time::Duration;

/// What went wrong with a transfer, in the terms a worker acts on.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TransferError {
    #[error("no transfer {transfer} is expected by the receiver")]
    UnknownTransfer { transfer: u64 },
    #[error("transfer {transfer} does not match what the receiver reserved: {reason}")]
    DescriptorMismatch { transfer: u64, reason: String },
    #[error("transfer {transfer}: {reason}")]
    InvalidPieces { transfer: u64, reason: String },
    #[error(
        "transfer {transfer} passed its deadline of {deadline:?} ({received} of {expected} pieces received)"
    )]
    DeadlineExceeded {
        transfer: u64,
        deadline: Duration,
        received: usize,
        expected: usize,
    },
    #[error(
        "transfer {transfer}: the peer disconnected after {received} of {expected} pieces ({reason})"
    )]
    PeerDisconnected {
        transfer: u64,
        received: usize,
        expected: usize,
        reason: String,
    },
    #[error("transfer {transfer} ended with {missing} pieces missing")]
    Incomplete { transfer: u64, missing: usize },
    #[error(
        "transfer {transfer}: checksum mismatch (sender {sent:#018x}, received {received:#018x})"
    )]
    ChecksumMismatch {
        transfer: u64,
        sent: u64,
        received: u64,
    },
    #[error("transfer {transfer}: writing into the reserved blocks failed: {reason}")]
    Sink { transfer: u64, reason: String },
    #[error("transfer {transfer} refused by the receiver: {reason}")]
    Refused { transfer: u64, reason: String },
    #[error("cannot connect to {peer}: {reason}")]
    Connect { peer: String, reason: String },
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("I/O: {0}")]
    Io(String),
    #[error("the receiver stopped before transfer {transfer} settled")]
    ReceiverStopped { transfer: u64 },
    #[error("a tokio runtime is needed: {0}")]
    NoRuntime(String),
}

impl TransferError {
    /// A short stable name for metrics labels and wire codes.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::UnknownTransfer { .. } => "unknown_transfer",
            Self::DescriptorMismatch { .. } => "descriptor_mismatch",
            Self::InvalidPieces { .. } => "invalid_pieces",
            Self::DeadlineExceeded { .. } => "deadline",
            Self::PeerDisconnected { .. } => "disconnected",
            Self::Incomplete { .. } => "incomplete",
            Self::ChecksumMismatch { .. } => "checksum",
            Self::Sink { .. } => "sink",
            Self::Refused { .. } => "refused",
            Self::Connect { .. } => "connect",
            Self::Tls(_) => "tls",
            Self::Io(_) => "io",
            Self::ReceiverStopped { .. } => "receiver_stopped",
            Self::NoRuntime(_) => "no_runtime",
        }
    }
}
