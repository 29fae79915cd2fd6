//! A fault-injecting TCP proxy placed between gateways: it passes bytes through, or
//! delays them, stalls, resets new connections, cuts the answer midway, or kills every
//! open connection at once (what a member's crash looks like from the network).

use std::sync::atomic::{AtomicI64, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// What the proxy does to the bytes it carries. A change applies to open
/// connections at their next chunk, and to every new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Carry bytes both ways unchanged.
    Pass,
    /// Hold every chunk, both ways, this long before passing it on.
    Delay(Duration),
    /// Carry nothing more, but keep every connection open.
    Stall,
    /// Refuse new connections with a TCP reset; close open ones.
    Reset,
    /// Carry this many more bytes from the member to the caller (over all
    /// connections), then close the connection that crossed the limit.
    CutAfter(u64),
}

struct Inner {
    fault: Mutex<Fault>,
    cut_left: AtomicI64,
    reset_next: AtomicUsize,
    target: AtomicU16,
    accepted: AtomicUsize,
    connections: Mutex<Vec<JoinHandle<()>>>,
}

impl Inner {
    fn fault(&self) -> Fault {
        *self.fault.lock().unwrap()
    }
}

/// A running proxy on a loopback port.
pub struct FaultProxy {
    /// The port callers connect to.
    pub port: u16,
    inner: Arc<Inner>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on an ephemeral loopback port; the target is set later with
    /// [`FaultProxy::set_target`] (the member's port is known only once the region
    /// is laid out).
    pub async fn start() -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let inner = Arc::new(Inner {
            fault: Mutex::new(Fault::Pass),
            cut_left: AtomicI64::new(0),
            reset_next: AtomicUsize::new(0),
            target: AtomicU16::new(0),
            accepted: AtomicUsize::new(0),
            connections: Mutex::new(Vec::new()),
        });
        let i = inner.clone();
        let accept = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                i.accepted.fetch_add(1, Ordering::SeqCst);
                let task = tokio::spawn(serve(conn, i.clone()));
                let mut conns = i.connections.lock().unwrap();
                conns.retain(|t| !t.is_finished());
                conns.push(task);
            }
        });
        FaultProxy {
            port,
            inner,
            accept,
        }
    }

    /// Where connections go: a port on 127.0.0.1.
    pub fn set_target(&self, port: u16) {
        self.inner.target.store(port, Ordering::SeqCst);
    }

    /// Changes what the proxy does from now on.
    pub fn set(&self, fault: Fault) {
        if let Fault::CutAfter(n) = fault {
            self.inner.cut_left.store(n as i64, Ordering::SeqCst);
        }
        *self.inner.fault.lock().unwrap() = fault;
    }

    /// Resets the next `n` new connections, whatever the fault (a member that
    /// refuses a connection or two and then answers).
    pub fn reset_next(&self, n: usize) {
        self.inner.reset_next.store(n, Ordering::SeqCst);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.inner.accepted.load(Ordering::SeqCst)
    }

    /// Closes every open connection at once, as a crashed process's kernel would.
    pub fn kill_connections(&self) {
        for t in self.inner.connections.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.kill_connections();
    }
}

async fn serve(conn: TcpStream, inner: Arc<Inner>) {
    let reset_this = inner
        .reset_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let fault = if reset_this {
        Fault::Reset
    } else {
        inner.fault()
    };
    match fault {
        Fault::Reset => {
            // Zero linger turns the close into a reset, as from a port nobody
            // listens on behind a firewall that answers.
            let _ = conn.set_zero_linger();
            return;
        }
        Fault::Stall => {
            // Accepted and never answered: the caller's handshake waits forever.
            let _keep = conn;
            std::future::pending::<()>().await;
            return;
        }
        _ => {}
    }
    let port = inner.target.load(Ordering::SeqCst);
    let Ok(upstream) = TcpStream::connect(("127.0.0.1", port)).await else {
        return;
    };
    let _ = conn.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (cr, cw) = conn.into_split();
    let (ur, uw) = upstream.into_split();
    // Either direction ending closes the whole connection.
    tokio::select! {
        _ = pump(cr, uw, inner.clone(), false) => {}
        _ = pump(ur, cw, inner.clone(), true) => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    inner: Arc<Inner>,
    to_caller: bool,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut pass = n;
        let mut last = false;
        match inner.fault() {
            Fault::Pass => {}
            Fault::Delay(d) => tokio::time::sleep(d).await,
            Fault::Stall => std::future::pending::<()>().await,
            Fault::Reset => return,
            Fault::CutAfter(_) => {
                if to_caller {
                    let left = inner.cut_left.fetch_sub(n as i64, Ordering::SeqCst);
                    if left <= n as i64 {
                        pass = left.max(0) as usize;
                        last = true;
                    }
                }
            }
        }
        if to.write_all(&buf[..pass]).await.is_err() || last {
            return;
        }
    }
}
