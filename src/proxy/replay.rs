//! A request body that can be sent again: it records the frames it yields until the
//! call's response headers arrive (or a size cap is passed), so that a call refused by a
//! backend (REFUSED_STREAM, GOAWAY above its stream id) can be replayed on the next one.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame};

use super::body::H2Body;

/// Most request bytes kept for a replay; a call that sent more is not retried.
pub const MAX_REPLAY_BYTES: usize = 64 * 1024;

#[derive(Debug)]
/// The client's body as read so far, kept for a replay while it is small enough.
struct Recording {
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
    /// Adds up the DATA bytes taken from the client, when the access log is on.
    counted: Option<Arc<AtomicU64>>,
}

/// One attempt's view of the request body.
#[derive(Debug)]
pub struct ReplayBody {
    shared: Arc<Mutex<Recording>>,
    /// Position in `recorded` this attempt has replayed up to.
    pos: usize,
    /// This attempt yielded its trailers or end.
    finished: bool,
}

impl ReplayBody {
    /// Wraps a request body for the first attempt.
    pub fn new(inner: H2Body) -> Self {
        Self::counted(inner, None)
    }

    /// The same, adding the DATA bytes taken from the client to `counter`, if any.
    pub fn counted(inner: H2Body, counter: Option<Arc<AtomicU64>>) -> Self {
        Self {
            shared: Arc::new(Mutex::new(Recording {
                inner,
                recorded: Vec::new(),
                recorded_len: 0,
                trailers: None,
                done: false,
                committed: false,
                counted: counter,
            })),
            pos: 0,
            finished: false,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Recording> {
        self.shared.lock()
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
        let mut s = this.shared.lock();
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
                    if let Some(c) = &s.counted {
                        c.fetch_add(data.len() as u64, Ordering::Relaxed);
                    }
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

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use h2::Reason;

    use super::*;
    use crate::testkit::h2_pair::{within, H2Pair, H2Stream};

    /// A client's request stream as the proxy receives it: the client side to send on,
    /// the proxy side wrapped as the call's first attempt.
    struct Call {
        _pair: H2Pair,
        client: h2::SendStream<Bytes>,
        _rest: (h2::client::ResponseFuture, h2::server::SendResponse<Bytes>),
        body: ReplayBody,
    }

    async fn call() -> Call {
        let mut pair = H2Pair::start().await.unwrap();
        let H2Stream {
            response,
            send,
            recv,
            respond,
        } = pair.stream(false).await.unwrap();
        Call {
            _pair: pair,
            client: send,
            _rest: (response, respond),
            body: ReplayBody::new(H2Body::new(recv)),
        }
    }

    fn trailers() -> HeaderMap {
        let mut t = HeaderMap::new();
        t.insert("x-trailer", "1".parse().unwrap());
        t
    }

    /// What one frame of a body was.
    #[derive(Debug, PartialEq)]
    enum Seen {
        Data(Bytes),
        Trailers(HeaderMap),
        End,
        Reset(Option<Reason>),
    }

    async fn next(body: &mut ReplayBody) -> Seen {
        let frame = within("a frame", poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx))).await;
        match frame {
            None => Seen::End,
            Some(Err(e)) => Seen::Reset(e.reason()),
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => Seen::Data(d),
                Err(f) => Seen::Trailers(f.into_trailers().unwrap()),
            },
        }
    }

    fn data(s: &'static str) -> Seen {
        Seen::Data(Bytes::from_static(s.as_bytes()))
    }

    #[tokio::test]
    async fn first_attempt_passes_frames_through_and_records_the_data() {
        let mut c = call().await;
        c.client
            .send_data(Bytes::from_static(b"hello"), false)
            .unwrap();
        c.client
            .send_data(Bytes::from_static(b"world"), false)
            .unwrap();
        c.client.send_trailers(trailers()).unwrap();
        assert_eq!(next(&mut c.body).await, data("hello"));
        assert_eq!(next(&mut c.body).await, data("world"));
        assert_eq!(next(&mut c.body).await, Seen::Trailers(trailers()));
        assert_eq!(next(&mut c.body).await, Seen::End);
        let s = c.body.lock();
        assert_eq!(s.recorded, [&b"hello"[..], &b"world"[..]]);
        assert_eq!(s.recorded_len, 10);
    }

