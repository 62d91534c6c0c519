//! The NBD server's IO: accepts TCP or Unix socket connections, runs the
//! handshake of [`proto`], then serves requests with many in flight per
//! connection. Requests are read one after another; each runs on its own
//! task; replies go out through one writer task per connection, in whatever
//! order they complete (cookies tell them apart).

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::FileTypeExt;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs, UnixListener, UnixStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::proto::{
    self, Command, Errno, Export, Handshake, ProtocolError, RequestHeader, Step,
    REQUEST_HEADER_LEN, SIMPLE_REPLY_HEADER_LEN,
};
use crate::device::BlockDevice;

/// A client gets this long for the whole handshake; then it is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// After a connection stops reading requests (disconnect, shutdown, error),
/// how long its in-flight requests get to finish and their replies to go
/// out before the connection is dropped anyway.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes of request payloads and read replies one connection may hold at
/// once. Every request costs at least `MIN_REQUEST_COST`, which bounds the
/// requests in flight too (128) and keeps a client that sends requests but
/// never reads replies from growing the reply queue without end.
const IN_FLIGHT_BUDGET: usize = 64 << 20;
const MIN_REQUEST_COST: u32 = 512 << 10;
const READ_BUFFER: usize = 256 << 10;
const WRITE_BUFFER: usize = 256 << 10;
/// Pause after a failed accept (e.g. out of file descriptors), so the loop
/// does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
const DESCRIPTION: &str = "Quiver volume";

/// Where the server listens: a TCP address or a Unix socket path.
pub struct NbdListener {
    inner: Listener,
}

enum Listener {
    Tcp(TcpListener),
    Unix {
        listener: UnixListener,
        path: PathBuf,
    },
}

/// The address a listener is bound to (port 0 resolved).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bound {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl NbdListener {
    pub async fn bind_tcp(addr: impl ToSocketAddrs) -> io::Result<NbdListener> {
        Ok(NbdListener {
            inner: Listener::Tcp(TcpListener::bind(addr).await?),
        })
    }

    /// Binds a Unix socket at `path`, first removing a stale socket left by a
    /// server that is gone. A live server's socket, or a file that is not a
    /// socket, is left alone and is an error.
    pub fn bind_unix(path: impl Into<PathBuf>) -> io::Result<NbdListener> {
        let path = path.into();
        match std::fs::symlink_metadata(&path) {
            Ok(metadata) if metadata.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("{} belongs to a running server", path.display()),
                    ));
                }
                std::fs::remove_file(&path)?;
            }
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(&path)?;
        Ok(NbdListener {
            inner: Listener::Unix { listener, path },
        })
    }

    pub fn bound(&self) -> io::Result<Bound> {
        match &self.inner {
            Listener::Tcp(listener) => Ok(Bound::Tcp(listener.local_addr()?)),
            Listener::Unix { path, .. } => Ok(Bound::Unix(path.clone())),
        }
    }

    async fn accept(&self) -> io::Result<(Stream, String)> {
        match &self.inner {
            Listener::Tcp(listener) => {
                let (stream, peer) = listener.accept().await?;
                // Replies are single writes already; Nagle would only delay them.
                stream.set_nodelay(true)?;
                Ok((Stream::Tcp(stream), peer.to_string()))
            }
            Listener::Unix { listener, path } => {
                let (stream, _) = listener.accept().await?;
                Ok((Stream::Unix(stream), format!("unix:{}", path.display())))
            }
        }
    }
}

impl Drop for NbdListener {
    fn drop(&mut self) {
        if let Listener::Unix { path, .. } = &self.inner {
            if let Err(e) = std::fs::remove_file(path) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "could not remove the NBD socket");
                }
            }
        }
    }
}

impl Bound {
    /// The NBD URI of `export_name` here (as qemu, nbdinfo and fio take it).
    pub fn uri(&self, export_name: &str) -> String {
        let name = percent_encode(export_name, b"");
        match self {
            Bound::Tcp(addr) => format!("nbd://{addr}/{name}"),
            Bound::Unix(path) => format!(
                "nbd+unix:///{name}?socket={}",
                percent_encode(&path.to_string_lossy(), b"/")
            ),
        }
    }
}

impl fmt::Display for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Bound::Tcp(addr) => write!(f, "{addr}"),
            Bound::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

