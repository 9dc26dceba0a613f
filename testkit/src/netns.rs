//! Running a test inside a private network namespace, where link-local and cloud-metadata
//! addresses (169.254.169.254, fd00:ec2::254) are ours to bind.
//!
//! Tests of "a client refuses to connect to X" are only convincing when they look at X's side
//! and see no connection. For a metadata address that means binding it, and traffic to it must
//! never leave the machine: CI may run in a cloud VM whose real metadata service answers there.
//! So such targets are bound only inside a namespace of our own, which has nothing but its own
//! loopback interface: nothing sent from inside can reach any other host, nor the host's own
//! loopback (the shared test PostgreSQL included; see [`crate::TestDatabase::private`]).
//!
//! A network namespace belongs to a thread: [`run_isolated`] calls `unshare(CLONE_NEWNET)` on a
//! thread of its own, so the rest of the test process stays on the host's network. Threads and
//! processes that thread starts (a Tokio runtime's workers, `ip`, skopeo, PostgreSQL) inherit the
//! namespace; it disappears when the last of them is gone.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::sync::Mutex;

/// The IPv4 cloud-metadata address (AWS, GCP, Azure, OpenStack...).
pub const METADATA_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// AWS's IPv6 metadata address.
pub const METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254);

/// Inode numbers of the namespaces [`run_isolated`] created, to recognise them.
static ISOLATED: Mutex<Vec<u64>> = Mutex::new(Vec::new());

/// Why a namespace could not be set up.
#[derive(Debug)]
pub struct IsolationError(pub String);

impl std::fmt::Display for IsolationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot isolate the test in a network namespace: {}",
            self.0
        )
    }
}

impl std::error::Error for IsolationError {}

/// Runs `f` on a new thread inside a new, private network namespace whose `lo` is up and also
/// holds [`METADATA_V4`]/32 and [`METADATA_V6`]/128; returns what `f` returns.
///
/// Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and `ip` (iproute2). Without them it panics: a
/// test that needs isolation must fail, not pass without having run. A panic in `f` is
/// propagated as it is. To run async code, build a runtime inside `f` (or use
/// [`run_isolated_async`]): its threads then start inside the namespace too.
pub fn run_isolated<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    try_run_isolated(f).unwrap_or_else(|error| panic!("{error}"))
}

/// [`run_isolated`] that reports a failure to set the namespace up as an error.
pub fn try_run_isolated<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, IsolationError> {
    let thread = std::thread::Builder::new()
        .name("testkit-netns".into())
        .spawn(move || -> Result<T, IsolationError> {
            enter_private_namespace()?;
            Ok(f())
        })
        .map_err(|e| IsolationError(format!("spawn the namespace thread: {e}")))?;
    match thread.join() {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// [`run_isolated`] for async code: builds a two-worker Tokio runtime inside the namespace and
/// runs `make_future()` to completion on it.
pub fn run_isolated_async<T, F, Fut>(make_future: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    run_isolated(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a Tokio runtime inside the namespace");
        runtime.block_on(make_future())
    })
}

/// Whether the calling thread is in a namespace [`run_isolated`] created (directly, or by
/// inheritance from its thread).
pub fn in_isolated_namespace() -> bool {
    let Some(current) = current_namespace() else {
        return false;
    };
    ISOLATED
        .lock()
        .expect("namespace registry")
        .contains(&current)
}

/// Whether binding `ip` is only safe inside a private namespace: link-local addresses (cloud
/// metadata services live there) and AWS's IPv6 metadata address.
pub fn needs_isolation(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6 == METADATA_V6 || (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// Panics unless binding `ip` is safe here (see [`needs_isolation`]); for the servers tests bind.
pub fn assert_safe_to_bind(ip: IpAddr) {
    assert!(
        !needs_isolation(ip) || in_isolated_namespace(),
        "{ip} is a link-local/cloud-metadata address: bind it only inside \
         testkit::netns::run_isolated, so that no traffic to it can leave the machine"
    );
}

/// The inode of the calling thread's network namespace.
fn current_namespace() -> Option<u64> {
    std::fs::metadata("/proc/thread-self/ns/net")
        .ok()
        .map(|m| m.ino())
}

fn enter_private_namespace() -> Result<(), IsolationError> {
    let host = current_namespace();
    // SAFETY: unshare only changes the calling thread's namespace membership.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        let error = std::io::Error::last_os_error();
        return Err(IsolationError(format!(
            "unshare(CLONE_NEWNET) failed: {error} (run the tests as root, or with CAP_SYS_ADMIN)"
        )));
    }
    let current = current_namespace()
        .ok_or_else(|| IsolationError("cannot read /proc/thread-self/ns/net".into()))?;
    if Some(current) == host {
        return Err(IsolationError(
            "unshare returned but the thread is still in the host's namespace".into(),
        ));
    }
    // `ip` runs as a child of this thread, so in its namespace. `nodad`: no duplicate address
    // detection on a private loopback, so the IPv6 address is usable at once.
    for args in [
        &["link", "set", "lo", "up"][..],
        &["addr", "add", "169.254.169.254/32", "dev", "lo"],
        &[
            "-6",
            "addr",
            "add",
            "fd00:ec2::254/128",
            "dev",
            "lo",
            "nodad",
        ],
    ] {
        let output = Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| IsolationError(format!("cannot run `ip` (install iproute2): {e}")))?;
        if !output.status.success() {
            return Err(IsolationError(format!(
                "`ip {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
    }
    ISOLATED.lock().expect("namespace registry").push(current);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_local_and_metadata_addresses_need_isolation() {
        for ip in ["169.254.169.254", "169.254.0.1", "fd00:ec2::254", "fe80::1"] {
            assert!(needs_isolation(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["127.0.0.1", "127.0.0.2", "0.0.0.0", "::1", "::", "fd00::1"] {
            assert!(!needs_isolation(ip.parse().unwrap()), "{ip}");
        }
    }
}
