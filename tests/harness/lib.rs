//! Test harness: start the real `nbdhost` binary on a free port, drive it
//! with real NBD clients (qemu-img, qemu-io, nbdinfo, nbdsh, python3-libnbd),
//! and build out-of-tree plugin crates the way a third party would.
//!
//! A test that needs a client which is not installed fails when `CI=true`
//! and otherwise skips with a loud message on stderr.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The workspace root (parent of `tests/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// Where cargo put the workspace's artifacts.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"))
}

/// Directory with the debug `nbdhost` binary and bundled plugins.
pub fn artifacts() -> PathBuf {
    let d = target_dir().join("debug");
    let bin = d.join("nbdhost");
    assert!(
        bin.exists() && d.join("libnbdhost_plugin_memory.so").exists(),
        "{} or the bundled plugins are missing: run `cargo build --workspace` first (tests/run.sh does)",
        bin.display()
    );
    d
}

/// Path of the `nbdhost` binary under test.
pub fn nbdhost_bin() -> PathBuf {
    artifacts().join("nbdhost")
}

/// True if `tool` is on PATH. When it is not: panic under CI, otherwise
/// print a loud skip notice and return false.
pub fn require_tool(tool: &str) -> bool {
    let found =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file())).unwrap_or(false)
            || Path::new(tool).is_file();
    if found {
        return true;
    }
    if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
        panic!("required client `{tool}` is not installed (CI=true: failing instead of skipping)");
    }
    eprintln!("\n######## SKIPPED: `{tool}` is not installed; run tests/run.sh to install the NBD clients ########\n");
    false
}

/// True if /usr/bin/python3 can import the libnbd bindings (same CI rule).
pub fn require_python_nbd() -> bool {
    if !require_tool("/usr/bin/python3") {
        return false;
    }
    let ok = Command::new("/usr/bin/python3")
        .args(["-c", "import nbd"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        return true;
    }
    if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
        panic!("python3-libnbd is not installed (CI=true: failing instead of skipping)");
    }
    eprintln!("\n######## SKIPPED: python3-libnbd is not installed; run tests/run.sh ########\n");
    false
}

/// Run a command, returning its output (never panics on failure).
pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

/// Run a command and assert it succeeded; returns stdout as text.
pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    let o = run(cmd, args);
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Run a Python script with the libnbd bindings; `args` become sys.argv[1:].
pub fn python(script: &str, args: &[&str]) -> Output {
    let mut all = vec!["-c", script];
    all.extend_from_slice(args);
    run("/usr/bin/python3", &all)
}

/// A temporary exports directory with snippets.
pub struct Exports {
    /// The directory (removed on drop).
    pub dir: tempfile::TempDir,
}

impl Exports {
    /// An empty exports directory.
    pub fn new() -> Self {
        Exports { dir: tempfile::Builder::new().prefix("nbdhost-test-").tempdir().expect("tempdir") }
    }
    /// Write `NAME.toml` with `body`.
    pub fn snippet(&self, name: &str, body: &str) -> &Self {
        std::fs::write(self.dir.path().join(format!("{name}.toml")), body).expect("write snippet");
        self
    }
    /// Path inside the directory.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    /// The directory as a string.
    pub fn dir_str(&self) -> String {
        self.dir.path().to_string_lossy().into_owned()
    }
}

impl Default for Exports {
    fn default() -> Self {
        Self::new()
    }
}

/// A running `nbdhost`, killed on drop. Its stderr is collected.
pub struct Server {
    child: Option<Child>,
    /// `127.0.0.1:PORT` it listens on (if TCP).
    pub addr: String,
    log: Arc<Mutex<String>>,
}

impl Server {
    /// Start on 127.0.0.1 with a free port, serving `exports`.
    pub fn start(exports: &Exports, extra: &[&str]) -> Server {
        let mut args = vec!["--exports-dir".to_string(), exports.dir_str(), "--listen".into(), "127.0.0.1:0".into()];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::start_args(&args, true)
    }