fn percent_encode(text: &str, keep: &[u8]) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) || keep.contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Serves `device` as the export `export_name` (the empty name selects it
/// too) on `listener` until `shutdown` completes. Then it stops accepting,
/// lets every connection finish the requests it has read, closes them, and
/// returns; a Unix socket file is removed.
pub async fn serve<D: BlockDevice>(
    device: Arc<D>,
    export_name: String,
    listener: NbdListener,
    shutdown: impl Future<Output = ()>,
) {
    let export_name: Arc<str> = export_name.into();
    let (stop, stopped) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut next_id = 0u64;
    if let Ok(bound) = listener.bound() {
        tracing::info!(at = %bound, export = %export_name, "serving NBD");
    }
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(finished) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = finished {
                    tracing::warn!(error = %e, "an NBD connection task failed");
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    next_id += 1;
                    let connection = Connection {
                        device: device.clone(),
                        export_name: export_name.clone(),
                        peer,
                        id: next_id,
                        stop: stopped.clone(),
                    };
                    connections.spawn(connection.run(stream));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting an NBD connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    tracing::info!(connections = connections.len(), "NBD server shutting down");
    // Receivers outlive nothing here: ignoring a send error is fine.
    let _ = stop.send(true);
    while let Some(finished) = connections.join_next().await {
        if let Err(e) = finished {
            tracing::warn!(error = %e, "an NBD connection task failed");
        }
    }
    drop(listener);
}

/// One client connection.
struct Connection<D> {
    device: Arc<D>,
    export_name: Arc<str>,
    /// For log lines: the client's address.
    peer: String,
    id: u64,
    stop: watch::Receiver<bool>,
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum Ending {
    #[error("the client aborted the handshake")]
    Aborted,
    #[error("the client disconnected (NBD_CMD_DISC)")]
    Disconnected,
    #[error("the client closed the connection")]
    Closed,
    #[error("the server is shutting down")]
    Shutdown,
    #[error("the client left during the handshake")]
    LeftDuringHandshake,
    #[error("the handshake took longer than {HANDSHAKE_TIMEOUT:?}")]
    HandshakeTimeout,
    #[error("protocol violation: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("the connection closed in the middle of a request")]
    Truncated,
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// A reply on its way to the writer, holding its share of the budget until
/// it is written.
struct Reply {
    bytes: Vec<u8>,
    _budget: OwnedSemaphorePermit,
}

/// What reading the next request produced.
enum Next {
    Run {
        cookie: u64,
        command: Command,
        payload: Vec<u8>,
        budget: OwnedSemaphorePermit,
    },
    Refuse {
        cookie: u64,
        errno: Errno,
        budget: OwnedSemaphorePermit,
    },
    Disconnect,
    Closed,
}

impl<D: BlockDevice> Connection<D> {
    async fn run(self, stream: Stream) {
        tracing::info!(peer = %self.peer, conn = self.id, "NBD connection opened");
        let ending = match stream {
            Stream::Tcp(stream) => {
                let (reader, writer) = stream.into_split();
                self.serve(reader, writer).await
            }
            Stream::Unix(stream) => {
                let (reader, writer) = stream.into_split();
                self.serve(reader, writer).await
            }
        };
        match ending {
            Ending::Protocol(_) | Ending::Truncated | Ending::HandshakeTimeout => {
                tracing::warn!(peer = %self.peer, conn = self.id, reason = %ending, "closing NBD connection")
            }
            _ => {
                tracing::info!(peer = %self.peer, conn = self.id, reason = %ending, "NBD connection closed")
            }
        }
    }

    async fn serve<R, W>(&self, reader: R, mut writer: W) -> Ending
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        // Sized at connect time: a resized device shows on new connections.
        let export = Export {
            name: self.export_name.to_string(),
            description: DESCRIPTION.to_string(),
            size: self.device.size(),
            read_only: self.device.read_only(),
        };
        let mut reader = BufReader::with_capacity(READ_BUFFER, reader);
        let mut stop = self.stop.clone();
        let handshake = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            handshake(&mut reader, &mut writer, export.clone()),
        );
        let step = tokio::select! {
            () = stopped(&mut stop) => return Ending::Shutdown,
            step = handshake => step,
        };
        match step {
            Err(_elapsed) => Ending::HandshakeTimeout,
            Ok(Err(Ending::Io(e)))
                if matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
                ) =>
            {
                Ending::LeftDuringHandshake
            }
            Ok(Err(ending)) => ending,
            Ok(Ok(Step::Abort)) => Ending::Aborted,
            Ok(Ok(_)) => {
                tracing::debug!(peer = %self.peer, conn = self.id, size = export.size, "NBD transmission");
                self.transmission(&export, reader, writer).await
            }
        }
    }

    async fn transmission<R, W>(
        &self,
        export: &Export,
        mut reader: BufReader<R>,
        writer: W,
    ) -> Ending
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let budget = Arc::new(Semaphore::new(IN_FLIGHT_BUDGET));
        let (replies, queued) = mpsc::unbounded_channel();
        let mut written = tokio::spawn(write_replies(writer, queued));
        let mut stop = self.stop.clone();
        let ending = loop {
            // Reading a request may wait on the budget or a slow payload:
            // shutdown and a dead writer cut it short (the connection closes
            // then, so a half-read request does not matter).
            let next = tokio::select! {
                biased;
                () = stopped(&mut stop) => break Ending::Shutdown,
                () = replies.closed() => break Ending::Closed,
                next = next_request(&mut reader, export, &budget) => next,
            };
            match next {
                Ok(Next::Run {
                    cookie,
                    command,
                    payload,
                    budget,
                }) => {
                    let device = self.device.clone();
                    let replies = replies.clone();
                    tokio::spawn(async move {
                        let bytes = execute(&*device, cookie, command, payload).await;
                        // The writer is gone only if the connection is.
                        let _ = replies.send(Reply {
                            bytes,
                            _budget: budget,
                        });
                    });
                }
                Ok(Next::Refuse {
                    cookie,
                    errno,
                    budget,
                }) => {
                    tracing::debug!(peer = %self.peer, conn = self.id, cookie, errno = errno.0, "refusing an NBD request");
                    let bytes = proto::simple_reply(cookie, Some(errno)).to_vec();
                    let _ = replies.send(Reply {
                        bytes,
                        _budget: budget,
                    });
                }
                Ok(Next::Disconnect) => break Ending::Disconnected,
                Ok(Next::Closed) => break Ending::Closed,
                Err(ending) => break ending,
            }
        };
        // In-flight requests hold clones of `replies`: the writer ends once
        // they have all answered.
        drop(replies);
        match tokio::time::timeout(DRAIN_TIMEOUT, &mut written).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => {
                tracing::debug!(peer = %self.peer, conn = self.id, error = %e, "writing NBD replies failed")
            }
            Ok(Err(e)) => {
                tracing::warn!(peer = %self.peer, conn = self.id, error = %e, "the NBD reply writer failed")
            }
            Err(_) => {
                tracing::warn!(peer = %self.peer, conn = self.id, "NBD replies still pending after {DRAIN_TIMEOUT:?}; dropping the connection");
                written.abort();
            }
        }
        ending
    }
}

