//! The seam between a worker and the wire: open a session with a peer, open a
//! transfer on it, send pieces as they become ready, finish with a checksum.
//!
//! # How RDMA fits
//!
//! An RDMA transport implements the same three traits. At start the receiver
//! registers its whole block pool with the NIC once; the descriptor it hands
//! out then also names the pool's remote key and base address (the block ids
//! and the stable [`KvLayout`](tandem_engine::kv_cache::KvLayout) already give
//! every piece's offset: `block * block_bytes + layer * piece_bytes`).
//! `Transport::connect` sets up a queue pair with the peer; `Session::open`
//! sends nothing; `TransferWriter::send` posts one-sided RDMA WRITEs straight
//! from the sender's registered cache into those offsets, with no receiver CPU
//! in the path; `finish` waits for the writes' completions and sends one small
//! message (a WRITE with immediate data, or a SEND) carrying the checksum,
//! which the receiver verifies over the landed blocks before the reservation
//! is used. That is why the checksum is a sum over pieces, independent of the
//! order they land in, and why the receiver, not the sender, decides when
//! blocks are complete. Deadlines and the release of reserved blocks on
//! failure stay where they are, in [`KvReceiver`](crate::KvReceiver).

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use tandem_engine::engine::KvChunk;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::descriptor::add_batch_checksum;
use crate::wire::{self, ByteStream, StreamSource};
use crate::{
    KvReceiver, PieceBatch, TransferDescriptor, TransferError, TransferMetrics, TransferReport,
};

/// A way to reach peers.
pub trait Transport: Send + Sync {
    /// How a peer is named (an address, or an in-process receiver).
    type Peer: ?Sized + Sync;
    type Session: Session;
    /// A session with `peer`, reused for every transfer to it.
    fn connect(
        &self,
        peer: &Self::Peer,
    ) -> impl Future<Output = Result<Self::Session, TransferError>> + Send;
}

/// An established session with one peer; transfers on it run concurrently.
pub trait Session: Send + Sync {
    type Writer: TransferWriter + 'static;
    /// Opens one transfer into the blocks `desc` names.
    fn open(
        &self,
        desc: &TransferDescriptor,
    ) -> impl Future<Output = Result<Self::Writer, TransferError>> + Send;
}

/// The sending end of one transfer.
pub trait TransferWriter: Send {
    /// Sends one layer's pieces of consecutive blocks; waits while the peer's
    /// buffers are full (flow control), so nothing piles up on either side.
    fn send(&mut self, batch: PieceBatch)
    -> impl Future<Output = Result<(), TransferError>> + Send;
    /// Ends the transfer and waits for the receiver's verdict. The checksum
    /// sent is `source_checksum` if given (the sum of [`piece_checksum`](crate::piece_checksum)
    /// computed by the producer over its own memory, end to end), else the
    /// sum over the pieces as sent.
    fn finish(
        self,
        source_checksum: Option<u64>,
    ) -> impl Future<Output = Result<TransferReport, TransferError>> + Send;
    /// What has been sent so far.
    fn progress(&self) -> Progress;
}

/// How far a transfer has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub transfer_id: u64,
    pub pieces_sent: usize,
    pub pieces_total: usize,
    pub bytes_sent: u64,
}

/// Sender-side bookkeeping common to every transport.
pub(crate) struct Outgoing {
    pub desc: TransferDescriptor,
    pub checksum: u64,
    pub progress: Progress,
    pub started: Instant,
    pub metrics: Arc<TransferMetrics>,
}

impl Outgoing {
    pub fn new(desc: &TransferDescriptor, metrics: Arc<TransferMetrics>) -> Self {
        Self {
            desc: desc.clone(),
            checksum: 0,
            progress: Progress {
                transfer_id: desc.transfer_id,
                pieces_sent: 0,
                pieces_total: desc.pieces(),
                bytes_sent: 0,
            },
            started: Instant::now(),
            metrics,
        }
    }

    /// Checks a batch and accounts for it before it goes out.
    pub fn admit(&mut self, batch: &PieceBatch) -> Result<(), TransferError> {
        let count = self
            .desc
            .check(batch)
            .map_err(|reason| TransferError::InvalidPieces {
                transfer: self.desc.transfer_id,
                reason,
            })?;
        add_batch_checksum(&mut self.checksum, batch, self.desc.piece_bytes());
        self.progress.pieces_sent += count;
        self.progress.bytes_sent += batch.data.len() as u64;
        self.metrics.sent(batch.data.len() as u64);
        Ok(())
    }

