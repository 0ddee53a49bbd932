//! A request body that can be sent again: it records the frames it yields until the
//! call's response headers arrive (or a size cap is passed), so that a call refused by a
//! backend (REFUSED_STREAM, GOAWAY above its stream id) can be replayed on the next one.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame};

use super::body::H2Body;

/// Most request bytes kept for a replay; a call that sent more is not retried.
pub const MAX_REPLAY_BYTES: usize = 64 * 1024;

#[derive(Debug)]
struct Shared {
    /// The client's body.
    inner: H2Body,
    /// Data frames yielded so far, while still replayable.
    recorded: Vec<Bytes>,
    recorded_len: usize,
    /// Trailers, once seen.
    trailers: Option<HeaderMap>,
    /// The inner body has ended.
    done: bool,
    /// Recording stopped: too large, or the call was committed to a backend.
    committed: bool,
}

/// One attempt's view of the request body.
#[derive(Debug)]
pub struct ReplayBody {
    shared: Arc<Mutex<Shared>>,
    /// Position in `recorded` this attempt has replayed up to.
    pos: usize,
    /// This attempt yielded its trailers or end.
    finished: bool,
}

impl ReplayBody {
    /// Wraps a request body for the first attempt.
    pub fn new(inner: H2Body) -> Self {
        Self {
            shared: Arc::new(Mutex::new(Shared {
                inner,
                recorded: Vec::new(),
                recorded_len: 0,
                trailers: None,
                done: false,
                committed: false,
            })),
            pos: 0,
            finished: false,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh body replaying everything from the start, if the call is still replayable.
    pub fn try_clone(&self) -> Option<Self> {
        if self.lock().committed {
            return None;
        }
        Some(Self {
            shared: Arc::clone(&self.shared),
            pos: 0,
            finished: false,
        })
    }

    /// The call reached a backend for good: stop recording. (What was recorded stays
    /// until the call ends, since the attempt that won may still be replaying it.)
    pub fn commit(&self) {
        self.lock().committed = true;
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        if this.finished {
            return Poll::Ready(None);
        }
        let mut s = this.shared.lock().unwrap_or_else(|p| p.into_inner());
        if this.pos < s.recorded.len() {
            let chunk = s.recorded[this.pos].clone();
            this.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if s.done {
            drop(s);
            return this.finish();
        }
        match Pin::new(&mut s.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                s.done = true;
                this.finished = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    if !s.committed {
                        s.recorded_len += data.len();
                        if s.recorded_len > MAX_REPLAY_BYTES {
                            s.committed = true;
                            s.recorded = Vec::new();
                        } else {
                            // A copy: a slice of the connection's read buffer would keep the whole
                            // buffer alive for as long as the call lasts.
                            s.recorded.push(Bytes::copy_from_slice(&data));
                            this.pos = s.recorded.len();
                        }
                    }
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Err(frame) => {
                    let trailers = frame.into_trailers().ok();
                    s.done = true;
                    s.trailers.clone_from(&trailers);
                    this.finished = true;
                    Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))))
                }
            },
        }
    }

    /// True once nothing but the end is left, so that the last DATA frame can carry
    /// END_STREAM itself instead of being followed by an empty one.
    fn is_end_stream(&self) -> bool {
        if self.finished {
            return true;
        }
        let s = self.lock();
        if self.pos < s.recorded.len() {
            return false;
        }
        if s.done {
            return s.trailers.is_none();
        }
        s.inner.is_end_stream()
    }
}

impl ReplayBody {
    /// Ends a replaying attempt: its trailers if the original had any, else the end.
    fn finish(&mut self) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        self.finished = true;
        let trailers = self.lock().trailers.clone();
        Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))))
    }
}
