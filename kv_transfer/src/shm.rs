//! The same-host path between processes: a prefill and a decode worker on one
//! machine hand KV over shared memory, with no sockets on the data path and no
//! crypto.
//!
//! The receiver listens on a Unix domain socket ([`ShmListener`]). A sender
//! opens *lanes* to it: a lane is one socket connection plus a ring of
//! [`RING_BYTES`] in a shared-memory file that the sender creates (mode 0600,
//! in `/dev/shm`), the receiver maps read-only, and the sender unlinks as soon
//! as both have it mapped, so nothing is left behind if either dies. A lane
//! carries one transfer at a time; concurrent transfers to one peer take
//! separate lanes, and a lane that ended its transfer cleanly is kept for the
//! next one, its ring already faulted in.
//!
//! For each batch the sender copies the bytes into the ring and sends a small
//! frame naming where they are; the receiver copies them out into the
//! reserved blocks and hands the space back with a credit. The sender waits
//! for credits when the ring is full: that is the flow control, and no side
//! buffers more than the ring. On the socket, little-endian:
//!
//! ```text
//! lane    "TSHM" | u64 ring_len | u16 len | path of the ring file   (sender)
//!         0x00 | 0x01 u32 len reason                                (receiver)
//! then per transfer, sender to receiver:
//! header  as on a byte stream (see the wire module)
//! pieces  0x01 | u32 layer | u32 first_block | u64 len | u64 pos   (bytes at pos mod ring_len)
//! end     0x02 | u64 checksum
//! and receiver to sender:
//! credit  0x10 | u64 pos      -- every ring byte before pos is free again
//! verdict as on a byte stream, without closing the lane
//! ```
//!
//! Both ends are the same user on the same machine (the socket is 0600); the
//! receiver still checks every offset and length against its own mapping and
//! the descriptor, and maps only files named like a ring in the shared-memory
//! directory.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering, fence};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use memmap2::{MmapOptions, MmapRaw};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};

use crate::transport::Outgoing;
use crate::wire::{self, Frame, FrameHead, FrameSource, StreamSource, TAG_PIECES, read_frame_head};
use crate::{
    KvReceiver, PieceBatch, Progress, Session, TransferDescriptor, TransferError, TransferMetrics,
    TransferReport, TransferWriter, Transport,
};

/// Bytes of one lane's ring (a batch larger than half of it goes in parts).
pub const RING_BYTES: usize = 16 << 20;
/// The largest ring a receiver maps (a layout whose pieces need more is refused).
const MAX_RING_BYTES: u64 = 1 << 30;
/// Lanes a sender keeps open per peer between transfers.
const IDLE_LANES: usize = 4;
const HELLO: &[u8; 4] = b"TSHM";
const TAG_CREDIT: u8 = 0x10;
/// Ring files are named `tandem-kv-*` in [`shm_dir`].
const RING_PREFIX: &str = "tandem-kv-";

/// Where ring files live: `/dev/shm` (memory, never written back to a disk)
/// where it exists, else the temporary directory.
fn shm_dir() -> PathBuf {
    let dev_shm = Path::new("/dev/shm");
    if dev_shm.is_dir() {
        dev_shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// This machine's identity for deciding whether a peer is on the same host:
/// the kernel's boot id and the host name. Two containers on one node share
/// the boot id but not the host name (nor, usually, a socket path), so they
/// take the network path.
pub fn host_id() -> String {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    format!(
        "{}/{}",
        read("/proc/sys/kernel/random/boot_id"),
        read("/proc/sys/kernel/hostname")
    )
}

fn io_err(what: &str) -> impl Fn(std::io::Error) -> TransferError + '_ {
    move |e| TransferError::Io(format!("{what}: {e}"))
}

/// A receiver's Unix socket: serves every lane a sender opens on it.
pub struct ShmListener {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for ShmListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmListener")
            .field("path", &self.path)
            .finish()
    }
}

