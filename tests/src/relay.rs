//! A TCP relay in front of a real service, which a test cuts, black-holes and restores.
//!
//! Why: outages (a service that is gone, or one that hangs) must be simulated without stopping
//! or reconfiguring the shared services other tests use. Point the code under test at
//! [`Relay::url`] instead of the service, then flip the relay's mode.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// What the relay does with connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Forward bytes both ways.
    Open,
    /// Close every connection at once, open or new.
    Cut,
    /// Hold every connection, open or new, without moving a byte.
    Blackhole,
}

/// A TCP relay on 127.0.0.1 in front of `upstream`; every accepted connection gets its own
/// connection to `upstream`. Dropping it stops the listener and closes every connection.
pub struct Relay {
    /// Where clients connect: 127.0.0.1 and a free port.
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
    accept: JoinHandle<()>,
}

impl Relay {
    /// Listens on 127.0.0.1:0 and starts forwarding to `upstream` (on the current tokio
    /// runtime).
    pub async fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind the relay on 127.0.0.1:0");
        let addr = listener.local_addr().expect("the relay's local address");
        let (mode, watcher) = watch::channel(Mode::Open);
        let accept = tokio::spawn(accept_loop(listener, upstream, watcher));
        Relay { addr, mode, accept }
    }

    /// Drops every open connection and refuses new ones (connections are accepted and closed
    /// at once) until [`Relay::restore`]: a service that is down.
    pub fn cut(&self) {
        self.mode.send_replace(Mode::Cut);
    }

    /// Accepts and holds new connections without ever answering or forwarding, and freezes
    /// open ones (no bytes move) — a service that hangs. [`Relay::restore`] resumes the frozen
    /// connections and connects the held ones upstream; [`Relay::cut`] closes them all.
    pub fn blackhole(&self) {
        self.mode.send_replace(Mode::Blackhole);
    }

    /// Forwards again: new connections go upstream, frozen ones resume.
    pub fn restore(&self) {
        self.mode.send_replace(Mode::Open);
    }

    /// `<scheme>://127.0.0.1:<port>`, e.g. `relay.url("nats")` is `nats://127.0.0.1:<port>`.
    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.addr)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // Aborting the accept task drops the listener and its JoinSet, which aborts every
        // connection task; dropping `mode` afterwards ends any that is still being polled.
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, mode: watch::Receiver<Mode>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((inbound, _)) => {
                    connections.spawn(serve(inbound, upstream, mode.clone()));
                }
                // E.g. too many open files: back off instead of spinning.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Waits until the mode is not [`Mode::Blackhole`]; `Err` when it is [`Mode::Cut`] or the
/// relay is gone, which ends the connection.
async fn wait_open(mode: &mut watch::Receiver<Mode>) -> io::Result<()> {
    let current = *mode
        .wait_for(|m| *m != Mode::Blackhole)
        .await
        .map_err(|_| io::Error::other("relay dropped"))?;
    match current {
        Mode::Open => Ok(()),
        _ => Err(io::Error::other("relay cut")),
    }
}

/// One client connection: held while black-holed, closed when cut, else relayed upstream.
async fn serve(inbound: TcpStream, upstream: SocketAddr, mut mode: watch::Receiver<Mode>) {
    if wait_open(&mut mode).await.is_err() {
        return;
    }
    let outbound = tokio::select! {
        connected = TcpStream::connect(upstream) => match connected {
            Ok(stream) => stream,
            Err(_) => return,
        },
        _ = mode.wait_for(|m| *m == Mode::Cut) => return,
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (client_read, client_write) = inbound.into_split();
    let (upstream_read, upstream_write) = outbound.into_split();
    // The first error (including a cut) ends both directions and closes both sockets.
    let _ = tokio::try_join!(
        pump(client_read, upstream_write, mode.clone()),
        pump(upstream_read, client_write, mode),
    );
}

/// Copies `from` to `to` while the mode is [`Mode::Open`], pausing (without losing bytes) while
/// black-holed and failing at once when cut. Reads and writes on tokio TCP halves are
/// cancel-safe, so racing them against mode changes moves no byte twice or never.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut mode: watch::Receiver<Mode>,
) -> io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        wait_open(&mut mode).await?;
        let n = tokio::select! {
            read = from.read(&mut buf) => read?,
            changed = mode.changed() => {
                changed.map_err(|_| io::Error::other("relay dropped"))?;
                continue;
            }
        };
        if n == 0 {
            // Half-close: pass the EOF on and let the other direction finish.
            let _ = to.shutdown().await;
            return Ok(());
        }
        let mut written = 0;
        while written < n {
            wait_open(&mut mode).await?;
            tokio::select! {
                wrote = to.write(&buf[written..n]) => match wrote? {
                    0 => return Err(io::ErrorKind::WriteZero.into()),
                    k => written += k,
                },
                changed = mode.changed() => {
                    changed.map_err(|_| io::Error::other("relay dropped"))?;
                }
            }
        }
    }
}
