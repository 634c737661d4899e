//! Async framing over any tokio byte stream (QUIC streams, TCP, pipes), behind the
//! `tokio` feature. Reading is cancel-safe: bytes read stay buffered, so `next` can sit
//! in a `select!`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use serde::{Serialize, de::DeserializeOwned};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::{DecodeError, EncodeError, FrameDecoder, Hello, encode};

/// Why a frame could not be read.
#[derive(Debug, Error)]
pub enum ReadError {
    #[error("stream read failed: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({buffered} bytes of it received)")]
    UnexpectedEnd { buffered: usize },
    /// A frame that had started to arrive was not complete in time.
    #[error("a frame was not completed in time ({buffered} bytes of it received)")]
    FrameTimeout { buffered: usize },
    /// The connection's streams together buffered more than their budget.
    #[error("receive budget exceeded: {used} bytes buffered, {limit} allowed per connection")]
    BudgetExceeded { used: usize, limit: usize },
}

/// Why a frame could not be written.
#[derive(Debug, Error)]
pub enum WriteError {
    #[error("stream write failed: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

/// Bytes that a group of readers (the streams of one connection) may buffer together,
/// partial frames included: a peer that starts many large frames and never finishes them
/// runs out of its own budget, not the process's memory.
#[derive(Debug, Clone)]
pub struct ReceiveBudget {
    used: Arc<AtomicUsize>,
    limit: usize,
}

impl ReceiveBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        ReceiveBudget {
            used: Arc::new(AtomicUsize::new(0)),
            limit,
        }
    }

    /// Bytes charged now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

/// Reads frames from a byte stream.
#[derive(Debug)]
pub struct FramedRead<R> {
    inner: R,
    buf: BytesMut,
    decoder: FrameDecoder,
    /// A frame started must be complete within this long.
    frame_timeout: Option<Duration>,
    /// When the frame now arriving must be complete.
    frame_deadline: Option<Instant>,
    budget: Option<ReceiveBudget>,
    /// What this reader's buffer is charged to `budget` now.
    charged: usize,
}

impl<R: AsyncRead + Unpin> FramedRead<R> {
    /// A reader refusing frames over `max_frame_len` bytes.
    pub fn new(inner: R, max_frame_len: u32) -> Self {
        FramedRead {
            inner,
            buf: BytesMut::with_capacity(INITIAL_BUFFER),
            decoder: FrameDecoder::new(max_frame_len),
            frame_timeout: None,
            frame_deadline: None,
            budget: None,
            charged: 0,
        }
    }

    /// Refuses frames over `max_frame_len` bytes from now on (clamped to
    /// [`HARD_MAX_FRAME_LEN`](crate::HARD_MAX_FRAME_LEN)).
    pub fn set_max_frame_len(&mut self, max_frame_len: u32) {
        self.decoder = FrameDecoder::new(max_frame_len);
    }

    /// This reader, failing with [`ReadError::FrameTimeout`] when a frame that has started
    /// to arrive is not complete within `timeout` (a peer may not park half a frame).
    pub fn with_frame_timeout(mut self, timeout: Duration) -> Self {
        self.frame_timeout = Some(timeout);
        self
    }

    /// This reader, charging what its buffer holds (reserved room included) to `budget`
    /// and failing with [`ReadError::BudgetExceeded`] when the group goes over it.
    pub fn with_budget(mut self, budget: ReceiveBudget) -> Self {
        self.budget = Some(budget);
        self.settle().ok();
        self
    }

    /// The next message, or `Ok(None)` when the stream ended cleanly between frames.
    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ReadError> {
        loop {
            if let Some(msg) = self.decoder.decode::<T>(&mut self.buf)? {
                self.frame_done()?;
                return Ok(Some(msg));
            }
            if self.fill().await? == 0 {
                return match self.buf.len() {
                    0 => Ok(None),
                    buffered => Err(ReadError::UnexpectedEnd { buffered }),
                };
            }
        }
    }

