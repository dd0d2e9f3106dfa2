//! An unconnected UDP client: one socket that sends every datagram with `sendto()` to the same
//! address (socat's `UDP-SENDTO`), as resolvers and metrics clients often talk to a service.
//!
//! `ferrovia-echo probe --proto udp` connects its socket, so the socket-level LB translates it
//! once, at connect; here every datagram passes the cgroup sendmsg4 hook.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::cmd::netns_path;
use crate::workload::Place;

/// A running `socat STDIO UDP-SENDTO:<to>` in a place's network namespace and cgroup; killed
/// on drop (and with the place's cgroup).
pub struct SendtoClient {
    child: Child,
    stdin: ChildStdin,
    replies: Receiver<String>,
}

impl SendtoClient {
    /// Starts the client in `place`, sending to `to`.
    pub fn start(place: &Place, to: SocketAddr) -> Result<Self> {
        // Join the cgroup first (so the socket hooks apply), then the netns; nsenter execs socat
        // in place, so socat is the process in the cgroup.
        let script = format!(
            "echo $$ > '{}/cgroup.procs' && exec nsenter --net='{}' socat STDIO UDP-SENDTO:{to}",
            place.cgroup.display(),
            netns_path(&place.netns)
        );
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning socat (Debian package socat)")?;
        let stdin = child.stdin.take().expect("stdin was piped");
        let stdout = child.stdout.take().expect("stdout was piped");
        let (tx, replies) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Ok(Self {
            child,
            stdin,
            replies,
        })
    }

    /// Sends one datagram and returns the next reply (`NAME ip:port`), or `None` when none
    /// came within `timeout`. Replies left from earlier requests are discarded first.
    pub fn request(&mut self, timeout: Duration) -> Result<Option<String>> {
        while self.replies.try_recv().is_ok() {}
        if let Some(status) = self.child.try_wait()? {
            bail!("socat exited ({status})");
        }
        self.stdin.write_all(b"hello\n")?;
        self.stdin.flush()?;
        match self.replies.recv_timeout(timeout) {
            Ok(reply) => Ok(Some(reply)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => bail!("socat closed its output"),
        }
    }
}

impl Drop for SendtoClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
