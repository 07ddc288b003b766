//! The receiving side, common to every transport: expected transfers, their
//! deadlines, and the checks before anything written is handed back.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tandem_engine::engine::KvReservation;
use tandem_engine::kv_cache::{BlockId, KvLayout};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::descriptor::add_batch_checksum;
use crate::wire::{Frame, FrameSource};
use crate::{PieceBatch, TransferDescriptor, TransferError, TransferMetrics};

/// Where a transfer's pieces land: the reserved blocks of an engine, or plain
/// memory. Dropping a sink that was not handed back must free what it holds.
pub trait BlockSink: Send + 'static {
    /// Writes `layer`'s pieces of consecutive blocks from sequence index `first_block`.
    fn write(
        &mut self,
        layer: usize,
        first_block: usize,
        data: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>>;
}

impl BlockSink for KvReservation {
    fn write(
        &mut self,
        layer: usize,
        first_block: usize,
        data: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            KvReservation::write(self, layer, first_block, data)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

/// A pool of blocks in plain memory, laid out like the engine's cache: the
/// sink for benchmarks and tests that need no model.
#[derive(Debug, Clone)]
pub struct MemoryPool {
    pub layout: KvLayout,
    pub data: Vec<u8>,
    /// Pool block id of each sequence block.
    pub blocks: Vec<BlockId>,
}

impl MemoryPool {
    /// A zeroed pool of `num_blocks` blocks whose sequence blocks are `blocks`.
    pub fn new(layout: KvLayout, num_blocks: usize, blocks: Vec<BlockId>) -> Self {
        Self {
            layout,
            data: vec![0; num_blocks * layout.block_bytes()],
            blocks,
        }
    }

    /// The bytes of one block-layer piece.
    pub fn piece(&self, block: BlockId, layer: usize) -> &[u8] {
        let start = block as usize * self.layout.block_bytes() + layer * self.layout.piece_bytes();
        &self.data[start..start + self.layout.piece_bytes()]
    }
}

impl BlockSink for MemoryPool {
    fn write(
        &mut self,
        layer: usize,
        first_block: usize,
        data: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        let pb = self.layout.piece_bytes();
        let bb = self.layout.block_bytes();
        let mut result = Ok(());
        for (i, piece) in data.chunks_exact(pb).enumerate() {
            let Some(&b) = self.blocks.get(first_block + i) else {
                result = Err(format!("block index {} outside the pool", first_block + i));
                break;
            };
            let start = b as usize * bb + layer * pb;
            match self.data.get_mut(start..start + pb) {
                Some(dst) => dst.copy_from_slice(piece),
                None => {
                    result = Err(format!("block id {b} outside the pool"));
                    break;
                }
            }
        }
        Box::pin(std::future::ready(result))
    }
}

/// A sink whose concrete type can be recovered once the transfer succeeds.
trait ErasedSink: BlockSink {
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
}

impl<T: BlockSink> ErasedSink for T {
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

/// What a completed transfer moved.
#[derive(Debug, Clone, PartialEq)]
pub struct TransferReport {
    pub transfer_id: u64,
    pub bytes: u64,
    pub pieces: usize,
    pub blocks: usize,
    /// From the first frame to the verified end, on the side that reports it.
    pub duration: Duration,
    pub checksum: u64,
}

type Outcome = Result<(Box<dyn Any + Send>, TransferReport), TransferError>;

struct Expected {
    desc: TransferDescriptor,
    sink: Box<dyn ErasedSink>,
    deadline: Instant,
    budget: Duration,
    result: oneshot::Sender<Outcome>,
}

/// The transfers a worker expects, shared by every transport it listens on.
///
/// A transfer is registered with [`KvReceiver::expect`] before the sender is
/// told where to write. When the sender opens it, the receiver checks the
/// descriptor, copies each batch into the sink, and when the end frame comes,
/// checks that every piece arrived exactly once and that the checksum
/// matches. Only then is the sink handed back through the
/// [`PendingTransfer`]; on any failure it is dropped (freeing the blocks) and
/// the error goes both to the pending transfer and to the sender.
pub struct KvReceiver {
    expected: Mutex<HashMap<u64, Expected>>,
    metrics: Arc<TransferMetrics>,
    me: Weak<KvReceiver>,
}

impl std::fmt::Debug for KvReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvReceiver")
            .field("pending", &self.pending())
            .finish()
    }
}

impl KvReceiver {
    /// A receiver counting into `metrics`.
    pub fn new(metrics: Arc<TransferMetrics>) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            expected: Mutex::new(HashMap::new()),
            metrics,
            me: me.clone(),
        })
    }

    /// The counters this receiver updates.
    pub fn metrics(&self) -> &Arc<TransferMetrics> {
        &self.metrics
    }

    /// Transfers expected and not yet settled.
    pub fn pending(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Expected>> {
        self.expected.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Expects the transfer `desc` into `sink`, to be complete within `deadline`
    /// from now. Must be called inside a tokio runtime (a timer frees the sink
    /// if the sender never comes).
    pub fn expect<S: BlockSink>(
        &self,
        desc: TransferDescriptor,
        sink: S,
        deadline: Duration,
    ) -> Result<PendingTransfer<S>, TransferError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| TransferError::NoRuntime(e.to_string()))?;
        let id = desc.transfer_id;
        let (tx, rx) = oneshot::channel();
        let at = Instant::now() + deadline;
        let previous = self.lock().insert(
            id,
            Expected {
                desc,
                sink: Box::new(sink),
                deadline: at,
                budget: deadline,
                result: tx,
            },
        );
        if let Some(p) = previous {
            let e = TransferError::DescriptorMismatch {
                transfer: id,
                reason: "expected again before it settled".into(),
            };
            self.fail(p, e);
        }
        let me = self.me.clone();
        runtime.spawn(async move {
            tokio::time::sleep_until(at).await;
            let Some(receiver) = me.upgrade() else { return };
            // Still unclaimed: the sender never opened the transfer.
            let unclaimed = receiver.lock().remove(&id);
            if let Some(exp) = unclaimed {
                let e = TransferError::DeadlineExceeded {
                    transfer: id,
                    deadline: exp.budget,
                    received: 0,
                    expected: exp.desc.pieces(),
                };
                receiver.fail(exp, e);
            }
        });
        Ok(PendingTransfer {
            transfer_id: id,
            rx,
            _sink: PhantomData,
        })
    }

    /// Frees the sink, then reports the failure.
    fn fail(&self, exp: Expected, e: TransferError) {
        tracing::warn!(transfer = exp.desc.transfer_id, error = %e, "KV transfer failed");
        self.metrics.failed(&e);
        let Expected { sink, result, .. } = exp;
        drop(sink);
        // The caller may have stopped waiting; the blocks are freed either way.
        let _ = result.send(Err(e));
    }

    /// Receives one transfer from `src` (a transport's stream); the result is
    /// what the sender is told.
    pub(crate) async fn serve<F: FrameSource>(
        &self,
        mut src: F,
    ) -> Result<TransferReport, TransferError> {
        let started = Instant::now();
        let header = match src.next(None).await {
            Ok(Some(Frame::Header(d))) => d,
            Ok(_) => {
                let e = TransferError::InvalidPieces {
                    transfer: 0,
                    reason: "a transfer must start with its descriptor".into(),
                };
                self.metrics.failed(&e);
                return Err(e);
            }
            Err(reason) => {
                let e = TransferError::PeerDisconnected {
                    transfer: 0,
                    received: 0,
                    expected: 0,
                    reason,
                };
                self.metrics.failed(&e);
                return Err(e);
            }
        };
        let id = header.transfer_id;
        let Some(mut exp) = self.lock().remove(&id) else {
            let e = TransferError::UnknownTransfer { transfer: id };
            tracing::warn!(transfer = id, "KV transfer for nothing reserved refused");
            self.metrics.failed(&e);
            return Err(e);
        };
        if let Err(reason) = exp.desc.matches(&header) {
            let e = TransferError::DescriptorMismatch {
                transfer: id,
                reason,
            };
            self.fail(exp, e.clone());
            return Err(e);
        }
        let mut state = Incoming::new(&exp.desc);
        let body = state.receive(&mut src, &exp.desc, exp.sink.as_mut(), &self.metrics);
        let outcome = match tokio::time::timeout_at(exp.deadline, body).await {
            Ok(r) => r,
            Err(_) => Err(TransferError::DeadlineExceeded {
                transfer: id,
                deadline: exp.budget,
                received: state.received,
                expected: exp.desc.pieces(),
            }),
        };
        match outcome {
            Ok(checksum) => {
                let report = TransferReport {
                    transfer_id: id,
                    bytes: exp.desc.bytes(),
                    pieces: exp.desc.pieces(),
                    blocks: exp.desc.blocks.len() - exp.desc.first_block,
                    duration: started.elapsed(),
                    checksum,
                };
                self.metrics
                    .receive_done(report.blocks as u64, report.duration);
                let Expected { sink, result, .. } = exp;
                if result.send(Ok((sink.into_any(), report.clone()))).is_err() {
                    tracing::debug!(transfer = id, "KV transfer landed after its waiter left");
                }
                Ok(report)
            }
            Err(e) => {
                self.fail(exp, e.clone());
                Err(e)
            }
        }
    }
}