    /// The next message if a whole one is buffered already, without reading; `Ok(None)`
    /// when none is ([`next`](Self::next) waits for it). A reader takes every frame that
    /// arrived together with this, then acts on them at once.
    pub fn try_next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ReadError> {
        match self.decoder.decode::<T>(&mut self.buf)? {
            Some(msg) => {
                self.frame_done()?;
                Ok(Some(msg))
            }
            None => Ok(None),
        }
    }

    /// The [`Hello`] that opens a stream, version checked first.
    pub async fn hello(&mut self) -> Result<Option<Hello>, ReadError> {
        loop {
            if let Some(hello) = self.decoder.decode_hello(&mut self.buf)? {
                self.frame_done()?;
                return Ok(Some(hello));
            }
            if self.fill().await? == 0 {
                return match self.buf.len() {
                    0 => Ok(None),
                    buffered => Err(ReadError::UnexpectedEnd { buffered }),
                };
            }
        }
    }

    /// Bytes buffered and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The underlying stream.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Reads more, within the deadline of the frame under way (cancel-safe: the deadline
    /// and the bytes read stay in `self`).
    async fn fill(&mut self) -> Result<usize, ReadError> {
        self.settle()?;
        if !self.buf.is_empty()
            && self.frame_deadline.is_none()
            && let Some(t) = self.frame_timeout
        {
            self.frame_deadline = Some(Instant::now() + t);
        }
        let read = self.inner.read_buf(&mut self.buf);
        let n = match self.frame_deadline {
            Some(at) => tokio::time::timeout_at(at, read)
                .await
                .map_err(|_| ReadError::FrameTimeout {
                    buffered: self.buf.len(),
                })??,
            None => read.await?,
        };
        self.settle()?;
        Ok(n)
    }

    /// A frame was taken: the next one's clock starts when its first byte is here.
    fn frame_done(&mut self) -> Result<(), ReadError> {
        self.frame_deadline = None;
        if self.buf.is_empty() && self.buf.capacity() > INITIAL_BUFFER * 8 {
            // A large frame passed: give its room back.
            self.buf = BytesMut::with_capacity(INITIAL_BUFFER);
        }
        self.settle()
    }

    /// Charges the buffer's current size to the budget.
    fn settle(&mut self) -> Result<(), ReadError> {
        let Some(budget) = &self.budget else { return Ok(()) };
        let now = self.buf.capacity().max(self.buf.len());
        if now >= self.charged {
            budget.used.fetch_add(now - self.charged, Ordering::Relaxed);
        } else {
            budget.used.fetch_sub(self.charged - now, Ordering::Relaxed);
        }
        self.charged = now;
        let used = budget.used.load(Ordering::Relaxed);
        if used > budget.limit {
            return Err(ReadError::BudgetExceeded {
                used,
                limit: budget.limit,
            });
        }
        Ok(())
    }
}

impl<R> Drop for FramedRead<R> {
    fn drop(&mut self) {
        if let Some(budget) = &self.budget {
            budget.used.fetch_sub(self.charged, Ordering::Relaxed);
        }
    }
}

/// Room a reader starts with.
const INITIAL_BUFFER: usize = 8 * 1024;

/// Writes frames to a byte stream, batching those buffered before a flush into one write.
#[derive(Debug)]
pub struct FramedWrite<W> {
    inner: W,
    buf: BytesMut,
    max_frame_len: u32,
}

impl<W: AsyncWrite + Unpin> FramedWrite<W> {
    /// A writer refusing to produce frames over `max_frame_len` bytes.
    pub fn new(inner: W, max_frame_len: u32) -> Self {
        FramedWrite {
            inner,
            buf: BytesMut::with_capacity(8 * 1024),
            max_frame_len,
        }
    }

    /// The largest frame this writer produces.
    pub fn max_frame_len(&self) -> u32 {
        self.max_frame_len
    }

    /// Adds a frame to the pending batch without writing it.
    pub fn buffer<T: Serialize>(&mut self, msg: &T) -> Result<(), EncodeError> {
        encode(msg, &mut self.buf, self.max_frame_len)
    }

