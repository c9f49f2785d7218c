//! Listening, accepting and running connections; signals and shutdown.

use crate::export::ExportSet;
use crate::protocol::handshake::{self, HandshakeContext, HandshakeEnd};
use crate::protocol::transmission::Transmission;
use crate::tls::TlsServer;
use crate::transport::{Channel, RequestReader, SocketReader, Stream};
use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Send buffer asked for on accepted Unix connections (the kernel caps it
/// at `net.core.wmem_max`).
const UNIX_SEND_BUFFER: usize = 2 << 20;

/// Runtime settings of the server.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// TCP addresses.
    pub listen: Vec<String>,
    /// Unix socket.
    pub unix: Option<PathBuf>,
    /// How long a client may take over the handshake.
    pub handshake_timeout: Duration,
    /// Most simultaneous connections.
    pub max_connections: usize,
    /// How long shutdown waits for requests in flight.
    pub shutdown_grace: Duration,
    /// How long idle connections are left open at shutdown so that what
    /// they send next is answered ESHUTDOWN / ERR_SHUTDOWN (clients then
    /// disconnect cleanly) before they are closed.
    pub shutdown_linger: Duration,
    /// TLS (None: off; STARTTLS is refused).
    pub tls: Option<Arc<TlsServer>>,
}

/// The running server's shared state.
pub struct Server {
    settings: ServerSettings,
    exports: RwLock<Arc<ExportSet>>,
    shutting_down: AtomicBool,
    active: AtomicUsize,
    next_id: AtomicU64,
    /// Live connections, so shutdown can close the idle ones.
    live: Mutex<HashMap<u64, Live>>,
    bound_tcp: Mutex<Vec<SocketAddr>>,
}

/// What shutdown needs to know about a connection.
struct Live {
    stream: Stream,
    /// Requests in flight (0 while idle or negotiating).
    busy: Arc<AtomicUsize>,
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Server {
    /// A server offering `exports`.
    pub fn new(settings: ServerSettings, exports: ExportSet) -> Arc<Server> {
        Arc::new(Server {
            settings,
            exports: RwLock::new(Arc::new(exports)),
            shutting_down: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            live: Mutex::new(HashMap::new()),
            bound_tcp: Mutex::new(Vec::new()),
        })
    }

    /// Swap in a new export set; connections already in transmission keep
    /// the exports they opened.
    pub fn replace_exports(&self, exports: ExportSet) {
        *self.exports.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(exports);
    }

    /// The server's TLS side, if TLS is on.
    pub fn tls(&self) -> Option<&TlsServer> {
        self.settings.tls.as_deref()
    }

    /// SIGHUP: new TLS sessions use the certificates now on disk (a broken
    /// file keeps the running ones).
    pub fn reload_tls(&self) {
        if let Some(t) = &self.settings.tls {
            t.reload();
        }
    }

    /// The exports new connections see.
    pub fn exports(&self) -> Arc<ExportSet> {
        self.exports.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Bind every listener and start accepting, one thread per listener.
    pub fn start(self: &Arc<Self>) -> io::Result<Vec<std::thread::JoinHandle<()>>> {
        let mut listeners = Vec::new();
        for addr in &self.settings.listen {
            let l = TcpListener::bind(addr)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
            let local = l.local_addr()?;
            log::info!("listening on tcp {local}");
            self.bound_tcp.lock().unwrap_or_else(|e| e.into_inner()).push(local);
            listeners.push(Listener::Tcp(l));
        }
        if let Some(path) = &self.settings.unix {
            // A socket file left by a dead server is removed; a live one is not.
            if path.exists() && UnixStream::connect(path).is_err() {
                let _ = std::fs::remove_file(path);
            }
            let l = UnixListener::bind(path).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot listen on unix socket {}: {e}", path.display()))
            })?;
            log::info!("listening on unix {}", path.display());
            listeners.push(Listener::Unix(l, path.clone()));
        }
        let mut threads = Vec::new();
        for l in listeners {
            let me = self.clone();
            threads.push(std::thread::Builder::new().name("accept".into()).spawn(move || me.accept_loop(l))?);
        }
        Ok(threads)
    }