impl ShmListener {
    /// Listens on the Unix socket `path` for transfers into `receiver`. A
    /// stale socket left there by a process that died is replaced; any other
    /// file is an error.
    pub fn bind(
        path: impl Into<PathBuf>,
        receiver: Arc<KvReceiver>,
    ) -> Result<Self, TransferError> {
        let path = path.into();
        let shown = path.display().to_string();
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            if !meta.file_type().is_socket() {
                return Err(TransferError::Io(format!(
                    "{shown} exists and is not a socket"
                )));
            }
            std::fs::remove_file(&path).map_err(io_err(&shown))?;
        }
        let listener = UnixListener::bind(&path).map_err(io_err(&shown))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err(&shown))?;
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        tokio::spawn(serve_lane(stream, receiver.clone()));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a KV lane failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        Ok(Self { path, task })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ShmListener {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The receiving end of one lane.
struct LaneSource {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    ring: MmapRaw,
}

impl LaneSource {
    /// Reads the sender's hello and maps its ring.
    async fn accept(stream: UnixStream) -> Result<Self, String> {
        let (r, mut writer) = stream.into_split();
        let mut reader = BufReader::new(r);
        let mapped = Self::map_ring(&mut reader).await;
        let mut reply = Vec::new();
        match &mapped {
            Ok(_) => reply.push(0),
            Err(reason) => {
                reply.push(1);
                reply.extend_from_slice(&(reason.len() as u32).to_le_bytes());
                reply.extend_from_slice(reason.as_bytes());
            }
        }
        writer.write_all(&reply).await.map_err(|e| e.to_string())?;
        Ok(Self {
            reader,
            writer,
            ring: mapped?,
        })
    }

    async fn map_ring(reader: &mut BufReader<OwnedReadHalf>) -> Result<MmapRaw, String> {
        let mut hello = [0u8; 4];
        reader
            .read_exact(&mut hello)
            .await
            .map_err(|e| e.to_string())?;
        if &hello != HELLO {
            return Err("not a tandem KV lane".into());
        }
        let len = reader.read_u64_le().await.map_err(|e| e.to_string())?;
        let name_len = reader.read_u16_le().await.map_err(|e| e.to_string())?;
        let mut name = vec![0; name_len.into()];
        reader
            .read_exact(&mut name)
            .await
            .map_err(|e| e.to_string())?;
        if len == 0 || len > MAX_RING_BYTES {
            return Err(format!("a ring of {len} bytes"));
        }
        let path = PathBuf::from(String::from_utf8(name).map_err(|e| e.to_string())?);
        let named_like_a_ring = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(RING_PREFIX));
        if path.parent() != Some(shm_dir().as_path()) || !named_like_a_ring {
            return Err(format!("{} is not a KV ring file", path.display()));
        }
        let file = OpenOptions::new()
            .read(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let size = file.metadata().map_err(|e| e.to_string())?.len();
        if size != len {
            return Err(format!(
                "{} holds {size} bytes, not the {len} announced",
                path.display()
            ));
        }
        MmapOptions::new()
            .len(len as usize)
            .map_raw_read_only(&file)
            .map_err(|e| format!("mapping {}: {e}", path.display()))
    }

    /// Copies `len` bytes at ring position `pos` out, and frees their space.
    async fn take(&mut self, pos: u64, len: u64, limit: u64) -> Result<Vec<u8>, String> {
        let ring_len = self.ring.len() as u64;
        let offset = pos % ring_len;
        // Never trust the sender with our memory: the range must lie in the ring.
        if len > limit || offset + len > ring_len {
            return Err(format!(
                "a batch of {len} bytes at ring offset {offset} (ring of {ring_len}, transfer of {limit})"
            ));
        }
        // Not zeroed first: every byte is copied in below.
        let mut data = Vec::<u8>::with_capacity(len as usize);
        // The sender wrote these bytes before sending the frame we just read.
        fence(Ordering::Acquire);
        // SAFETY: `offset + len` is within the mapping (checked above), the
        // mapping lives as long as `self`, and `data` has room for `len`
        // bytes, all of which are written before `set_len`. The sender writes
        // only ring space it holds no credit for, which this range is until
        // the credit below is sent.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ring.as_ptr().add(offset as usize),
                data.as_mut_ptr(),
                len as usize,
            );
            data.set_len(len as usize);
        }
        let mut credit = [0u8; 9];
        credit[0] = TAG_CREDIT;
        credit[1..].copy_from_slice(&(pos + len).to_le_bytes());
        self.writer
            .write_all(&credit)
            .await
            .map_err(|e| e.to_string())?;
        Ok(data)
    }
}

impl FrameSource for &mut LaneSource {
    async fn next(&mut self, desc: Option<&TransferDescriptor>) -> Result<Option<Frame>, String> {
        let Some(desc) = desc else {
            return StreamSource {
                reader: &mut self.reader,
            }
            .next(None)
            .await;
        };
        match read_frame_head(&mut self.reader).await? {
            None => Ok(None),
            Some(FrameHead::End { checksum }) => Ok(Some(Frame::End { checksum })),
            Some(FrameHead::Pieces {
                layer,
                first_block,
                len,
            }) => {
                let pos = self.reader.read_u64_le().await.map_err(|e| e.to_string())?;
                let data = self.take(pos, len, desc.bytes()).await?;
                Ok(Some(Frame::Pieces(PieceBatch {
                    layer,
                    first_block,
                    data,
                })))
            }
        }
    }
}