    /// Writes every buffered frame.
    pub async fn flush(&mut self) -> Result<(), WriteError> {
        if !self.buf.is_empty() {
            self.inner.write_all(&self.buf).await?;
            self.buf.clear();
        }
        self.inner.flush().await?;
        Ok(())
    }

    /// Bytes buffered and not yet written.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Buffers one frame and writes the batch.
    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), WriteError> {
        self.buffer(msg)?;
        self.flush().await
    }

    /// The underlying stream.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// A writer task's loop: writes what `source` yields until every sender is gone, each
    /// write carrying the message waited for and every message already waiting behind it
    /// (one wake-up and one write for a burst). Err: the stream failed, or a message could
    /// not be encoded.
    pub async fn pump<T: Serialize, S: FrameSource<T>>(&mut self, source: &mut S) -> Result<(), WriteError> {
        while let Some(first) = source.next().await {
            self.buffer(&first)?;
            while let Some(m) = source.ready() {
                self.buffer(&m)?;
            }
            self.flush().await?;
        }
        Ok(())
    }
}

/// Where a writer task takes its messages from: a tokio channel, bounded or not.
pub trait FrameSource<T> {
    /// Waits for the next message; `None` once every sender is gone.
    fn next(&mut self) -> impl std::future::Future<Output = Option<T>> + Send;
    /// A message already waiting, if any.
    fn ready(&mut self) -> Option<T>;
}

impl<T: Send> FrameSource<T> for tokio::sync::mpsc::Receiver<T> {
    fn next(&mut self) -> impl std::future::Future<Output = Option<T>> + Send {
        self.recv()
    }

    fn ready(&mut self) -> Option<T> {
        self.try_recv().ok()
    }
}

impl<T: Send> FrameSource<T> for tokio::sync::mpsc::UnboundedReceiver<T> {
    fn next(&mut self) -> impl std::future::Future<Output = Option<T>> + Send {
        self.recv()
    }

    fn ready(&mut self) -> Option<T> {
        self.try_recv().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NoticeReply, QuerierToScheduler, Role, StreamKind, encode_to_vec};

