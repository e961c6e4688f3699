//! The single writer thread: group commit and checkpoints.
//!
//! It blocks for the first request, then drains whatever else is queued (up to `max_batch`
//! records), writes them with one `write` and one `fsync`, and only then answers each waiter.
//! A batch of only [`Durability::Deferred`] records is answered once written; the next batch's
//! fsync, a timer (`deferred_sync`) or the next checkpoint, whichever comes first, makes it
//! durable. A failed write or sync poisons the writer: every later append fails, so nothing is
//! released without its record (after a failed fsync the kernel may have dropped the dirty pages,
//! so retrying could report durability that is not there).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Instant;

use super::checkpoint::{self, Checkpoint, SigningKey};
use super::{AuditError, Durability, Entry, Options, Receipt, Record, State, io, now, record_hash};

pub type Reply<T> = tokio::sync::oneshot::Sender<Result<T, AuditError>>;

pub enum Msg {
    Append(Box<Entry>, Durability, Reply<Receipt>),
    Checkpoint(Reply<Option<Checkpoint>>),
    Close(Reply<Option<Checkpoint>>),
}

pub struct Writer {
    path: PathBuf,
    file: File,
    ckpt_path: PathBuf,
    ckpt_file: File,
    key: SigningKey,
    options: Options,
    state: Arc<Mutex<State>>,
    next_seq: u64,
    last_hash: String,
    end: u64,
    /// When the oldest record not covered by a checkpoint was written.
    uncovered_since: Option<Instant>,
    /// When the oldest deferred record not yet synced was written.
    unsynced_since: Option<Instant>,
    failed: Option<String>,
}