/// Serves transfers on one lane until the sender closes it or one fails.
async fn serve_lane(stream: UnixStream, receiver: Arc<KvReceiver>) {
    let mut lane = match LaneSource::accept(stream).await {
        Ok(l) => l,
        Err(reason) => {
            tracing::warn!(%reason, "KV lane refused");
            return;
        }
    };
    loop {
        // A sender closing its lane between transfers is the normal end.
        match lane.reader.fill_buf().await {
            Ok([]) | Err(_) => return,
            Ok(_) => {}
        }
        let result = receiver.serve(&mut lane).await;
        let verdict = result.as_ref().map(|r| r.checksum).map_err(Clone::clone);
        if let Err(e) = wire::write_verdict(&mut lane.writer, &verdict).await {
            tracing::debug!(error = %e, "the sender left before the verdict");
            return;
        }
        // After a failure the frames still in the socket belong to a
        // transfer that is over: close the lane rather than guess where the
        // next transfer starts.
        if verdict.is_err() {
            return;
        }
    }
}

/// The sending end of one lane.
struct Lane {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    ring: MmapRaw,
    /// Ring bytes ever claimed (written or skipped at the wrap).
    head: u64,
    /// Ring bytes the receiver has handed back.
    tail: u64,
}

/// What the receiver sends on a lane.
enum Reply {
    Credit(u64),
    Verdict(Result<u64, TransferError>),
}

static NEXT_RING: AtomicU64 = AtomicU64::new(0);

impl Lane {
    /// Connects to the receiver at `socket` and shares a ring of `ring_len` bytes.
    async fn open(socket: &Path, ring_len: usize) -> Result<Self, TransferError> {
        let fail = |reason: String| TransferError::Connect {
            peer: socket.display().to_string(),
            reason,
        };
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let path = shm_dir().join(format!(
            "{RING_PREFIX}{}-{}",
            std::process::id(),
            NEXT_RING.fetch_add(1, Ordering::Relaxed)
        ));
        let shown = path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| fail(format!("creating {shown}: {e}")))?;
        // The file is only a name for the receiver to map by: gone once it has.
        let shared = async {
            // Reserve the memory now: a full /dev/shm (containers often get
            // 64 MiB) is then a clear error here, where the caller can take
            // another path, instead of SIGBUS when the ring is first written.
            // SAFETY: a plain system call on a file descriptor we own.
            let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, ring_len as libc::off_t) };
            if rc != 0 {
                return Err(format!(
                    "reserving {ring_len} bytes for {shown}: {}",
                    std::io::Error::from_raw_os_error(rc)
                ));
            }
            let ring = MmapOptions::new()
                .len(ring_len)
                .map_raw(&file)
                .map_err(|e| format!("mapping {shown}: {e}"))?;
            let (r, mut writer) = stream.into_split();
            let mut reader = BufReader::new(r);
            let name = shown.as_bytes();
            let mut hello = Vec::with_capacity(14 + name.len());
            hello.extend_from_slice(HELLO);
            hello.extend_from_slice(&(ring_len as u64).to_le_bytes());
            hello.extend_from_slice(&(name.len() as u16).to_le_bytes());
            hello.extend_from_slice(name);
            writer.write_all(&hello).await.map_err(|e| e.to_string())?;
            match reader.read_u8().await.map_err(|e| e.to_string())? {
                0 => {}
                _ => {
                    let len = reader.read_u32_le().await.map_err(|e| e.to_string())?;
                    let mut why = vec![0; len.min(64 << 10) as usize];
                    reader
                        .read_exact(&mut why)
                        .await
                        .map_err(|e| e.to_string())?;
                    return Err(format!(
                        "the receiver refused the lane: {}",
                        String::from_utf8_lossy(&why)
                    ));
                }
            }
            Ok(Lane {
                reader,
                writer,
                ring,
                head: 0,
                tail: 0,
            })
        }
        .await;
        let _ = std::fs::remove_file(&path);
        shared.map_err(fail)
    }

    fn ring_len(&self) -> u64 {
        self.ring.len() as u64
    }

    async fn reply(&mut self, transfer: u64) -> Result<Reply, TransferError> {
        let lost = |e: std::io::Error| TransferError::PeerDisconnected {
            transfer,
            received: 0,
            expected: 0,
            reason: format!("the receiver closed the lane: {e}"),
        };
        let tag = self.reader.read_u8().await.map_err(lost)?;
        if tag != TAG_CREDIT {
            return Ok(Reply::Verdict(
                wire::read_verdict(&mut self.reader, tag, transfer).await,
            ));
        }
        let pos = self.reader.read_u64_le().await.map_err(lost)?;
        if pos < self.tail || pos > self.head {
            return Err(TransferError::Io(format!(
                "a credit to ring position {pos} outside {}..={}",
                self.tail, self.head
            )));
        }
        Ok(Reply::Credit(pos))
    }

    /// Copies one batch (at most half the ring) in and announces it.
    async fn put(
        &mut self,
        transfer: u64,
        layer: u32,
        first_block: u32,
        data: &[u8],
    ) -> Result<(), TransferError> {
        let ring_len = self.ring_len();
        let len = data.len() as u64;
        let mut offset = self.head % ring_len;
        if offset + len > ring_len {
            // A batch never wraps: skip the ring's tail end.
            self.head += ring_len - offset;
            offset = 0;
        }
        while self.head + len - self.tail > ring_len {
            match self.reply(transfer).await? {
                Reply::Credit(pos) => self.tail = pos,
                Reply::Verdict(Err(e)) => return Err(e),
                Reply::Verdict(Ok(_)) => {
                    return Err(TransferError::Io(
                        "the receiver accepted a transfer that has not ended".into(),
                    ));
                }
            }
        }
        // SAFETY: `offset + len <= ring_len` (the wrap above), the mapping
        // lives as long as `self`, and the receiver reads this range only
        // after the frame below announces it; the credits say it has finished
        // reading whatever was here before.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.ring.as_mut_ptr().add(offset as usize),
                data.len(),
            );
        }
        fence(Ordering::Release);
        let mut frame = [0u8; 25];
        frame[0] = TAG_PIECES;
        frame[1..5].copy_from_slice(&layer.to_le_bytes());
        frame[5..9].copy_from_slice(&first_block.to_le_bytes());
        frame[9..17].copy_from_slice(&len.to_le_bytes());
        frame[17..25].copy_from_slice(&self.head.to_le_bytes());
        self.head += len;
        self.writer.write_all(&frame).await.map_err(wire::io)
    }
}

