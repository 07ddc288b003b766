//! The embedded store's files in its data directory.
//!
//! - `wal`: the write-ahead log, a sequence of records, each
//!   `[len: u32 LE][crc32 of payload: u32 LE][payload]`, the payload a kind byte
//!   (1: a Raft log entry, 2: the Raft hard state) and the protobuf encoding of
//!   an `eraftpb` `Entry` or `HardState`. An entry whose index is at or below one
//!   already read replaces it and everything after (the leader overwrote an
//!   uncommitted tail). A torn or corrupt record (a crash mid-write) ends the log:
//!   it and whatever follows are cut off when the log is opened.
//! - `lock`: locked while a process has the directory open, so two cannot.
//! - `snapshot`: one record of the same framing holding an `eraftpb` `Snapshot`
//!   whose data is a `tandem.raft.v1.StateSnapshot`; written to `snapshot.tmp`,
//!   synced and renamed over the old one. Taking a snapshot rewrites `wal` the
//!   same way, keeping only the hard state and the entries after the compaction
//!   point.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::prelude::{Entry, HardState, Snapshot};

const ENTRY: u8 = 1;
const HARD_STATE: u8 = 2;
/// A record longer than this is taken for corruption.
const MAX_RECORD: usize = 1 << 30;

/// What a data directory held when it was opened.
#[derive(Default)]
pub(crate) struct Recovered {
    pub(crate) snapshot: Option<Snapshot>,
    pub(crate) hard_state: Option<HardState>,
    /// The log's entries after the snapshot, in index order.
    pub(crate) entries: Vec<Entry>,
}

/// The write-ahead log, open for appending.
pub(crate) struct Wal {
    dir: PathBuf,
    file: File,
    /// `dir/lock`, locked while this process uses the directory.
    _lock: File,
}

fn frame(kind: u8, body: &[u8], out: &mut Vec<u8>) {
    let mut payload = Vec::with_capacity(body.len() + 1);
    payload.push(kind);
    payload.extend_from_slice(body);
    // Payloads are far below 4 GiB (raft limits message sizes).
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
}

/// Splits `buf` into record payloads; also returns how many bytes were good
/// (less than `buf.len()` when the tail is torn or corrupt).
fn records(buf: &[u8]) -> (Vec<&[u8]>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while buf.len() - at >= 8 {
        let len = u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
        let crc = u32::from_le_bytes([buf[at + 4], buf[at + 5], buf[at + 6], buf[at + 7]]);
        if len == 0 || len > MAX_RECORD || buf.len() - at - 8 < len {
            break;
        }
        let payload = &buf[at + 8..at + 8 + len];
        if crc32fast::hash(payload) != crc {
            break;
        }
        out.push(payload);
        at += 8 + len;
    }
    (out, at)
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {e}"))
}