    fn accept_loop(self: Arc<Self>, l: Listener) {
        loop {
            let accepted = match &l {
                Listener::Tcp(t) => t.accept().map(|(s, a)| {
                    let _ = s.set_nodelay(true);
                    let _ = rustix::net::sockopt::set_socket_oobinline(&s, true);
                    (Stream::Tcp(s), a.to_string())
                }),
                Listener::Unix(u, _) => u.accept().map(|(s, _)| {
                    // A Unix socket's send buffer does not grow on its own
                    // (TCP's does): room for a whole large reply lets lent
                    // read data leave in one send instead of being copied.
                    let _ = rustix::net::sockopt::set_socket_send_buffer_size(&s, UNIX_SEND_BUFFER);
                    // Out-of-band bytes are data like any other (NBD has no
                    // use for them): without this, FIONREAD on a Unix
                    // socket counts one that no read returns, and a write
                    // received into lent memory would wait for it.
                    let _ = rustix::net::sockopt::set_socket_oobinline(&s, true);
                    (Stream::Unix(s), "unix".to_string())
                }),
            };
            if self.shutting_down.load(Ordering::SeqCst) {
                if let Listener::Unix(_, p) = &l {
                    let _ = std::fs::remove_file(p);
                }
                return;
            }
            match accepted {
                Ok((s, peer)) => self.admit(s, peer),
                Err(e) => {
                    log::warn!("accept failed: {e}");
                    // EMFILE and friends: back off instead of spinning.
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    fn admit(self: &Arc<Self>, s: Stream, peer: String) {
        let n = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        if n > self.settings.max_connections {
            self.active.fetch_sub(1, Ordering::SeqCst);
            log::warn!("{peer}: refused, {} connections already (max_connections)", n - 1);
            let _ = s.shutdown(Shutdown::Both);
            return;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let busy = Arc::new(AtomicUsize::new(0));
        if let Ok(c) = s.try_clone() {
            self.live.lock().unwrap_or_else(|e| e.into_inner()).insert(id, Live { stream: c, busy: busy.clone() });
        }
        let me = self.clone();
        let spawned = std::thread::Builder::new().name(format!("conn-{id}")).spawn(move || {
            log::debug!("{peer}: connected");
            if let Err(e) = me.serve_connection(s, &peer, &busy) {
                log::debug!("{peer}: connection ended: {e}");
            }
            log::debug!("{peer}: disconnected");
            me.live.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
            me.active.fetch_sub(1, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            log::error!("cannot start a thread for a connection: {e}");
            self.live.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
            self.active.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn serve_connection(&self, s: Stream, peer: &str, busy: &AtomicUsize) -> io::Result<()> {
        s.set_read_timeout(Some(self.settings.handshake_timeout))?;
        // Kept for the socket options and the final shutdown whatever the
        // channel becomes.
        let ctl = s.try_clone()?;
        let mut ch = Channel::Plain(s);
        let r = self.negotiate_and_serve(&mut ch, &ctl, peer, busy);
        let _ = ctl.shutdown(Shutdown::Both);
        r
    }

    fn negotiate_and_serve(&self, ch: &mut Channel, ctl: &Stream, peer: &str, busy: &AtomicUsize) -> io::Result<()> {
        let exports = self.exports();
        let ctx = HandshakeContext { exports: &exports, peer, shutting_down: &self.shutting_down, tls: self.tls() };
        let negotiated = handshake::negotiate(ch, &ctx);
        // The session keeps its own export; a reload must not wait for us.
        drop(exports);
        let close_tls = |ch: &Channel| {
            if let Channel::Tls(t) = ch {
                t.closer().close();
            }
        };
        let session = match negotiated {
            Ok(Ok(session)) => session,
            Ok(Err(HandshakeEnd::Closed)) => {
                close_tls(ch);
                return Ok(());
            }
            Ok(Err(HandshakeEnd::Refused(why))) => {
                log::warn!("{peer}: handshake refused: {why}");
                close_tls(ch);
                return Ok(());
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                log::warn!(
                    "{peer}: handshake not finished within {:?}; disconnecting",
                    self.settings.handshake_timeout
                );
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        ctl.set_read_timeout(None)?;
        let mut t = Transmission::new(&session, peer, &self.shutting_down, busy);
        match std::mem::replace(ch, Channel::Broken) {
            Channel::Plain(s) => {
                // Replies are batched by the transmission phase: the writer
                // is the bare socket.
                let reader = RequestReader::with_capacity(128 * 1024, SocketReader::new(s.try_clone()?, false));
                t.serve(reader, s, ctl, true)
            }
            Channel::Tls(tls) => {
                let closer = tls.closer();
                let (r, w) = tls.split();
                let res = t.serve(RequestReader::with_capacity(128 * 1024, r), w, ctl, false);
                // Every reply is out (serve drained them): end the TLS
                // session properly before the socket closes.
                closer.close();
                res
            }
            Channel::Broken => Ok(()),
        }
    }

    /// Stop accepting, let requests in flight finish, and wait up to the
    /// grace period for connections to close.
    pub fn shutdown(&self) {
        if self.shutting_down.swap(true, Ordering::SeqCst) {
            return;
        }
        log::info!("shutting down: no new connections, finishing requests in flight");
        // Wake the accept loops.
        for a in self.bound_tcp.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = TcpStream::connect_timeout(a, Duration::from_millis(200));
        }
        if let Some(p) = &self.settings.unix {
            let _ = UnixStream::connect(p);
        }
        // Requests that arrive from now on are answered ESHUTDOWN and
        // options ERR_SHUTDOWN. After a short linger a connection with
        // nothing in flight is closed; one still working is closed once its
        // replies are out, or when the grace period ends.
        let start = Instant::now();
        let linger = start + self.settings.shutdown_linger.min(self.settings.shutdown_grace);
        let deadline = start + self.settings.shutdown_grace;
        while self.active.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            if Instant::now() >= linger {
                for c in self.live.lock().unwrap_or_else(|e| e.into_inner()).values() {
                    if c.busy.load(Ordering::SeqCst) == 0 {
                        let _ = c.stream.shutdown(Shutdown::Both);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let left = self.active.load(Ordering::SeqCst);
        if left > 0 {
            log::warn!("{left} connection(s) still busy after {:?}; closing them", self.settings.shutdown_grace);
            for c in self.live.lock().unwrap_or_else(|e| e.into_inner()).values() {
                let _ = c.stream.shutdown(Shutdown::Both);
            }
        }
    }
}
