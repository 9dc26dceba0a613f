//! Looking at processes from outside, to prove that nothing was left running.

/// Whether `pid` is a live process (a zombie awaiting its parent does not count).
pub fn alive(pid: u32) -> bool {
    state_and_parent(pid).is_some_and(|(state, _)| state != "Z")
}

/// Pids of the live direct children of `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|child| {
            state_and_parent(*child).is_some_and(|(state, ppid)| ppid == pid && state != "Z")
        })
        .collect()
}

/// `(state, ppid)` from `/proc/<pid>/stat`; the command name may contain spaces and
/// parentheses, so the fields are read after its last `)`.
fn state_and_parent(pid: u32) -> Option<(String, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.to_owned();
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}