    #[tokio::test]
    async fn a_retry_replays_what_was_recorded_then_reads_on() {
        let mut c = call().await;
        c.client
            .send_data(Bytes::from_static(b"hello"), false)
            .unwrap();
        assert_eq!(next(&mut c.body).await, data("hello"));
        // The first attempt was refused: the retry starts from the beginning.
        let mut retry = c.body.try_clone().expect("replayable");
        drop(c.body);
        c.client
            .send_data(Bytes::from_static(b"world"), true)
            .unwrap();
        assert_eq!(next(&mut retry).await, data("hello"));
        assert_eq!(next(&mut retry).await, data("world"));
        assert_eq!(next(&mut retry).await, Seen::End);
        // A third attempt gets all of it from the record.
        let mut third = retry.try_clone().expect("still replayable");
        assert_eq!(next(&mut third).await, data("hello"));
        assert_eq!(next(&mut third).await, data("world"));
        assert_eq!(next(&mut third).await, Seen::End);
    }

    #[tokio::test]
    async fn trailers_are_replayed_after_the_data() {
        let mut c = call().await;
        c.client
            .send_data(Bytes::from_static(b"hello"), false)
            .unwrap();
        c.client.send_trailers(trailers()).unwrap();
        assert_eq!(next(&mut c.body).await, data("hello"));
        assert_eq!(next(&mut c.body).await, Seen::Trailers(trailers()));
        let mut retry = c.body.try_clone().expect("replayable");
        assert_eq!(next(&mut retry).await, data("hello"));
        assert_eq!(next(&mut retry).await, Seen::Trailers(trailers()));
        assert_eq!(next(&mut retry).await, Seen::End);
    }

    #[tokio::test]
    async fn after_commit_nothing_more_is_recorded_and_there_is_no_retry() {
        let mut c = call().await;
        c.client
            .send_data(Bytes::from_static(b"hello"), false)
            .unwrap();
        assert_eq!(next(&mut c.body).await, data("hello"));
        c.body.commit();
        assert!(c.body.try_clone().is_none());
        c.client
            .send_data(Bytes::from_static(b"world"), true)
            .unwrap();
        assert_eq!(next(&mut c.body).await, data("world"));
        assert_eq!(next(&mut c.body).await, Seen::End);
        assert_eq!(c.body.lock().recorded, [&b"hello"[..]]);
    }

    #[tokio::test]
    async fn a_body_over_the_cap_frees_its_record_and_is_not_replayable() {
        let mut c = call().await;
        let chunk = Bytes::from(vec![7u8; 16 * 1024]);
        let chunks = MAX_REPLAY_BYTES / chunk.len() + 1;
        for i in 0..chunks {
            c.client.send_data(chunk.clone(), i + 1 == chunks).unwrap();
        }
        let mut passed = 0;
        loop {
            match next(&mut c.body).await {
                Seen::Data(d) => passed += d.len(),
                Seen::End => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        // Everything went through to this attempt; nothing is kept for another.
        assert_eq!(passed, chunks * chunk.len());
        assert!(c.body.lock().recorded.is_empty());
        assert!(c.body.try_clone().is_none());
    }

    #[tokio::test]
    async fn the_end_is_known_with_the_last_chunk_on_each_attempt() {
        let mut c = call().await;
        c.client
            .send_data(Bytes::from_static(b"hello"), true)
            .unwrap();
        assert_eq!(next(&mut c.body).await, data("hello"));
        // So that the relay can send END_STREAM on the last DATA frame.
        assert!(c.body.is_end_stream());
        let mut retry = c.body.try_clone().expect("replayable");
        assert!(!retry.is_end_stream());
        assert_eq!(next(&mut retry).await, data("hello"));
        assert!(retry.is_end_stream());
    }

    #[tokio::test]
    async fn a_client_reset_is_an_error_with_its_reason() {
        let mut c = call().await;
        c.client
            .send_data(Bytes::from_static(b"hello"), false)
            .unwrap();
        assert_eq!(next(&mut c.body).await, data("hello"));
        c.client.send_reset(Reason::CANCEL);
        assert_eq!(next(&mut c.body).await, Seen::Reset(Some(Reason::CANCEL)));
    }
}
