//! Async framing over any tokio byte stream (QUIC streams, TCP, pipes), behind the
//! `tokio` feature. Reading is cancel-safe: bytes read stay buffered, so `next` can sit
//! in a `select!`.

use bytes::BytesMut;
use serde::{Serialize, de::DeserializeOwned};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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
}

/// Why a frame could not be written.
#[derive(Debug, Error)]
pub enum WriteError {
    #[error("stream write failed: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

/// Reads frames from a byte stream.
#[derive(Debug)]
pub struct FramedRead<R> {
    inner: R,
    buf: BytesMut,
    decoder: FrameDecoder,
}

impl<R: AsyncRead + Unpin> FramedRead<R> {
    /// A reader refusing frames over `max_frame_len` bytes.
    pub fn new(inner: R, max_frame_len: u32) -> Self {
        FramedRead {
            inner,
            buf: BytesMut::with_capacity(8 * 1024),
            decoder: FrameDecoder::new(max_frame_len),
        }
    }

    /// The next message, or `Ok(None)` when the stream ended cleanly between frames.
    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ReadError> {
        loop {
            if let Some(msg) = self.decoder.decode::<T>(&mut self.buf)? {
                return Ok(Some(msg));
            }
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return match self.buf.len() {
                    0 => Ok(None),
                    buffered => Err(ReadError::UnexpectedEnd { buffered }),
                };
            }
        }
    }

    /// The [`Hello`] that opens a stream, version checked first.
    pub async fn hello(&mut self) -> Result<Option<Hello>, ReadError> {
        loop {
            if let Some(hello) = self.decoder.decode_hello(&mut self.buf)? {
                return Ok(Some(hello));
            }
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return match self.buf.len() {
                    0 => Ok(None),
                    buffered => Err(ReadError::UnexpectedEnd { buffered }),
                };
            }
        }
    }

    /// The underlying stream.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }
}

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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NoticeReply, QuerierToScheduler, Role, StreamKind};

    #[tokio::test]
    async fn frames_cross_a_pipe_in_order_and_the_end_is_clean() {
        let (a, b) = tokio::io::duplex(7); // tiny buffer: frames arrive in pieces
        let writer = tokio::spawn(async move {
            let mut w = FramedWrite::new(a, 1024);
            w.send(&Hello::new(Role::Querier, "q", StreamKind::DequeueLoop))
                .await
                .unwrap();
            for _ in 0..3 {
                w.buffer(&QuerierToScheduler::Ready { finished: None }).unwrap();
            }
            w.flush().await.unwrap();
        });
        let mut r = FramedRead::new(b, 1024);
        assert_eq!(r.hello().await.unwrap().unwrap().id, "q");
        for _ in 0..3 {
            assert_eq!(
                r.next::<QuerierToScheduler>().await.unwrap(),
                Some(QuerierToScheduler::Ready { finished: None })
            );
        }
        writer.await.unwrap();
        assert!(r.next::<QuerierToScheduler>().await.unwrap().is_none());
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
}