/// Transfers to receivers on this host, named by their socket path.
#[derive(Debug)]
pub struct ShmTransport {
    sessions: Mutex<HashMap<PathBuf, ShmSession>>,
    metrics: Arc<TransferMetrics>,
}

impl ShmTransport {
    /// A transport counting sends into `metrics`.
    pub fn new(metrics: Arc<TransferMetrics>) -> Self {
        Self {
            sessions: Mutex::new(HashMap::new()),
            metrics,
        }
    }
}

impl Transport for ShmTransport {
    type Peer = Path;
    type Session = ShmSession;

    async fn connect(&self, peer: &Path) -> Result<ShmSession, TransferError> {
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        // A receiver that stopped removed its socket: let its idle lanes go
        // (their rings stay mapped while held).
        sessions.retain(|socket, _| socket.exists());
        if let Some(s) = sessions.get(peer) {
            return Ok(s.clone());
        }
        // Lanes connect on demand; a missing socket is worth failing early
        // for, so that a caller can take another path at once.
        match std::fs::symlink_metadata(peer) {
            Ok(m) if m.file_type().is_socket() => {}
            Ok(_) => {
                return Err(TransferError::Connect {
                    peer: peer.display().to_string(),
                    reason: "not a socket".into(),
                });
            }
            Err(e) => {
                return Err(TransferError::Connect {
                    peer: peer.display().to_string(),
                    reason: e.to_string(),
                });
            }
        }
        let session = ShmSession {
            lanes: Arc::new(Lanes {
                socket: peer.to_path_buf(),
                idle: Mutex::new(Vec::new()),
            }),
            metrics: self.metrics.clone(),
        };
        sessions.insert(peer.to_path_buf(), session.clone());
        Ok(session)
    }
}

struct Lanes {
    socket: PathBuf,
    idle: Mutex<Vec<Lane>>,
}

impl std::fmt::Debug for Lanes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lanes")
            .field("socket", &self.socket)
            .finish()
    }
}