/// Progress of one incoming transfer.
struct Incoming {
    /// Per piece (`(block - first_block) * n_layers + layer`): arrived yet.
    seen: Vec<bool>,
    received: usize,
    checksum: u64,
}

impl Incoming {
    fn new(desc: &TransferDescriptor) -> Self {
        Self {
            seen: vec![false; desc.pieces()],
            received: 0,
            checksum: 0,
        }
    }

    /// Reads frames into the sink until a verified end; returns the checksum.
    async fn receive<F: FrameSource>(
        &mut self,
        src: &mut F,
        desc: &TransferDescriptor,
        sink: &mut dyn ErasedSink,
        metrics: &TransferMetrics,
    ) -> Result<u64, TransferError> {
        let id = desc.transfer_id;
        let invalid = |reason: String| TransferError::InvalidPieces {
            transfer: id,
            reason,
        };
        loop {
            let frame = match src.next(Some(desc)).await {
                Ok(Some(f)) => f,
                Ok(None) => {
                    return Err(self.disconnected(desc, "stream ended before the end frame"));
                }
                Err(reason) => return Err(self.disconnected(desc, &reason)),
            };
            match frame {
                Frame::Header(_) => return Err(invalid("a second descriptor".into())),
                Frame::Pieces(batch) => {
                    let count = desc.check(&batch).map_err(invalid)?;
                    self.mark(desc, &batch, count).map_err(invalid)?;
                    add_batch_checksum(&mut self.checksum, &batch, desc.piece_bytes());
                    metrics.received(batch.data.len() as u64, count as u64);
                    let PieceBatch {
                        layer,
                        first_block,
                        data,
                    } = batch;
                    sink.write(layer as usize, first_block as usize, data)
                        .await
                        .map_err(|reason| TransferError::Sink {
                            transfer: id,
                            reason,
                        })?;
                }
                Frame::End { checksum } => {
                    let missing = self.seen.len() - self.received;
                    if missing > 0 {
                        return Err(TransferError::Incomplete {
                            transfer: id,
                            missing,
                        });
                    }
                    if checksum != self.checksum {
                        return Err(TransferError::ChecksumMismatch {
                            transfer: id,
                            sent: checksum,
                            received: self.checksum,
                        });
                    }
                    return Ok(self.checksum);
                }
            }
        }
    }