/// Resolves once the server shuts down (or is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // An error means the server dropped the sender: stop all the same.
    let _ = stop.wait_for(|stopping| *stopping).await;
}

/// Runs the handshake to its end; `Ok` is [`Step::Transmission`] or
/// [`Step::Abort`].
async fn handshake<R, W>(reader: &mut R, writer: &mut W, export: Export) -> Result<Step, Ending>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut handshake = Handshake::new(export);
    writer.write_all(&handshake.greeting()).await?;
    writer.flush().await?;
    let mut input = Vec::new();
    let mut out = Vec::new();
    loop {
        input.resize(handshake.wanted(), 0);
        reader.read_exact(&mut input).await?;
        out.clear();
        let step = handshake.receive(&input, &mut out)?;
        writer.write_all(&out).await?;
        writer.flush().await?;
        if step != Step::Continue {
            return Ok(step);
        }
    }
}

/// Reads one request (and its payload), taking its share of the budget.
async fn next_request<R: AsyncRead + Unpin>(
    reader: &mut R,
    export: &Export,
    budget: &Arc<Semaphore>,
) -> Result<Next, Ending> {
    let Some(header) = read_header(reader).await? else {
        return Ok(Next::Closed);
    };
    let header = RequestHeader::decode(&header)?;
    let command = header.interpret(export);
    if command == Ok(Command::Disconnect) {
        return Ok(Next::Disconnect);
    }
    let payload_bytes = match command {
        Ok(Command::Read { length, .. } | Command::Write { length, .. }) => length,
        _ => 0,
    };
    let budget = budget
        .clone()
        .acquire_many_owned(payload_bytes.max(MIN_REQUEST_COST))
        .await
        .map_err(|_| io::Error::other("the request budget is closed"))?;
    let cookie = header.cookie;
    match command {
        Ok(command) => {
            let mut payload = Vec::new();
            if let Command::Write { length, .. } = command {
                payload.resize(length as usize, 0);
                reader.read_exact(&mut payload).await.map_err(truncated)?;
            }
            Ok(Next::Run {
                cookie,
                command,
                payload,
                budget,
            })
        }
        Err(errno) => {
            // A refused write's payload is still on the wire: skip it,
            // however large, without buffering it.
            let skip = u64::from(header.payload_len());
            let skipped = tokio::io::copy(&mut reader.take(skip), &mut tokio::io::sink()).await?;
            if skipped < skip {
                return Err(Ending::Truncated);
            }
            Ok(Next::Refuse {
                cookie,
                errno,
                budget,
            })
        }
    }
}

