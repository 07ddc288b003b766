//! The frames of a transfer, and their encoding on a byte stream (QUIC, or
//! TCP in benchmarks). The local path moves frames without encoding them.
//!
//! On a byte stream, little-endian:
//!
//! ```text
//! header  "TKV1" | u32 len | descriptor as JSON
//! pieces  0x01 | u32 layer | u32 first_block | u64 len | len bytes
//! end     0x02 | u64 checksum
//! reply   (receiver to sender, after the end or on failure)
//!         0x00 | u64 checksum            -- landed and verified
//!         0x01 | u32 len | error as JSON -- refused or failed
//! ```

use std::future::Future;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{PieceBatch, TransferDescriptor, TransferError};

const MAGIC: &[u8; 4] = b"TKV1";
pub(crate) const TAG_PIECES: u8 = 1;
pub(crate) const TAG_END: u8 = 2;
/// A descriptor is a few KiB even for a full context; anything larger is garbage.
const MAX_HEADER: usize = 4 << 20;
const MAX_ERROR: usize = 64 << 10;

/// One unit of a transfer.
#[derive(Debug)]
pub(crate) enum Frame {
    Header(TransferDescriptor),
    Pieces(PieceBatch),
    End { checksum: u64 },
}

/// Where a receiver reads frames from.
pub(crate) trait FrameSource: Send {
    /// The next frame, `None` at a clean end of stream; `Err` says why the
    /// stream broke. `desc` (once known) bounds what may be allocated.
    fn next(
        &mut self,
        desc: Option<&TransferDescriptor>,
    ) -> impl Future<Output = Result<Option<Frame>, String>> + Send;
}

/// Frames read from a byte stream.
pub(crate) struct StreamSource<R> {
    pub reader: R,
}

impl<R: AsyncRead + Unpin + Send> FrameSource for StreamSource<R> {
    async fn next(&mut self, desc: Option<&TransferDescriptor>) -> Result<Option<Frame>, String> {
        let r = &mut self.reader;
        let Some(desc) = desc else {
            let mut magic = [0u8; 4];
            match r.read_exact(&mut magic).await {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => return Err(e.to_string()),
            }
            if &magic != MAGIC {
                return Err("not a tandem KV transfer stream".into());
            }
            let len = r.read_u32_le().await.map_err(|e| e.to_string())? as usize;
            if len > MAX_HEADER {
                return Err(format!("descriptor of {len} bytes"));
            }
            let mut buf = vec![0; len];
            r.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            let d = serde_json::from_slice(&buf).map_err(|e| format!("descriptor: {e}"))?;
            return Ok(Some(Frame::Header(d)));
        };
        match read_frame_head(r).await? {
            None => Ok(None),
            Some(FrameHead::End { checksum }) => Ok(Some(Frame::End { checksum })),
            Some(FrameHead::Pieces {
                layer,
                first_block,
                len,
            }) => {
                // Never allocate more than the whole transfer.
                if len > desc.bytes() {
                    return Err(format!(
                        "a batch of {len} bytes in a transfer of {}",
                        desc.bytes()
                    ));
                }
                let mut data = vec![0; len as usize];
                r.read_exact(&mut data).await.map_err(|e| e.to_string())?;
                Ok(Some(Frame::Pieces(PieceBatch {
                    layer,
                    first_block,
                    data,
                })))
            }
        }
    }
}

/// The fixed part of a frame after the header; a pieces frame's payload
/// (or, on the shared-memory lane, its ring position) follows it.
pub(crate) enum FrameHead {
    Pieces {
        layer: u32,
        first_block: u32,
        len: u64,
    },
    End {
        checksum: u64,
    },
}

/// Reads the next frame's tag and fixed fields; `None` at the end of the stream.
pub(crate) async fn read_frame_head<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<FrameHead>, String> {
    let tag = match r.read_u8().await {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let field = |e: std::io::Error| e.to_string();
    match tag {
        TAG_PIECES => Ok(Some(FrameHead::Pieces {
            layer: r.read_u32_le().await.map_err(field)?,
            first_block: r.read_u32_le().await.map_err(field)?,
            len: r.read_u64_le().await.map_err(field)?,
        })),
        TAG_END => Ok(Some(FrameHead::End {
            checksum: r.read_u64_le().await.map_err(field)?,
        })),
        t => Err(format!("unknown frame tag {t}")),
    }
}

pub(crate) async fn write_header<W: AsyncWrite + Unpin>(
    w: &mut W,
    desc: &TransferDescriptor,
) -> Result<(), TransferError> {
    let json = serde_json::to_vec(desc).map_err(|e| TransferError::Io(e.to_string()))?;
    let mut buf = Vec::with_capacity(8 + json.len());
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&(json.len() as u32).to_le_bytes());
    buf.extend_from_slice(&json);
    w.write_all(&buf).await.map_err(io)
}

