//! One direction of a proxied stream: frames taken from a body and sent on an HTTP/2
//! stream, with flow control (at most one frame waits for the stream's window; the next
//! is taken only once it has gone).

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Body;

/// How a body's error is passed on: the reason the outgoing stream is reset with.
pub trait ResetReason {
    /// The HTTP/2 reason to reset the outgoing stream with.
    fn reset_reason(&self) -> h2::Reason;
}

impl ResetReason for h2::Error {
    /// The peer's own reason (e.g. CANCEL) when it reset its stream, else INTERNAL_ERROR.
    fn reset_reason(&self) -> h2::Reason {
        self.reason().unwrap_or(h2::Reason::INTERNAL_ERROR)
    }
}

impl ResetReason for Infallible {
    fn reset_reason(&self) -> h2::Reason {
        match *self {}
    }
}

/// Sends `body` on `tx` until the body ends, the stream is reset, or the connection dies.
#[derive(Debug)]
pub struct Relay<B> {
    body: B,
    tx: h2::SendStream<Bytes>,
    /// Nothing sent yet: the first chunk is queued without waiting for window capacity
    /// (h2 holds it until the window allows), so that a small message goes out with its
    /// HEADERS.
    first: bool,
    /// A chunk waiting for window capacity, and whether it ends the stream.
    waiting: Option<(Bytes, bool)>,
}

impl<B> Relay<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: ResetReason + std::fmt::Display,
{
    /// A relay of `body` onto `tx`.
    pub fn new(body: B, tx: h2::SendStream<Bytes>) -> Self {
        Self {
            body,
            tx,
            first: true,
            waiting: None,
        }
    }

    /// Resets the outgoing stream (the call was abandoned).
    pub fn reset(&mut self, reason: h2::Reason) {
        self.tx.send_reset(reason);
    }

