//! The access log's writer: calls hand their finished record to a bounded queue
//! (`try_send`, never waiting); a thread of its own formats each as one JSON line and
//! writes it through a buffer, flushed whenever the queue runs empty (and at least once a
//! second while it never does). A full queue drops the record and counts it in
//! `switchyard_access_log_dropped_total`: a slow disk costs lines, never call latency.
//!
//! The writer is a thread, not a task: a blocking write (a full disk, a pipe nobody
//! reads) then stalls only the log, not a runtime thread serving calls.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use tokio::sync::mpsc;

use super::error::ObserveError;
use crate::settings::observe::AccessLogTarget;

/// Records waiting for the writer at most; more are dropped.
pub const QUEUE_LINES: usize = 4096;
/// The write buffer's size.
const BUFFER_BYTES: usize = 64 * 1024;
/// A writer that never finds its queue empty still flushes this often.
const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// Write errors are logged at most once per this interval.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// What a queued record does in the writer: appends its JSON object (no newline).
pub trait Line: Send + 'static {
    /// Appends the record as one JSON object to `out`.
    fn write_json(&self, out: &mut Vec<u8>);
}

/// The calls' side of the access log: where finished records go.
#[derive(Debug)]
pub struct AccessLog<L> {
    tx: mpsc::Sender<Box<L>>,
    dropped: IntCounter,
    reopen: Arc<AtomicBool>,
}

impl<L: Line> AccessLog<L> {
    /// Opens `target` and starts its writer; `None` when the log is off. `dropped`
    /// counts records the writer had no room for.
    pub fn open(
        target: &AccessLogTarget,
        dropped: IntCounter,
    ) -> Result<Option<Self>, ObserveError> {
        let sink = match target {
            AccessLogTarget::Off => return Ok(None),
            AccessLogTarget::Stdout => {
                Sink::Stdout(BufWriter::with_capacity(BUFFER_BYTES, std::io::stdout()))
            }
            AccessLogTarget::File(path) => Sink::File {
                out: BufWriter::with_capacity(BUFFER_BYTES, open_file(path)?),
                path: path.clone(),
            },
        };
        let (tx, rx) = mpsc::channel(QUEUE_LINES);
        let reopen = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            rx,
            sink,
            reopen: Arc::clone(&reopen),
            last_error: None,
        };
        std::thread::Builder::new()
            .name("switchyard-access-log".into())
            .spawn(move || writer.run())
            .map_err(ObserveError::Thread)?;
        Ok(Some(Self {
            tx,
            dropped,
            reopen,
        }))
    }

    /// Queues a finished call's record, or counts it dropped if the queue is full.
    #[inline]
    pub fn send(&self, line: Box<L>) {
        if self.tx.try_send(line).is_err() {
            self.dropped.inc();
        }
    }

    /// Has the writer open its file again before its next line (after logrotate moved it).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Relaxed);
    }
}

/// Opens the log file for appending, creating it if needed.
fn open_file(path: &Path) -> Result<File, ObserveError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| ObserveError::Open {
            path: path.to_owned(),
            source,
        })
}

/// Where the lines go.
enum Sink {
    Stdout(BufWriter<std::io::Stdout>),
    File { path: PathBuf, out: BufWriter<File> },
}

impl Sink {
    fn out(&mut self) -> &mut dyn Write {
        match self {
            Self::Stdout(w) => w,
            Self::File { out, .. } => out,
        }
    }
}

/// The writer thread's state.
struct Writer<L> {
    rx: mpsc::Receiver<Box<L>>,
    sink: Sink,
    reopen: Arc<AtomicBool>,
    last_error: Option<Instant>,
}

impl<L: Line> Writer<L> {
    /// Writes records until every sender is gone, then flushes.
    fn run(mut self) {
        let mut line = Vec::with_capacity(512);
        let mut flushed = Instant::now();
        loop {
            let record = match self.rx.try_recv() {
                Ok(r) => r,
                Err(mpsc::error::TryRecvError::Empty) => {
                    self.flush();
                    flushed = Instant::now();
                    match self.rx.blocking_recv() {
                        Some(r) => r,
                        None => break,
                    }
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
            };
            if self.reopen.swap(false, Ordering::Relaxed) {
                self.reopen_file();
            }
            line.clear();
            record.write_json(&mut line);
            drop(record);
            line.push(b'\n');
            if let Err(e) = self.sink.out().write_all(&line) {
                self.error(&e, "cannot write the access log");
            }
            if flushed.elapsed() >= FLUSH_INTERVAL {
                self.flush();
                flushed = Instant::now();
            }
        }
        self.flush();
    }

    fn flush(&mut self) {
        if let Err(e) = self.sink.out().flush() {
            self.error(&e, "cannot write the access log");
        }
    }

    /// Opens the file again at its path; on failure the old file stays in use.
    fn reopen_file(&mut self) {
        self.flush();
        let Sink::File { path, out } = &mut self.sink else {
            return;
        };
        match open_file(path) {
            Ok(f) => {
                *out = BufWriter::with_capacity(BUFFER_BYTES, f);
                tracing::info!(path = %path.display(), "access log reopened");
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot reopen the access log; writing on to the old file")
            }
        }
    }

    /// Logs a write error, at most once per interval.
    fn error(&mut self, error: &std::io::Error, what: &str) {
        if self
            .last_error
            .is_none_or(|t| t.elapsed() >= ERROR_LOG_INTERVAL)
        {
            self.last_error = Some(Instant::now());
            tracing::error!(%error, "{what}; lines may be lost (logged again in a minute at most)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Text(&'static str);

    impl Line for Text {
        fn write_json(&self, out: &mut Vec<u8>) {
            out.extend_from_slice(self.0.as_bytes());
        }
    }

    #[test]
    fn lines_are_written_and_the_file_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let dropped = IntCounter::new("d", "d").unwrap();
        let log = AccessLog::<Text>::open(&AccessLogTarget::File(path.clone()), dropped.clone())
            .unwrap()
            .unwrap();
        log.send(Box::new(Text("{\"a\":1}")));
        let read = |p: &Path| {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let text = std::fs::read_to_string(p).unwrap_or_default();
                if !text.is_empty() || Instant::now() > deadline {
                    return text;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        assert_eq!(read(&path), "{\"a\":1}\n");
        let rotated = dir.path().join("access.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        log.reopen();
        log.send(Box::new(Text("{\"b\":2}")));
        assert_eq!(read(&path), "{\"b\":2}\n");
        assert_eq!(read(&rotated), "{\"a\":1}\n");
        assert_eq!(dropped.get(), 0);
        assert!(AccessLog::<Text>::open(&AccessLogTarget::Off, dropped)
            .unwrap()
            .is_none());
    }
}