    pub fn settle(
        &self,
        verdict: Result<u64, TransferError>,
    ) -> Result<TransferReport, TransferError> {
        match verdict {
            Ok(checksum) => {
                let duration = self.started.elapsed();
                self.metrics.send_done(duration);
                Ok(TransferReport {
                    transfer_id: self.desc.transfer_id,
                    bytes: self.progress.bytes_sent,
                    pieces: self.progress.pieces_sent,
                    blocks: self.desc.blocks.len() - self.desc.first_block,
                    duration,
                    checksum,
                })
            }
            Err(e) => {
                self.metrics.failed(&e);
                Err(e)
            }
        }
    }
}

/// A transfer over any ordered byte stream pair (a QUIC stream, or a TCP
/// connection in benchmarks).
pub struct StreamWriter<W, R> {
    writer: W,
    reader: R,
    out: Outgoing,
}

impl<W, R> StreamWriter<W, R>
where
    W: ByteStream,
    R: AsyncRead + Unpin + Send,
{
    /// Starts a transfer by writing its descriptor.
    pub async fn open(
        mut writer: W,
        reader: R,
        desc: &TransferDescriptor,
        metrics: Arc<TransferMetrics>,
    ) -> Result<Self, TransferError> {
        wire::write_header(&mut writer, desc).await?;
        Ok(Self {
            writer,
            reader,
            out: Outgoing::new(desc, metrics),
        })
    }

    /// After a failed write, the receiver's reason if it sent one.
    async fn why(&mut self, e: std::io::Error) -> TransferError {
        let id = self.out.desc.transfer_id;
        let verdict = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            wire::read_reply(&mut self.reader, id),
        )
        .await;
        let err = match verdict {
            Ok(Err(remote)) => remote,
            _ => TransferError::PeerDisconnected {
                transfer: id,
                received: 0,
                expected: self.out.progress.pieces_total,
                reason: e.to_string(),
            },
        };
        self.out.metrics.failed(&err);
        err
    }
}

impl<W, R> TransferWriter for StreamWriter<W, R>
where
    W: ByteStream,
    R: AsyncRead + Unpin + Send,
{
    async fn send(&mut self, batch: PieceBatch) -> Result<(), TransferError> {
        self.out.admit(&batch)?;
        if let Err(e) = wire::write_pieces(&mut self.writer, batch).await {
            return Err(self.why(e).await);
        }
        Ok(())
    }

    async fn finish(
        mut self,
        source_checksum: Option<u64>,
    ) -> Result<TransferReport, TransferError> {
        let checksum = source_checksum.unwrap_or(self.out.checksum);
        let sent = async {
            wire::write_end(&mut self.writer, checksum).await?;
            self.writer.shutdown().await
        }
        .await;
        if let Err(e) = sent {
            return Err(self.why(e).await);
        }
        let verdict = wire::read_reply(&mut self.reader, self.out.desc.transfer_id).await;
        self.out.settle(verdict)
    }

    fn progress(&self) -> Progress {
        self.out.progress
    }
}

impl KvReceiver {
    /// Receives one transfer from an ordered byte stream pair and answers the
    /// sender with the verdict.
    pub async fn serve_stream<R, W>(
        &self,
        reader: R,
        mut writer: W,
    ) -> Result<TransferReport, TransferError>
    where
        R: AsyncRead + Unpin + Send,
        W: AsyncWrite + Unpin + Send,
    {
        let result = self.serve(StreamSource { reader }).await;
        let verdict = result.as_ref().map(|r| r.checksum).map_err(Clone::clone);
        if let Err(e) = wire::write_reply(&mut writer, &verdict).await {
            tracing::debug!(error = %e, "the sender left before the verdict");
        }
        result
    }
}

/// Sends a prompt's KV as the engine produces it (a [`KvStream`](tandem_engine::engine::KvStream)'s
/// receiving end), layer by layer, then finishes once every block of the
/// descriptor is out. Fails without finishing if
/// the stream ends before every block of the descriptor went out (the prefill
/// was cancelled), so the receiver never sees an end frame for partial KV.
pub async fn send_kv_stream<W: TransferWriter>(
    mut writer: W,
    mut chunks: UnboundedReceiver<KvChunk>,
) -> Result<TransferReport, TransferError> {
    // Finish as soon as the last block is out: the engine keeps the stream
    // open while the sequence goes on decoding.
    while writer.progress().pieces_sent < writer.progress().pieces_total {
        let Some(chunk) = chunks.recv().await else {
            break;
        };
        writer
            .send(PieceBatch {
                layer: chunk.layer as u32,
                first_block: chunk.first_block as u32,
                data: chunk.data,
            })
            .await?;
    }
    let p = writer.progress();
    if p.pieces_sent < p.pieces_total {
        return Err(TransferError::Incomplete {
            transfer: p.transfer_id,
            missing: p.pieces_total - p.pieces_sent,
        });
    }
    writer.finish(None).await
}
