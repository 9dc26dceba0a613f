//! Measuring whole processes for the benchmarks: wall time and peak resident set (from
//! `wait4`'s rusage), medians, and millisecond formatting, so every benchmark compares tools
//! the same way (process with process).

use std::process::Command;
use std::time::{Duration, Instant};

/// One process's run.
pub struct Measured {
    pub elapsed: Duration,
    pub max_rss_kib: u64,
    pub stdout: String,
}

/// Runs `command` to completion and measures its wall time and peak resident set.
pub fn measure(mut command: Command) -> Measured {
    command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let started = Instant::now();
    // Reaped by wait4 below, which std's Child cannot report rusage for.
    #[allow(clippy::zombie_processes)]
    let mut child = command.spawn().expect("spawn");
    let pid = child.id() as libc::pid_t;
    let read = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = read(Box::new(child.stdout.take().expect("piped")));
    let stderr = read(Box::new(child.stderr.take().expect("piped")));
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting on our own child; rusage is a plain out-parameter. std's Child is not
    // used to wait afterwards, since wait4 has reaped it.
    let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let elapsed = started.elapsed();
    assert_eq!(reaped, pid, "wait4");
    let stdout = stdout.join().expect("stdout reader");
    let stderr = stderr.join().expect("stderr reader");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{command:?} failed: {stdout} {stderr}"
    );
    Measured {
        elapsed,
        max_rss_kib: usage.ru_maxrss as u64,
        stdout,
    }
}

/// The median (the upper one of an even count).
pub fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

/// Milliseconds, for tables.
pub fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// Each run's time in whole milliseconds, for a table's list of runs.
pub fn runs_ms(runs: &[Duration]) -> Vec<u128> {
    runs.iter().map(Duration::as_millis).collect()
}