    fn mark(
        &mut self,
        desc: &TransferDescriptor,
        batch: &PieceBatch,
        count: usize,
    ) -> Result<(), String> {
        let n_layers = desc.layout.n_layers;
        for i in 0..count {
            let block = batch.first_block as usize + i;
            let slot = (block - desc.first_block) * n_layers + batch.layer as usize;
            let seen = &mut self.seen[slot];
            if *seen {
                return Err(format!("block {block} layer {} written twice", batch.layer));
            }
            *seen = true;
            self.received += 1;
        }
        Ok(())
    }

    fn disconnected(&self, desc: &TransferDescriptor, reason: &str) -> TransferError {
        TransferError::PeerDisconnected {
            transfer: desc.transfer_id,
            received: self.received,
            expected: self.seen.len(),
            reason: reason.to_string(),
        }
    }
}

/// A transfer the receiver waits for; resolves when it is complete and
/// verified (handing the sink back) or has failed (the sink is freed).
#[derive(Debug)]
pub struct PendingTransfer<S> {
    pub transfer_id: u64,
    rx: oneshot::Receiver<Outcome>,
    _sink: PhantomData<fn() -> S>,
}

impl<S: BlockSink> PendingTransfer<S> {
    /// Waits for the outcome; the deadline given to `expect` bounds the wait.
    pub async fn wait(self) -> Result<(S, TransferReport), TransferError> {
        let id = self.transfer_id;
        match self.rx.await {
            Ok(Ok((sink, report))) => match sink.downcast::<S>() {
                Ok(s) => Ok((*s, report)),
                Err(_) => Err(TransferError::ReceiverStopped { transfer: id }),
            },
            Ok(Err(e)) => Err(e),
            Err(_) => Err(TransferError::ReceiverStopped { transfer: id }),
        }
    }
}