    /// Start with exactly `args`; wait for "listening on" if `wait_tcp`,
    /// else for "listening on unix".
    pub fn start_args(args: &[String], wait_tcp: bool) -> Server {
        let mut child = Command::new(nbdhost_bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nbdhost");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log2.lock().unwrap().push_str(&line);
                log2.lock().unwrap().push('\n');
                let _ = tx.send(line);
            }
        });
        let want = if wait_tcp { "listening on tcp " } else { "listening on unix " };
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut addr = String::new();
        while Instant::now() < deadline {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    if let Some(i) = line.find(want) {
                        addr = line[i + want.len()..].trim().to_string();
                        break;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if let Ok(Some(st)) = child.try_wait() {
                        panic!("nbdhost exited early ({st}):\n{}", log.lock().unwrap());
                    }
                }
                Err(_) => break,
            }
        }
        assert!(!addr.is_empty(), "nbdhost did not start listening:\n{}", log.lock().unwrap());
        // Keep draining stderr in the background (the thread above does).
        Server { child: Some(child), addr, log }
    }

    /// `nbd://ADDR/EXPORT`.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.addr, export)
    }

    /// Host part of the address.
    pub fn host(&self) -> &str {
        self.addr.rsplit_once(':').map(|(h, _)| h).unwrap_or("")
    }

    /// Port part of the address.
    pub fn port(&self) -> &str {
        self.addr.rsplit_once(':').map(|(_, p)| p).unwrap_or("")
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Wait (at most 5 s) until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str) -> bool {
        self.wait_for(|log| log.contains(needle))
    }

    /// Wait (at most 5 s) until `done` holds for the log so far (it is
    /// read by another thread, so lines arrive a moment after the fact).
    pub fn wait_for(&self, done: impl Fn(&str) -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if done(&self.log()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Is the process still running?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Send a signal to the server.
    pub fn signal(&self, sig: i32) {
        let child = self.child.as_ref().expect("running");
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, sig) };
    }

    /// Send SIGTERM and wait (bounded) for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit()
    }

    /// Wait (at most 20 s) for the server to exit.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("nbdhost did not exit within 20 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Build an out-of-tree plugin crate under `tests/plugins/NAME` (once per
/// test process) and return the directory holding its `.so`.
pub fn build_test_plugin(name: &str) -> PathBuf {
    build_test_plugin_with(name, &[])
}

/// Like [`build_test_plugin`], with cargo features; each feature set gets
/// its own target directory so variants do not rebuild each other.
pub fn build_test_plugin_with(name: &str, features: &[&str]) -> PathBuf {
    static BUILT: OnceLock<Mutex<Vec<(String, PathBuf)>>> = OnceLock::new();
    let key = format!("{name}+{}", features.join(","));
    // Holding the lock while building also keeps parallel tests from
    // running two cargo builds of the same crate at once.
    let mut built = BUILT.get_or_init(|| Mutex::new(Vec::new())).lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, d)) = built.iter().find(|(k, _)| *k == key) {
        return d.clone();
    }
    let manifest = workspace_root().join("tests/plugins").join(name).join("Cargo.toml");
    let target =
        target_dir().join("test-plugins").join(if features.is_empty() { "default".into() } else { features.join("+") });
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "--locked", "--manifest-path"]).arg(&manifest).arg("--target-dir").arg(&target);
    if !features.is_empty() {
        cmd.args(["--features", &features.join(",")]);
    }
    let o = cmd.output().expect("run cargo");
    assert!(o.status.success(), "building test plugin {key} failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let out = target.join("debug");
    built.push((key, out.clone()));
    out
}

/// Deterministic pseudo-random bytes (xorshift), for test images.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// A minimal raw NBD client for protocol and hostile-input tests. It speaks
/// exactly the bytes the test asks for; nothing is checked for the test.
pub struct Raw {
    /// The socket.
    pub s: std::net::TcpStream,
}

/// One option reply: (option echoed, reply type, payload).
pub type OptReply = (u32, u32, Vec<u8>);