    #[tokio::test]
    async fn a_pump_writes_a_burst_at_once_and_ends_with_its_senders() {
        let (a, b) = tokio::io::duplex(4096);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for worker in 0..3 {
            tx.send(QuerierToScheduler::Ready { worker, finished: None }).unwrap();
        }
        drop(tx);
        let mut w = FramedWrite::new(a, 1024);
        w.pump(&mut rx).await.unwrap();
        assert_eq!(w.buffered(), 0, "everything written");
        drop(w);
        let mut r = FramedRead::new(b, 1024);
        for worker in 0..3 {
            assert_eq!(
                r.next::<QuerierToScheduler>().await.unwrap(),
                Some(QuerierToScheduler::Ready { worker, finished: None })
            );
        }
        assert!(r.next::<QuerierToScheduler>().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn frames_cross_a_pipe_in_order_and_the_end_is_clean() {
        let (a, b) = tokio::io::duplex(7); // tiny buffer: frames arrive in pieces
        let writer = tokio::spawn(async move {
            let mut w = FramedWrite::new(a, 1024);
            w.send(&Hello::new(Role::Querier, "q", StreamKind::DequeueLoop))
                .await
                .unwrap();
            for _ in 0..3 {
                w.buffer(&QuerierToScheduler::Ready {
                    worker: 0,
                    finished: None,
                })
                .unwrap();
            }
            w.flush().await.unwrap();
        });
        let mut r = FramedRead::new(b, 1024);
        assert_eq!(r.hello().await.unwrap().unwrap().id, "q");
        for _ in 0..3 {
            assert_eq!(
                r.next::<QuerierToScheduler>().await.unwrap(),
                Some(QuerierToScheduler::Ready {
                    worker: 0,
                    finished: None
                })
            );
        }
        writer.await.unwrap();
        assert!(r.next::<QuerierToScheduler>().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn try_next_takes_only_whole_frames_already_buffered() {
        let (mut a, b) = tokio::io::duplex(1024);
        let reply = encode_to_vec(&NoticeReply::Acknowledged, 1024).unwrap();
        // Two whole frames and the first bytes of a third arrive together.
        let mut burst = [reply.clone(), reply.clone()].concat();
        burst.extend_from_slice(&reply[..2]);
        a.write_all(&burst).await.unwrap();
        let mut r = FramedRead::new(b, 1024);
        assert_eq!(r.try_next::<NoticeReply>().unwrap(), None, "nothing read yet");
        assert_eq!(r.next::<NoticeReply>().await.unwrap(), Some(NoticeReply::Acknowledged));
        assert_eq!(r.try_next::<NoticeReply>().unwrap(), Some(NoticeReply::Acknowledged));
        assert_eq!(r.try_next::<NoticeReply>().unwrap(), None, "half a frame waits");
        assert_eq!(r.buffered(), 2);
        a.write_all(&reply[2..]).await.unwrap();
        assert_eq!(r.next::<NoticeReply>().await.unwrap(), Some(NoticeReply::Acknowledged));
        // A frame over the limit, buffered behind a whole one, is refused here too.
        a.write_all(&[&reply[..], &[0, 1, 0, 0]].concat()).await.unwrap();
        assert_eq!(r.next::<NoticeReply>().await.unwrap(), Some(NoticeReply::Acknowledged));
        assert!(matches!(
            r.try_next::<NoticeReply>(),
            Err(ReadError::Decode(DecodeError::FrameTooLarge { .. }))
        ));
    }

    #[tokio::test]
    async fn a_stream_cut_inside_a_frame_is_an_error() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(&[0, 0, 0, 9, 1, 2]).await.unwrap();
        drop(a);
        let mut r = FramedRead::new(b, 1024);
        assert!(matches!(
            r.next::<NoticeReply>().await,
            Err(ReadError::UnexpectedEnd { buffered: 6 })
        ));
    }

    #[tokio::test]
    async fn an_oversized_frame_is_refused() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(&[0, 1, 0, 0]).await.unwrap();
        let mut r = FramedRead::new(b, 1024);
        assert!(matches!(
            r.next::<NoticeReply>().await,
            Err(ReadError::Decode(DecodeError::FrameTooLarge { .. }))
        ));
    }

    #[tokio::test]
    async fn half_a_frame_parked_past_the_frame_timeout_is_an_error() {
        let (mut a, b) = tokio::io::duplex(64);
        let mut r = FramedRead::new(b, 1024).with_frame_timeout(std::time::Duration::from_millis(50));
        // Whole frames come at any pace; only a started frame is timed.
        a.write_all(&encode_to_vec(&NoticeReply::Acknowledged, 1024).unwrap())
            .await
            .unwrap();
        assert_eq!(r.next::<NoticeReply>().await.unwrap(), Some(NoticeReply::Acknowledged));
        a.write_all(&[0, 0, 0, 9, 1]).await.unwrap();
        assert!(matches!(
            r.next::<NoticeReply>().await,
            Err(ReadError::FrameTimeout { buffered: 5 })
        ));
    }

    #[tokio::test]
    async fn readers_sharing_a_budget_cannot_buffer_more_than_it() {
        let budget = ReceiveBudget::new(64 * 1024);
        let (mut a1, b1) = tokio::io::duplex(1 << 20);
        let (_a2, b2) = tokio::io::duplex(64);
        let mut r1 = FramedRead::new(b1, 1 << 20).with_budget(budget.clone());
        let r2 = FramedRead::new(b2, 1 << 20).with_budget(budget.clone());
        assert_eq!(budget.used(), 2 * INITIAL_BUFFER);
        // A frame announcing 1 MiB, sent in part: more than the budget arrives.
        let mut partial = vec![0, 16, 0, 0];
        partial.extend_from_slice(&[7; 100 * 1024]);
        a1.write_all(&partial).await.unwrap();
        let err = r1.next::<NoticeReply>().await.unwrap_err();
        assert!(matches!(err, ReadError::BudgetExceeded { limit: 65536, .. }), "{err:?}");
        drop(r1);
        drop(r2);
        assert_eq!(budget.used(), 0, "readers give their charge back");
    }
}
