//! Moves a sequence's KV blocks from the worker that computed them to the worker
//! that will decode from them: the piece that makes prefill and decode separable.
//!
//! The receiver reserves blocks in its own pool first
//! ([`tandem_engine::engine::Engine::reserve_kv`]) and describes them in a
//! [`TransferDescriptor`]: which block ids, which layers, the data type, the bytes of
//! one block-layer piece, and the request they belong to. It registers the
//! descriptor with its [`KvReceiver`] and hands it to the sender out of band (the
//! prefill request). The sender opens a transfer over a [`Transport`] and writes
//! [`PieceBatch`]es (one layer of consecutive blocks each) as its prefill
//! completes them, then finishes with a checksum. The receiver copies each batch into
//! exactly the reserved blocks, checks that every piece arrived and that the checksum
//! matches, and only then hands the reservation back to be started; a stall past the
//! deadline, a disconnect, a bad checksum or a transfer nobody expects is an error on
//! both ends, and the reserved blocks are freed.
//!
//! Transports: [`quic`] (quinn, TLS 1.3 with mutual authentication from a cluster
//! CA; one connection per peer pair, one stream per transfer), [`shm`] (workers
//! on one host, in separate processes: a ring in shared memory per transfer
//! lane and a Unix socket for the frames; no crypto, no socket on the data
//! path) and [`local`] (an in-process channel, for engines in one process: no
//! encoding at all). RDMA fits the same [`Transport`] trait; see its
//! documentation.

mod descriptor;
mod error;
pub mod local;
mod metrics;
pub mod quic;
mod receiver;
pub mod shm;
pub mod tls;
mod transport;
mod wire;

pub use descriptor::{DType, PieceBatch, TransferDescriptor, piece_checksum};
pub use error::TransferError;
pub use metrics::{MetricsSnapshot, TransferMetrics};
pub use receiver::{BlockSink, KvReceiver, MemoryPool, PendingTransfer, TransferReport};
pub use transport::{Progress, Session, StreamWriter, TransferWriter, Transport, send_kv_stream};
pub use wire::ByteStream;
