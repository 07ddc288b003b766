//! The same-host path: sender and receiver in one process (a prefill and a
//! decode engine side by side) exchange frames over a bounded in-process
//! channel. Batches move by ownership: no socket, no encoding, no crypto; the
//! one copy is the receiver's into its reserved blocks.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::transport::Outgoing;
use crate::wire::{Frame, FrameSource};
use crate::{
    KvReceiver, PieceBatch, Progress, Session, TransferDescriptor, TransferError, TransferMetrics,
    TransferReport, TransferWriter, Transport,
};

/// Batches in flight per transfer: the bound on what the channel holds.
const FRAMES_IN_FLIGHT: usize = 4;

/// Transfers to receivers in this process.
#[derive(Debug, Clone)]
pub struct LocalTransport {
    metrics: Arc<TransferMetrics>,
}

impl LocalTransport {
    /// A transport counting sends into `metrics`.
    pub fn new(metrics: Arc<TransferMetrics>) -> Self {
        Self { metrics }
    }
}

impl Transport for LocalTransport {
    type Peer = Arc<KvReceiver>;
    type Session = LocalSession;

    async fn connect(&self, peer: &Arc<KvReceiver>) -> Result<LocalSession, TransferError> {
        Ok(LocalSession {
            receiver: peer.clone(),
            metrics: self.metrics.clone(),
        })
    }
}

/// A session with an in-process receiver.
#[derive(Debug, Clone)]
pub struct LocalSession {
    receiver: Arc<KvReceiver>,
    metrics: Arc<TransferMetrics>,
}

impl Session for LocalSession {
    type Writer = LocalWriter;

    async fn open(&self, desc: &TransferDescriptor) -> Result<LocalWriter, TransferError> {
        let (tx, rx) = mpsc::channel(FRAMES_IN_FLIGHT);
        let (verdict_tx, verdict) = oneshot::channel();
        let receiver = self.receiver.clone();
        tokio::spawn(async move {
            let result = receiver.serve(ChannelSource { rx }).await;
            let _ = verdict_tx.send(result.map(|r| r.checksum));
        });
        tx.send(Frame::Header(desc.clone()))
            .await
            .map_err(|_| TransferError::ReceiverStopped {
                transfer: desc.transfer_id,
            })?;
        Ok(LocalWriter {
            tx,
            verdict,
            out: Outgoing::new(desc, self.metrics.clone()),
        })
    }
}

struct ChannelSource {
    rx: mpsc::Receiver<Frame>,
}

impl FrameSource for ChannelSource {
    async fn next(&mut self, _desc: Option<&TransferDescriptor>) -> Result<Option<Frame>, String> {
        match self.rx.recv().await {
            Some(f) => Ok(Some(f)),
            None => Err("the sender went away".into()),
        }
    }
}

/// The sending end of a local transfer.
pub struct LocalWriter {
    tx: mpsc::Sender<Frame>,
    verdict: oneshot::Receiver<Result<u64, TransferError>>,
    out: Outgoing,
}

impl LocalWriter {
    async fn why(self) -> TransferError {
        let id = self.out.desc.transfer_id;
        let e = match self.verdict.await {
            Ok(Err(e)) => e,
            _ => TransferError::ReceiverStopped { transfer: id },
        };
        self.out.metrics.failed(&e);
        e
    }

    async fn push(&mut self, frame: Frame) -> Result<(), ()> {
        self.tx.send(frame).await.map_err(|_| ())
    }
}

impl TransferWriter for LocalWriter {
    async fn send(&mut self, batch: PieceBatch) -> Result<(), TransferError> {
        self.out.admit(&batch)?;
        if self.push(Frame::Pieces(batch)).await.is_err() {
            // The receiver has stopped reading: it failed the transfer. Take
            // the verdict out without consuming the writer.
            let (_, dummy) = oneshot::channel();
            let verdict = std::mem::replace(&mut self.verdict, dummy);
            let id = self.out.desc.transfer_id;
            let e = match verdict.await {
                Ok(Err(e)) => e,
                _ => TransferError::ReceiverStopped { transfer: id },
            };
            self.out.metrics.failed(&e);
            return Err(e);
        }
        Ok(())
    }

    async fn finish(
        mut self,
        source_checksum: Option<u64>,
    ) -> Result<TransferReport, TransferError> {
        let checksum = source_checksum.unwrap_or(self.out.checksum);
        if self.push(Frame::End { checksum }).await.is_err() {
            return Err(self.why().await);
        }
        let verdict = match (&mut self.verdict).await {
            Ok(v) => v,
            Err(_) => Err(TransferError::ReceiverStopped {
                transfer: self.out.desc.transfer_id,
            }),
        };
        self.out.settle(verdict)
    }

    fn progress(&self) -> Progress {
        self.out.progress
    }
}