impl Writer {
    pub fn new(
        path: &Path,
        ckpt_path: &Path,
        key: SigningKey,
        options: Options,
        state: Arc<Mutex<State>>,
        next_seq: u64,
        last_hash: String,
    ) -> Result<Self, AuditError> {
        let open = |p: &Path| OpenOptions::new().create(true).append(true).open(p).map_err(io(p));
        let file = open(path)?;
        let ckpt_file = open(ckpt_path)?;
        let end = *state
            .lock()
            .expect("audit state")
            .offsets
            .last()
            .expect("offsets start at 0");
        Ok(Self {
            path: path.to_owned(),
            file,
            ckpt_path: ckpt_path.to_owned(),
            ckpt_file,
            key,
            options,
            state,
            next_seq,
            last_hash,
            end,
            uncovered_since: None,
            unsynced_since: None,
            failed: None,
        })
    }

    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        loop {
            // Wake for whichever is due first: a deferred sync or a timed checkpoint.
            let wake = [
                self.unsynced_since.map(|t| t + self.options.deferred_sync),
                self.uncovered_since.map(|t| t + self.options.checkpoint_interval),
            ]
            .into_iter()
            .flatten()
            .min();
            let first = match wake {
                Some(at) => match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                    Ok(m) => Some(m),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                },
                None => match rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => break,
                },
            };
            let mut appends = Vec::new();
            let mut others = Vec::new();
            let mut next = first;
            while let Some(m) = next.take() {
                match m {
                    Msg::Append(entry, durability, reply) => appends.push((*entry, durability, reply)),
                    other => others.push(other),
                }
                // Stop draining at a checkpoint or close, so it covers exactly what came before.
                if appends.len() < self.options.max_batch && others.is_empty() {
                    next = rx.try_recv().ok();
                }
            }
            self.commit(appends);
            let mut closed = false;
            for m in others {
                match m {
                    Msg::Checkpoint(reply) => {
                        let _ = reply.send(self.checkpoint());
                    }
                    Msg::Close(reply) => {
                        let _ = reply.send(self.checkpoint());
                        closed = true;
                    }
                    Msg::Append(..) => unreachable!("appends are taken apart"),
                }
            }
            if closed {
                tracing::info!(path = %self.path.display(), "audit log closed");
                return;
            }
            let covered = self
                .state
                .lock()
                .expect("audit state")
                .checkpoints
                .last()
                .map_or(0, |c| c.size);
            let due = self.next_seq - covered >= self.options.checkpoint_records
                || self
                    .uncovered_since
                    .is_some_and(|t| t.elapsed() >= self.options.checkpoint_interval);
            if due && let Err(e) = self.checkpoint() {
                tracing::error!(error = %e, "cannot write an audit checkpoint");
                // Try again an interval later, not at once.
                self.uncovered_since = Some(Instant::now());
            } else if self
                .unsynced_since
                .is_some_and(|t| t.elapsed() >= self.options.deferred_sync)
            {
                // Poisons the writer on failure (and says so); nothing more is released.
                let _ = self.sync_deferred();
            }
        }
        // Every handle is gone: sign what is there.
        if let Err(e) = self.checkpoint() {
            tracing::error!(error = %e, "cannot write the final audit checkpoint");
        }
    }

    fn commit(&mut self, batch: Vec<(Entry, Durability, Reply<Receipt>)>) {
        if batch.is_empty() {
            return;
        }
        if let Some(reason) = &self.failed {
            for (_, _, reply) in batch {
                let _ = reply.send(Err(AuditError::Unavailable(reason.clone())));
            }
            return;
        }
        let defer = !self.options.deferred_sync.is_zero() && batch.iter().all(|(_, d, _)| *d == Durability::Deferred);
        let mut buf = Vec::new();
        let mut ends = Vec::with_capacity(batch.len());
        let mut receipts = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        let (mut seq, mut prev) = (self.next_seq, self.last_hash.clone());
        for (entry, _, reply) in batch {
            let time = now();
            let hash = record_hash(seq, &time, &prev, &entry);
            let record = Record {
                seq,
                time,
                prev_hash: prev,
                entry,
                hash: hash.clone(),
            };
            serde_json::to_writer(&mut buf, &record).expect("record serialises");
            buf.push(b'\n');
            ends.push(self.end + buf.len() as u64);
            receipts.push(Receipt {
                seq,
                hash: hash.clone(),
            });
            replies.push(reply);
            prev = hash;
            seq += 1;
        }
        let written = self
            .file
            .write_all(&buf)
            .and_then(|()| if defer { Ok(()) } else { self.file.sync_data() });
        if let Err(e) = written {
            let reason = self.fail(&e);
            for reply in replies {
                let _ = reply.send(Err(AuditError::Unavailable(reason.clone())));
            }
            return;
        }
        if defer {
            self.unsynced_since.get_or_insert_with(Instant::now);
        } else {
            // This fsync also made every deferred record before it durable.
            self.unsynced_since = None;
        }
        {
            let mut state = self.state.lock().expect("audit state");
            for r in &receipts {
                state.tree.push(checkpoint::leaf(&r.hash).expect("own hash is hex"));
            }
            state.offsets.extend(ends);
            if !defer {
                state.durable = state.tree.len();
            }
        }
        self.end += buf.len() as u64;
        self.next_seq = seq;
        self.last_hash = prev;
        self.uncovered_since.get_or_insert_with(Instant::now);
        for (reply, receipt) in replies.into_iter().zip(receipts) {
            let _ = reply.send(Ok(receipt));
        }
    }

    /// Poisons the writer after a failed write or sync; returns the reason every later append is
    /// given.
    fn fail(&mut self, e: &std::io::Error) -> String {
        let reason = format!("writing {} failed: {e}", self.path.display());
        tracing::error!(%reason, "audit log unavailable: nothing more will be released");
        self.failed = Some(reason.clone());
        reason
    }

    /// Makes the deferred records durable. A failed sync poisons the writer and is not retried:
    /// the records it leaves unsure are never counted durable, and no checkpoint signs them.
    fn sync_deferred(&mut self) -> Result<(), AuditError> {
        if self.unsynced_since.take().is_some() && self.failed.is_none() {
            match self.file.sync_data() {
                Ok(()) => {
                    let mut state = self.state.lock().expect("audit state");
                    state.durable = state.tree.len();
                }
                Err(e) => {
                    self.fail(&e);
                }
            }
        }
        let state = self.state.lock().expect("audit state");
        if state.durable < state.tree.len() {
            let reason = self.failed.clone().unwrap_or_default();
            return Err(AuditError::Unavailable(format!(
                "records {}.. may not be durable: {reason}",
                state.durable
            )));
        }
        Ok(())
    }

    /// Appends one record on the calling thread (before the writer thread starts).
    pub fn append_now(&mut self, entry: Entry) -> Result<Receipt, AuditError> {
        let (reply, mut rx) = tokio::sync::oneshot::channel();
        self.commit(vec![(entry, Durability::Now, reply)]);
        rx.try_recv()
            .map_err(|_| AuditError::Unavailable("the audit writer did not answer".into()))?
    }

    /// Signs and syncs a checkpoint over every record (syncing deferred ones first), unless one
    /// already covers them.
    pub fn checkpoint(&mut self) -> Result<Option<Checkpoint>, AuditError> {
        self.sync_deferred()?;
        let (size, root) = {
            let state = self.state.lock().expect("audit state");
            let size = state.tree.len();
            if size == 0 || state.checkpoints.last().is_some_and(|c| c.size == size) {
                return Ok(None);
            }
            (size, checkpoint::root_hex(&state.tree))
        };
        let c = self.key.sign(size, root, now());
        let mut line = serde_json::to_vec(&c).expect("checkpoint serialises");
        line.push(b'\n');
        self.ckpt_file
            .write_all(&line)
            .and_then(|()| self.ckpt_file.sync_data())
            .map_err(io(&self.ckpt_path))?;
        self.state.lock().expect("audit state").checkpoints.push(c.clone());
        self.uncovered_since = None;
        Ok(Some(c))
    }
}