/// Writes `bytes` to `path` atomically: a temporary file, synced, renamed over
/// `path`, and the directory synced.
fn replace(dir: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

impl Wal {
    /// Opens (creating if needed) the files in `dir` and reads them back,
    /// cutting off a torn or corrupt tail of the log.
    pub(crate) fn open(dir: &Path) -> io::Result<(Wal, Recovered)> {
        std::fs::create_dir_all(dir)?;
        let lock = File::create(dir.join("lock"))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    "the directory is in use by another store",
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
        let mut recovered = Recovered::default();
        let snap_path = dir.join("snapshot");
        if snap_path.exists() {
            let buf = std::fs::read(&snap_path)?;
            let (recs, _) = records(&buf);
            // The snapshot is only ever renamed into place whole.
            let payload = recs
                .first()
                .filter(|p| p[0] == ENTRY)
                .ok_or_else(|| corrupt("snapshot", "damaged record"))?;
            let snap =
                Snapshot::parse_from_bytes(&payload[1..]).map_err(|e| corrupt("snapshot", e))?;
            recovered.snapshot = Some(snap);
        }
        let snap_index = recovered
            .snapshot
            .as_ref()
            .map_or(0, |s| s.get_metadata().index);

        let wal_path = dir.join("wal");
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .append(true)
            .open(&wal_path)?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)?;
        let (recs, good) = records(&buf);
        let mut good = good;
        for (i, payload) in recs.iter().enumerate() {
            let body = &payload[1..];
            let parsed = match payload[0] {
                ENTRY => Entry::parse_from_bytes(body).map(|e| {
                    if e.index > snap_index {
                        recovered.entries.retain(|old| old.index < e.index);
                        recovered.entries.push(e);
                    }
                }),
                HARD_STATE => {
                    HardState::parse_from_bytes(body).map(|hs| recovered.hard_state = Some(hs))
                }
                _ => Err(protobuf::ProtobufError::WireError(
                    protobuf::error::WireError::Other,
                )),
            };
            if parsed.is_err() {
                // A record that checks out but does not parse: treat like a torn tail.
                good = recs[..i].iter().map(|p| p.len() + 8).sum();
                break;
            }
        }
        if good < buf.len() {
            tracing::warn!(
                path = %wal_path.display(),
                kept = good,
                dropped = buf.len() - good,
                "the write-ahead log ends in a torn or corrupt record; cutting it off"
            );
            file.set_len(good as u64)?;
            file.sync_all()?;
        }
        // Entries must be contiguous after the snapshot; anything else is a gap
        // that cannot be replayed, so keep only the contiguous run.
        let mut expect = snap_index + 1;
        let mut contiguous = 0;
        for e in &recovered.entries {
            if e.index != expect {
                break;
            }
            expect += 1;
            contiguous += 1;
        }
        if contiguous < recovered.entries.len() {
            tracing::warn!(
                from = expect,
                "the write-ahead log has a gap; dropping the entries after it"
            );
            recovered.entries.truncate(contiguous);
        }
        Ok((
            Wal {
                dir: dir.to_owned(),
                file,
                _lock: lock,
            },
            recovered,
        ))
    }

    /// Appends `entries` and the hard state, and syncs them to disk.
    pub(crate) fn append(&mut self, entries: &[Entry], hs: Option<&HardState>) -> io::Result<()> {
        if entries.is_empty() && hs.is_none() {
            return Ok(());
        }
        let mut out = Vec::new();
        for e in entries {
            frame(
                ENTRY,
                &e.write_to_bytes().map_err(|e| corrupt("entry", e))?,
                &mut out,
            );
        }
        if let Some(hs) = hs {
            frame(
                HARD_STATE,
                &hs.write_to_bytes().map_err(|e| corrupt("hard state", e))?,
                &mut out,
            );
        }
        self.file.write_all(&out)?;
        self.file.sync_data()
    }

    /// Saves `snapshot` and restarts the log with `hs` and `entries` (those
    /// after the compaction point).
    pub(crate) fn compact(
        &mut self,
        snapshot: &Snapshot,
        hs: &HardState,
        entries: &[Entry],
    ) -> io::Result<()> {
        let mut snap = Vec::new();
        frame(
            ENTRY,
            &snapshot
                .write_to_bytes()
                .map_err(|e| corrupt("snapshot", e))?,
            &mut snap,
        );
        replace(&self.dir, &self.dir.join("snapshot"), &snap)?;
        let mut log = Vec::new();
        for e in entries {
            frame(
                ENTRY,
                &e.write_to_bytes().map_err(|e| corrupt("entry", e))?,
                &mut log,
            );
        }
        frame(
            HARD_STATE,
            &hs.write_to_bytes().map_err(|e| corrupt("hard state", e))?,
            &mut log,
        );
        let path = self.dir.join("wal");
        replace(&self.dir, &path, &log)?;
        self.file = OpenOptions::new().append(true).open(&path)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: vec![index as u8; 10].into(),
            ..Default::default()
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tandem-wal-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_the_rest_replays() {
        let dir = temp_dir("torn");
        let (mut wal, rec) = Wal::open(&dir).expect("open");
        assert!(rec.entries.is_empty() && rec.snapshot.is_none());
        assert!(Wal::open(&dir).is_err(), "a directory in use is refused");
        let hs = HardState {
            term: 2,
            commit: 3,
            ..Default::default()
        };
        wal.append(&[entry(1, 1), entry(2, 1), entry(3, 1)], Some(&hs))
            .expect("append");
        // The leader overwrote index 3 in term 2.
        wal.append(&[entry(3, 2)], None).expect("append");
        drop(wal);
        let path = dir.join("wal");
        let good = std::fs::metadata(&path).expect("stat").len();
        // A record cut short by a crash, then garbage.
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(&[40, 0, 0, 0, 1, 2, 3, 4, ENTRY, 9, 9])
            .expect("write");
        drop(f);
        let (mut wal, rec) = Wal::open(&dir).expect("reopen");
        let got: Vec<(u64, u64)> = rec.entries.iter().map(|e| (e.index, e.term)).collect();
        assert_eq!(got, [(1, 1), (2, 1), (3, 2)]);
        assert_eq!(rec.hard_state.expect("hard state").commit, 3);
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), good);
        // Appending after the cut works, and a flipped bit is caught too.
        wal.append(&[entry(4, 2)], None).expect("append");
        drop(wal);
        let mut bytes = std::fs::read(&path).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).expect("write");
        let (_, rec) = Wal::open(&dir).expect("reopen");
        assert_eq!(rec.entries.last().expect("entries").index, 3);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn compaction_keeps_the_snapshot_and_the_tail() {
        let dir = temp_dir("compact");
        let (mut wal, _) = Wal::open(&dir).expect("open");
        wal.append(&[entry(1, 1), entry(2, 1), entry(3, 1)], None)
            .expect("append");
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 2;
        snap.mut_metadata().term = 1;
        snap.data = b"state".to_vec().into();
        let hs = HardState {
            commit: 3,
            ..Default::default()
        };
        wal.compact(&snap, &hs, &[entry(3, 1)]).expect("compact");
        wal.append(&[entry(4, 1)], None).expect("append");
        drop(wal);
        let (_, rec) = Wal::open(&dir).expect("reopen");
        let snap = rec.snapshot.expect("snapshot");
        assert_eq!(
            (snap.get_metadata().index, &snap.data[..]),
            (2, &b"state"[..])
        );
        let got: Vec<u64> = rec.entries.iter().map(|e| e.index).collect();
        assert_eq!(got, [3, 4]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