fn truncated(error: io::Error) -> Ending {
    if error.kind() == io::ErrorKind::UnexpectedEof {
        Ending::Truncated
    } else {
        Ending::Io(error)
    }
}

/// A request header, or None if the client closed the connection cleanly
/// between requests.
async fn read_header<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<Option<[u8; REQUEST_HEADER_LEN]>, Ending> {
    let mut header = [0; REQUEST_HEADER_LEN];
    let mut filled = 0;
    while filled < REQUEST_HEADER_LEN {
        let n = reader.read(&mut header[filled..]).await?;
        if n == 0 {
            return if filled == 0 {
                Ok(None)
            } else {
                Err(Ending::Truncated)
            };
        }
        filled += n;
    }
    Ok(Some(header))
}

/// Carries out one request; returns the whole reply.
async fn execute<D: BlockDevice>(
    device: &D,
    cookie: u64,
    command: Command,
    payload: Vec<u8>,
) -> Vec<u8> {
    let run = async {
        match command {
            Command::Read { offset, length } => {
                // Header and data in one buffer: one write to the socket.
                let mut reply = vec![0; SIMPLE_REPLY_HEADER_LEN + length as usize];
                device
                    .read_at(offset, &mut reply[SIMPLE_REPLY_HEADER_LEN..])
                    .await?;
                reply[..SIMPLE_REPLY_HEADER_LEN]
                    .copy_from_slice(&proto::simple_reply(cookie, None));
                Ok(Some(reply))
            }
            Command::Write { offset, fua, .. } => {
                with_fua(device, fua, device.write_at(offset, &payload)).await?;
                Ok(None)
            }
            Command::Flush => device.flush().await.map(|()| None),
            Command::Trim {
                offset,
                length,
                fua,
            } => {
                with_fua(device, fua, device.trim(offset, length.into())).await?;
                Ok(None)
            }
            Command::WriteZeroes {
                offset,
                length,
                fua,
            } => {
                with_fua(device, fua, device.write_zeroes(offset, length.into())).await?;
                Ok(None)
            }
            // The reader handles it; it never gets here.
            Command::Disconnect => Ok(None),
        }
    };
    // A panicking device must not leave the client waiting forever.
    let result: io::Result<Option<Vec<u8>>> = AssertUnwindSafe(run)
        .catch_unwind()
        .await
        .unwrap_or_else(|_| Err(io::Error::other("the device panicked")));
    match result {
        Ok(Some(reply)) => reply,
        Ok(None) => proto::simple_reply(cookie, None).to_vec(),
        Err(e) => {
            let errno = Errno::from_io(&e);
            if errno == Errno::EIO {
                tracing::warn!(?command, error = %e, "NBD request failed");
            } else {
                tracing::debug!(?command, error = %e, "NBD request refused by the device");
            }
            proto::simple_reply(cookie, Some(errno)).to_vec()
        }
    }
}

/// Runs a write, then (for FUA) a flush before the reply.
async fn with_fua<D: BlockDevice>(
    device: &D,
    fua: bool,
    write: impl Future<Output = io::Result<()>>,
) -> io::Result<()> {
    write.await?;
    if fua {
        device.flush().await?;
    }
    Ok(())
}

/// Writes replies as they come, batching whatever is queued into one flush;
/// closes the write side once every sender is gone.
async fn write_replies<W: AsyncWrite + Unpin>(
    writer: W,
    mut queued: mpsc::UnboundedReceiver<Reply>,
) -> io::Result<()> {
    let mut writer = BufWriter::with_capacity(WRITE_BUFFER, writer);
    while let Some(reply) = queued.recv().await {
        writer.write_all(&reply.bytes).await?;
        while let Ok(reply) = queued.try_recv() {
            writer.write_all(&reply.bytes).await?;
        }
        writer.flush().await?;
    }
    writer.shutdown().await
}