/// Starts the writer thread; it stops when every sender is gone or on [`Msg::Close`].
pub fn start(writer: Writer) -> std::io::Result<mpsc::Sender<Msg>> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("audit-writer".into())
        .spawn(move || writer.run(rx))?;
    Ok(tx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::GENESIS;

    /// A writer on a fresh log in `dir`, and the state it shares.
    fn writer(dir: &Path) -> (Writer, Arc<Mutex<State>>) {
        let key = SigningKey::from_pem(&SigningKey::generate_pem()).unwrap();
        let state = Arc::new(Mutex::new(State {
            tree: checkpoint::Tree::new(),
            offsets: vec![0],
            checkpoints: Vec::new(),
            durable: 0,
        }));
        let w = Writer::new(
            &dir.join("audit.log"),
            &dir.join("checkpoints.log"),
            key,
            Options::default(),
            Arc::clone(&state),
            0,
            GENESIS.into(),
        )
        .unwrap();
        (w, state)
    }

    fn entry() -> Entry {
        Entry {
            call: "query.release".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_failed_write_fails_every_waiter_and_poisons_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (mut w, state) = writer(dir.path());
        // A descriptor the kernel refuses to write through stands in for a failing disk.
        w.file = File::open(&path).unwrap();
        assert!(matches!(w.append_now(entry()), Err(AuditError::Unavailable(_))));
        w.file = OpenOptions::new().append(true).open(&path).unwrap();
        let err = w.append_now(entry()).unwrap_err();
        assert!(err.to_string().contains("writing"), "stays failed: {err}");
        assert_eq!(state.lock().unwrap().tree.len(), 0);
    }

    #[test]
    fn a_deferred_record_that_cannot_be_written_is_refused_too() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, state) = writer(dir.path());
        w.file = File::open(dir.path().join("audit.log")).unwrap();
        let (reply, mut rx) = tokio::sync::oneshot::channel();
        w.commit(vec![(entry(), Durability::Deferred, reply)]);
        assert!(matches!(rx.try_recv().unwrap(), Err(AuditError::Unavailable(_))));
        assert_eq!(state.lock().unwrap().tree.len(), 0);
        assert!(w.checkpoint().unwrap().is_none(), "nothing to sign");
    }

    #[test]
    fn no_checkpoint_signs_a_deferred_record_the_writer_failed_to_sync() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, state) = writer(dir.path());
        let (reply, mut rx) = tokio::sync::oneshot::channel();
        w.commit(vec![(entry(), Durability::Deferred, reply)]);
        assert!(rx.try_recv().unwrap().is_ok(), "answered once written");
        // The disk fails before the deferred record is synced: the writer is poisoned, the
        // record was never made durable, and no checkpoint may vouch for it.
        w.file = File::open(dir.path().join("audit.log")).unwrap();
        assert!(w.append_now(entry()).is_err());
        let (written, durable) = {
            let state = state.lock().unwrap();
            (state.tree.len(), state.durable)
        };
        assert_eq!((written, durable), (1, 0));
        let err = w.checkpoint().unwrap_err();
        assert!(err.to_string().contains("may not be durable"), "{err}");
        assert!(state.lock().unwrap().checkpoints.is_empty());
    }
}