    /// About to wait: unless the peer has reset the stream (or the connection died;
    /// then there is nothing more to send), be woken if it does. (Sends after a reset
    /// fail, so a busy relay notices without asking.)
    fn wait(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self.tx.poll_reset(cx) {
            Poll::Ready(_) => Poll::Ready(()),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Moves frames until the body is done (`Ready`) or must wait (`Pending`).
    pub fn poll_relay(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if let Some((data, eos)) = self.waiting.take() {
                while self.tx.capacity() == 0 {
                    match self.tx.poll_capacity(cx) {
                        Poll::Ready(Some(Ok(_))) => {}
                        Poll::Ready(Some(Err(_)) | None) => return Poll::Ready(()),
                        Poll::Pending => {
                            self.waiting = Some((data, eos));
                            return self.wait(cx);
                        }
                    }
                }
                if self.tx.send_data(data, eos).is_err() || eos {
                    return Poll::Ready(());
                }
                continue;
            }
            let frame = match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => return self.wait(cx),
                Poll::Ready(None) => {
                    let _ = self.tx.send_data(Bytes::new(), true);
                    return Poll::Ready(());
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::debug!(error = %e, "incoming stream failed; resetting the outgoing one");
                    self.tx.send_reset(e.reset_reason());
                    return Poll::Ready(());
                }
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            match frame.into_data() {
                Ok(data) => {
                    let eos = self.body.is_end_stream();
                    if std::mem::take(&mut self.first) {
                        if self.tx.send_data(data, eos).is_err() || eos {
                            return Poll::Ready(());
                        }
                    } else {
                        // Claim a little window first; h2 raises the claim to the chunk's
                        // size when it is sent.
                        self.tx.reserve_capacity(1);
                        self.waiting = Some((data, eos));
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        self.tx.reserve_capacity(0);
                        let _ = self.tx.send_trailers(trailers);
                        return Poll::Ready(());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::future::poll_fn;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use http::HeaderMap;
    use http_body::Frame;

    use super::*;
    use crate::proxy::body::H2Body;
    use crate::testkit::h2_pair::{within, H2Pair, H2Stream};

    /// Lets every task run until none can move (everything here is in memory).
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    /// A body of given frames that counts how many were taken; after them it ends, or
    /// stays pending (a client that has not sent more yet).
    struct Frames {
        frames: VecDeque<Frame<Bytes>>,
        ends: bool,
        taken: Arc<AtomicUsize>,
    }

    impl Frames {
        fn new(frames: Vec<Frame<Bytes>>, ends: bool) -> (Self, Arc<AtomicUsize>) {
            let taken = Arc::new(AtomicUsize::new(0));
            let body = Self {
                frames: frames.into(),
                ends,
                taken: Arc::clone(&taken),
            };
            (body, taken)
        }
    }

    impl Body for Frames {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            match self.frames.pop_front() {
                Some(f) => {
                    self.taken.fetch_add(1, Ordering::SeqCst);
                    Poll::Ready(Some(Ok(f)))
                }
                None if self.ends => Poll::Ready(None),
                None => Poll::Pending,
            }
        }

        fn is_end_stream(&self) -> bool {
            self.ends && self.frames.is_empty()
        }
    }

    fn chunk(s: &'static str) -> Frame<Bytes> {
        Frame::data(Bytes::from_static(s.as_bytes()))
    }

    fn trailers() -> HeaderMap {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", "0".parse().unwrap());
        t
    }

    /// A backend with `window` bytes of stream window (h2's default if `None`), and one
    /// stream opened to it: the relay sends on `stream.send`, the backend reads `stream.recv`.
    async fn backend(window: Option<u32>) -> (H2Pair, H2Stream) {
        let mut server = h2::server::Builder::new();
        if let Some(w) = window {
            server.initial_window_size(w);
        }
        let mut pair = H2Pair::with(&h2::client::Builder::new(), &server)
            .await
            .unwrap();
        let stream = pair.stream(false).await.unwrap();
        (pair, stream)
    }

    /// Runs `relay` to its end in a task of its own.
    fn spawn_relay<B>(mut relay: Relay<B>) -> tokio::task::JoinHandle<()>
    where
        B: Body<Data = Bytes> + Unpin + Send + 'static,
        B::Error: ResetReason + std::fmt::Display,
    {
        tokio::spawn(async move { poll_fn(|cx| relay.poll_relay(cx)).await })
    }

    /// The backend's next DATA frame, without giving its window back.
    async fn read_data(recv: &mut h2::RecvStream) -> Option<Result<Bytes, h2::Error>> {
        within("a DATA frame", recv.data()).await
    }

    /// The backend's next `n` bytes (one DATA frame or more), without giving its window back.
    async fn read_bytes(recv: &mut h2::RecvStream, n: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while got.len() < n {
            let d = read_data(recv).await.expect("more data").unwrap();
            got.extend_from_slice(&d);
        }
        got
    }

    /// Everything the backend receives: the data (window given back as it comes) and
    /// the trailers.
    async fn read_all(recv: &mut h2::RecvStream) -> (Vec<u8>, Option<HeaderMap>) {
        let mut all = Vec::new();
        while let Some(d) = read_data(recv).await {
            let d = d.unwrap();
            let _ = recv.flow_control().release_capacity(d.len());
            all.extend_from_slice(&d);
        }
        let trailers = within("trailers", recv.trailers()).await.unwrap();
        (all, trailers)
    }

    /// The reason the backend's stream was reset with.
    async fn reset_reason(recv: &mut h2::RecvStream) -> Option<h2::Reason> {
        loop {
            match read_data(recv).await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return e.reason(),
                None => panic!("the stream ended without a reset"),
            }
        }
    }

    #[tokio::test]
    async fn data_and_trailers_arrive_in_order() {
        let (_pair, mut stream) = backend(None).await;
        let frames = vec![
            chunk("a"),
            chunk("bc"),
            chunk("def"),
            Frame::trailers(trailers()),
        ];
        let (body, _) = Frames::new(frames, true);
        let relay = spawn_relay(Relay::new(body, stream.send));
        let (data, t) = read_all(&mut stream.recv).await;
        assert_eq!(data, b"abcdef");
        assert_eq!(t, Some(trailers()));
        within("the relay's end", relay).await.unwrap();
    }

    #[tokio::test]
    async fn a_body_without_trailers_ends_the_stream() {
        let (_pair, mut stream) = backend(None).await;
        let (body, _) = Frames::new(vec![chunk("abc"), chunk("de")], true);
        let relay = spawn_relay(Relay::new(body, stream.send));
        let (data, t) = read_all(&mut stream.recv).await;
        assert_eq!(data, b"abcde");
        assert_eq!(t, None);
        assert!(stream.recv.is_end_stream());
        within("the relay's end", relay).await.unwrap();
    }

    #[tokio::test]
    async fn at_most_one_frame_waits_for_the_window() {
        // An 8-byte window and 8-byte chunks: each chunk needs the backend to give the
        // window back before the next can go.
        let (_pair, mut stream) = backend(Some(8)).await;
        let chunks = ["chunk-0.", "chunk-1.", "chunk-2.", "chunk-3.", "chunk-4."];
        let frames = chunks.iter().map(|c| chunk(c)).collect();
        let (body, taken) = Frames::new(frames, true);
        let relay = spawn_relay(Relay::new(body, stream.send));
        for (i, c) in chunks.iter().enumerate() {
            let d = read_bytes(&mut stream.recv, c.len()).await;
            assert_eq!(d, c.as_bytes());
            settle().await;
            // The chunk received, and at most the next one taken from the body.
            assert_eq!(taken.load(Ordering::SeqCst), (i + 2).min(chunks.len()));
            assert_eq!(
                relay.is_finished(),
                i + 1 == chunks.len(),
                "after chunk {i}"
            );
            let _ = stream.recv.flow_control().release_capacity(d.len());
        }
        assert!(read_data(&mut stream.recv).await.is_none());
        within("the relay's end", relay).await.unwrap();
    }

    #[tokio::test]
    async fn a_failed_incoming_stream_resets_the_outgoing_one_with_its_reason() {
        // The client side: a client's stream into the proxy, read as the proxy does.
        let mut clients = H2Pair::start().await.unwrap();
        let mut client = clients.stream(false).await.unwrap();
        let (_pair, mut stream) = backend(None).await;
        let relay = spawn_relay(Relay::new(H2Body::new(client.recv), stream.send));
        client
            .send
            .send_data(Bytes::from_static(b"hello"), false)
            .unwrap();
        client.send.send_reset(h2::Reason::CANCEL);
        assert_eq!(
            reset_reason(&mut stream.recv).await,
            Some(h2::Reason::CANCEL)
        );
        within("the relay's end", relay).await.unwrap();
    }

    #[tokio::test]
    async fn a_backend_reset_ends_a_relay_waiting_for_the_body() {
        let (_pair, mut stream) = backend(None).await;
        let (body, taken) = Frames::new(vec![chunk("abc")], false);
        let relay = spawn_relay(Relay::new(body, stream.send));
        assert_eq!(read_bytes(&mut stream.recv, 3).await, b"abc");
        settle().await;
        assert!(!relay.is_finished(), "the body has not ended");
        stream.respond.send_reset(h2::Reason::REFUSED_STREAM);
        within("the relay's end", relay).await.unwrap();
        assert_eq!(taken.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_backend_reset_ends_a_relay_waiting_for_the_window() {
        let (_pair, mut stream) = backend(Some(8)).await;
        let frames = vec![chunk("chunk-0."), chunk("chunk-1."), chunk("chunk-2.")];
        let (body, taken) = Frames::new(frames, true);
        let relay = spawn_relay(Relay::new(body, stream.send));
        assert_eq!(read_bytes(&mut stream.recv, 8).await, b"chunk-0.");
        settle().await;
        assert!(!relay.is_finished(), "waiting for the window");
        stream.respond.send_reset(h2::Reason::CANCEL);
        within("the relay's end", relay).await.unwrap();
        // The chunk that waited was dropped, and nothing more was taken.
        assert_eq!(taken.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn reset_sends_the_reason_given() {
        let (_pair, mut stream) = backend(None).await;
        let (body, _) = Frames::new(vec![chunk("abc")], false);
        let mut relay = Relay::new(body, stream.send);
        poll_fn(|cx| match relay.poll_relay(cx) {
            Poll::Pending => Poll::Ready(()),
            Poll::Ready(()) => panic!("the body has not ended"),
        })
        .await;
        relay.reset(h2::Reason::CANCEL);
        assert_eq!(
            reset_reason(&mut stream.recv).await,
            Some(h2::Reason::CANCEL)
        );
    }
}