/// The sending half of a byte stream a transfer runs on.
pub trait ByteStream: AsyncWrite + Unpin + Send {
    /// Writes all of `data`, taking ownership (a QUIC stream queues it without a copy).
    fn write_owned(&mut self, data: Vec<u8>) -> impl Future<Output = std::io::Result<()>> + Send {
        async move { self.write_all(&data).await }
    }
}

impl ByteStream for quinn::SendStream {
    async fn write_owned(&mut self, data: Vec<u8>) -> std::io::Result<()> {
        self.write_chunk(bytes::Bytes::from(data))
            .await
            .map_err(std::io::Error::from)
    }
}

impl ByteStream for tokio::net::TcpStream {}
impl ByteStream for tokio::net::tcp::OwnedWriteHalf {}

pub(crate) async fn write_pieces<W: ByteStream>(
    w: &mut W,
    batch: PieceBatch,
) -> std::io::Result<()> {
    let mut head = [0u8; 17];
    head[0] = TAG_PIECES;
    head[1..5].copy_from_slice(&batch.layer.to_le_bytes());
    head[5..9].copy_from_slice(&batch.first_block.to_le_bytes());
    head[9..17].copy_from_slice(&(batch.data.len() as u64).to_le_bytes());
    w.write_all(&head).await?;
    w.write_owned(batch.data).await
}

pub(crate) async fn write_end<W: AsyncWrite + Unpin>(
    w: &mut W,
    checksum: u64,
) -> std::io::Result<()> {
    let mut buf = [0u8; 9];
    buf[0] = TAG_END;
    buf[1..].copy_from_slice(&checksum.to_le_bytes());
    w.write_all(&buf).await
}

/// Writes the verdict and closes the stream.
pub(crate) async fn write_reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    result: &Result<u64, TransferError>,
) -> std::io::Result<()> {
    write_verdict(w, result).await?;
    w.shutdown().await
}

/// Writes the verdict, leaving the stream open for the next transfer.
pub(crate) async fn write_verdict<W: AsyncWrite + Unpin>(
    w: &mut W,
    result: &Result<u64, TransferError>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    match result {
        Ok(checksum) => {
            buf.push(0);
            buf.extend_from_slice(&checksum.to_le_bytes());
        }
        Err(e) => {
            let json = serde_json::to_vec(e).unwrap_or_default();
            buf.push(1);
            buf.extend_from_slice(&(json.len() as u32).to_le_bytes());
            buf.extend_from_slice(&json);
        }
    }
    w.write_all(&buf).await
}

fn lost(transfer: u64) -> impl Fn(std::io::Error) -> TransferError + Copy {
    move |e| TransferError::PeerDisconnected {
        transfer,
        received: 0,
        expected: 0,
        reason: format!("no verdict from the receiver: {e}"),
    }
}

/// Reads the receiver's verdict: the verified checksum, or its error.
pub(crate) async fn read_reply<R: AsyncRead + Unpin>(
    r: &mut R,
    transfer: u64,
) -> Result<u64, TransferError> {
    let tag = r.read_u8().await.map_err(lost(transfer))?;
    read_verdict(r, tag, transfer).await
}

/// Reads the rest of a verdict whose first byte was `tag`.
pub(crate) async fn read_verdict<R: AsyncRead + Unpin>(
    r: &mut R,
    tag: u8,
    transfer: u64,
) -> Result<u64, TransferError> {
    let lost = lost(transfer);
    match tag {
        0 => r.read_u64_le().await.map_err(lost),
        _ => {
            let len = r.read_u32_le().await.map_err(lost)? as usize;
            if len > MAX_ERROR {
                return Err(TransferError::Io(format!("error reply of {len} bytes")));
            }
            let mut buf = vec![0; len];
            r.read_exact(&mut buf).await.map_err(lost)?;
            Err(
                serde_json::from_slice(&buf).unwrap_or_else(|e| TransferError::Refused {
                    transfer,
                    reason: format!("unreadable error reply: {e}"),
                }),
            )
        }
    }
}

pub(crate) fn io(e: std::io::Error) -> TransferError {
    TransferError::Io(e.to_string())
}
