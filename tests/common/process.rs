//! Processes and ports: free loopback ports, "who listens on this port", and a child process that
//! is killed and reaped when dropped, for the proxy itself and for the peers the tests start
//! (a Kafka broker, a Fluentd peer). Every wait is bounded.

use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A port that nothing listens on right now, outside the kernel's ephemeral range (so origins
/// and clients, which bind port 0, do not take it in the meantime).
pub fn free_port() -> u16 {
    for _ in 0..500 {
        let port = fastrand::u16(20_000..32_000);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port found");
}

/// `true` when something accepts connections on `127.0.0.1:port` (within `limit`).
pub fn listening(port: u16, limit: Duration) -> bool {
    TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), limit).is_ok()
}

/// `true` when process `pid` holds the socket listening on `127.0.0.1:port` (Linux `/proc`), so
/// we are talking to our own process, not to another test's.
pub fn owns_listener(pid: u32, port: u16) -> bool {
    let Ok(table) = fs::read_to_string("/proc/net/tcp") else {
        // Not Linux: fall back to trusting the connect.
        return true;
    };
    let local = format!("0100007F:{port:04X}");
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 9 && f[1] == local && f[3] == "0A").then(|| format!("socket:[{}]", f[9]))
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        fs::read_link(fd.path())
            .is_ok_and(|target| inodes.iter().any(|i| *i == target.to_string_lossy()))
    })
}

/// Polls `cond` every 20 ms for up to `within`; `true` as soon as it holds.
pub fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Opens `path` for appending (creating it), for a child's output.
pub fn append(path: &Path) -> fs::File {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// A child process, killed (SIGKILL) and reaped when dropped. `log` is the file its diagnostics
/// go to, quoted in every failure.
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    exited: Option<ExitStatus>,
}

impl Proc {
    /// Starts `cmd` with no stdin and its stdout and stderr appended to `log`.
    pub fn start(name: &str, cmd: &mut Command, log: PathBuf) -> Proc {
        let out = append(&log);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc::adopt(name, child, log)
    }

    /// Takes charge of a child spawned with stdio of its own choosing; `log` is where its
    /// diagnostics are.
    pub fn adopt(name: &str, child: Child, log: PathBuf) -> Proc {
        Proc {
            name: name.to_owned(),
            child,
            log,
            exited: None,
        }
    }

    /// The log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child's pipes (stdin, stdout) as set up by the one who spawned it.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().unwrap();
        }
        self.exited
    }

    /// `true` while the process runs.
    pub fn running(&mut self) -> bool {
        self.exited().is_none()
    }

    /// Waits until the process listens on `127.0.0.1:port` itself (not another test's process)
    /// and accepts a connection; `Err` (with the log) if it exits first or `limit` passes.
    pub fn try_wait_listening(&mut self, ports: &[u16], limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        let pid = self.pid();
        loop {
            if let Some(status) = self.exited() {
                return Err(format!(
                    "{} exited with {status} before listening; log:\n{}",
                    self.name,
                    self.log()
                ));
            }
            let ready =
                |port: u16| owns_listener(pid, port) && listening(port, Duration::from_secs(1));
            if ports.iter().all(|&port| ready(port)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} is not listening on {ports:?} after {limit:?}; log:\n{}",
                    self.name,
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Like [`Proc::try_wait_listening`] on one port; panics on failure.
    pub fn wait_listening(&mut self, port: u16, limit: Duration) {
        if let Err(e) = self.try_wait_listening(&[port], limit) {
            panic!("{e}");
        }
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            self.exited = self.child.wait().ok();
        }
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`).
    pub fn signal(&self, signal: i32) {
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill({}, {signal}) failed", self.child.id());
    }

    /// Waits up to `limit` for the process to exit; kills it and panics (with the log) if it
    /// does not.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            if Instant::now() > deadline {
                self.kill();
                panic!(
                    "{} did not exit within {limit:?}; log:\n{}",
                    self.name,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}