impl Raw {
    /// Connect (with a 10 s read timeout so a stuck test fails, not hangs).
    pub fn connect(addr: &str) -> Raw {
        let s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw { s }
    }
    /// Read the greeting and send client flags.
    pub fn greet(&mut self, client_flags: u32) -> [u8; 18] {
        let mut g = [0u8; 18];
        self.read(&mut g);
        self.send(&client_flags.to_be_bytes());
        g
    }
    /// Connect and greet with FIXED_NEWSTYLE | NO_ZEROES.
    pub fn fixed(addr: &str) -> Raw {
        let mut r = Raw::connect(addr);
        r.greet(3);
        r
    }
    /// Write bytes.
    pub fn send(&mut self, b: &[u8]) {
        use std::io::Write;
        self.s.write_all(b).expect("send");
    }
    /// Read exactly `buf.len()` bytes.
    pub fn read(&mut self, buf: &mut [u8]) {
        use std::io::Read;
        self.s.read_exact(buf).expect("read");
    }
    /// Try to read `n` bytes; `None` on EOF or error.
    pub fn try_read(&mut self, n: usize) -> Option<Vec<u8>> {
        use std::io::Read;
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).ok().map(|_| b)
    }
    /// True if the server closed the connection (EOF or reset) within the
    /// read timeout; any bytes still arriving before that are skipped.
    pub fn closed(&mut self) -> bool {
        use std::io::{ErrorKind, Read};
        let mut b = [0u8; 4096];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
                    ) =>
                {
                    return true
                }
                Err(_) => return false,
            }
        }
    }
    /// Send an option.
    pub fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = b"IHAVEOPT".to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }
    /// Read one option reply.
    pub fn opt_reply(&mut self) -> OptReply {
        let mut h = [0u8; 20];
        self.read(&mut h);
        assert_eq!(&h[..8], &0x0003_e889_0455_65a9u64.to_be_bytes(), "option reply magic");
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut d = vec![0u8; len];
        self.read(&mut d);
        (opt, kind, d)
    }
    /// Read option replies up to and including the final one (ACK/error).
    pub fn opt_replies(&mut self) -> Vec<OptReply> {
        let mut v = Vec::new();
        loop {
            let r = self.opt_reply();
            let fin = r.1 == 1 || r.1 & 0x8000_0000 != 0;
            v.push(r);
            if fin {
                return v;
            }
        }
    }
    /// INFO/GO data for `name` with the given info requests.
    pub fn info_data(name: &str, reqs: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }
    /// GO to `name`; returns (size, transmission flags). Panics on failure.
    pub fn go(&mut self, name: &str) -> (u64, u16) {
        self.option(7, &Self::info_data(name, &[]));
        let mut res = None;
        for (_, kind, d) in self.opt_replies() {
            assert!(kind & 0x8000_0000 == 0, "GO failed: {kind:#x} {}", String::from_utf8_lossy(&d));
            if kind == 3 && u16::from_be_bytes([d[0], d[1]]) == 0 {
                res = Some((u64::from_be_bytes(d[2..10].try_into().unwrap()), u16::from_be_bytes([d[10], d[11]])));
            }
        }
        res.expect("NBD_INFO_EXPORT in GO reply")
    }
    /// Send a compact request header (plus `payload`).
    pub fn request(&mut self, flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.send(&b);
    }
    /// Read a simple reply header: (error, cookie).
    pub fn simple_reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.read(&mut h);
        assert_eq!(&h[..4], &0x6744_6698u32.to_be_bytes(), "simple reply magic");
        (u32::from_be_bytes(h[4..8].try_into().unwrap()), u64::from_be_bytes(h[8..16].try_into().unwrap()))
    }
}

/// Run an `nbdsh` script against `uri` with extra nbdsh flags (e.g.
/// `--base-allocation`). nbdsh is a Python program: it must find the system
/// python3 with the libnbd bindings first on PATH.
pub fn nbdsh(flags: &[&str], uri: &str, script: &str) -> Output {
    let path = format!("/usr/bin:/bin:{}", std::env::var("PATH").unwrap_or_default());
    Command::new("nbdsh")
        .env("PATH", path)
        .args(flags)
        .args(["-u", uri, "-c", script])
        .output()
        .unwrap_or_else(|e| panic!("cannot run nbdsh: {e}"))
}

/// Assert a client command succeeded and return its stdout.
pub fn assert_ok(what: &str, o: &Output) -> String {
    assert!(
        o.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}