impl Lanes {
    fn take_idle(&self, ring_len: usize) -> Option<Lane> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let i = idle.iter().position(|l| l.ring.len() >= ring_len)?;
        Some(idle.swap_remove(i))
    }

    fn put_idle(&self, lane: Lane) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < IDLE_LANES {
            idle.push(lane);
        }
    }
}

/// The lanes to one receiver; each transfer takes one.
#[derive(Debug, Clone)]
pub struct ShmSession {
    lanes: Arc<Lanes>,
    metrics: Arc<TransferMetrics>,
}

impl Session for ShmSession {
    type Writer = ShmWriter;

    async fn open(&self, desc: &TransferDescriptor) -> Result<ShmWriter, TransferError> {
        // Room for two of the largest batch part (one piece at least).
        let ring_len = RING_BYTES.max(2 * desc.piece_bytes());
        let mut header = Vec::new();
        wire::write_header(&mut header, desc).await?;
        // An idle lane whose receiver restarted fails on the first write:
        // then a fresh lane.
        let mut lane = None;
        if let Some(mut idle) = self.lanes.take_idle(ring_len)
            && idle.writer.write_all(&header).await.is_ok()
        {
            lane = Some(idle);
        }
        let lane = match lane {
            Some(l) => l,
            None => {
                let mut fresh = Lane::open(&self.lanes.socket, ring_len).await?;
                fresh.writer.write_all(&header).await.map_err(|e| {
                    TransferError::PeerDisconnected {
                        transfer: desc.transfer_id,
                        received: 0,
                        expected: desc.pieces(),
                        reason: e.to_string(),
                    }
                })?;
                fresh
            }
        };
        Ok(ShmWriter {
            lane,
            lanes: self.lanes.clone(),
            out: Outgoing::new(desc, self.metrics.clone()),
        })
    }
}

/// One transfer on a lane. Dropped unfinished, it closes the lane, which the
/// receiver sees as a disconnect.
pub struct ShmWriter {
    lane: Lane,
    lanes: Arc<Lanes>,
    out: Outgoing,
}

impl ShmWriter {
    /// After a failed write, the receiver's reason if it sent one.
    async fn why(&mut self, e: TransferError) -> TransferError {
        let id = self.out.desc.transfer_id;
        let verdict = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                match self.lane.reply(id).await {
                    Ok(Reply::Credit(_)) => continue,
                    Ok(Reply::Verdict(Err(remote))) => return Some(remote),
                    _ => return None,
                }
            }
        })
        .await;
        let err = match verdict {
            Ok(Some(remote)) => remote,
            _ => match e {
                TransferError::Io(reason) => TransferError::PeerDisconnected {
                    transfer: id,
                    received: 0,
                    expected: self.out.progress.pieces_total,
                    reason,
                },
                other => other,
            },
        };
        self.out.metrics.failed(&err);
        err
    }
}

impl TransferWriter for ShmWriter {
    async fn send(&mut self, batch: PieceBatch) -> Result<(), TransferError> {
        self.out.admit(&batch)?;
        let id = self.out.desc.transfer_id;
        let pb = self.out.desc.piece_bytes();
        // Whole pieces, at most half the ring per part.
        let part = (self.lane.ring.len() / 2 / pb).max(1) * pb;
        for (i, data) in batch.data.chunks(part).enumerate() {
            let first = batch.first_block + (i * part / pb) as u32;
            if let Err(e) = self.lane.put(id, batch.layer, first, data).await {
                return Err(self.why(e).await);
            }
        }
        Ok(())
    }

    async fn finish(
        mut self,
        source_checksum: Option<u64>,
    ) -> Result<TransferReport, TransferError> {
        let id = self.out.desc.transfer_id;
        let checksum = source_checksum.unwrap_or(self.out.checksum);
        if let Err(e) = wire::write_end(&mut self.lane.writer, checksum).await {
            let e = self.why(wire::io(e)).await;
            return Err(e);
        }
        let verdict = loop {
            match self.lane.reply(id).await {
                Ok(Reply::Credit(pos)) => self.lane.tail = pos,
                Ok(Reply::Verdict(v)) => break v,
                Err(e) => break Err(e),
            }
        };
        let report = self.out.settle(verdict);
        if report.is_ok() {
            self.out.metrics.sent_through_shm();
        }
        // A lane whose transfer ended cleanly, every byte handed back, serves the next.
        if report.is_ok() && self.lane.tail == self.lane.head {
            self.lanes.put_idle(self.lane);
        }
        report
    }

    fn progress(&self) -> Progress {
        self.out.progress
    }
}
