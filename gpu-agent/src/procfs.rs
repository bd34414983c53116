//! What the agent reads from `/proc` and how it kills: a job's process tree (its process group
//! plus every descendant of its leader, so a child that left the group is still counted), the
//! tree's resident memory, host memory from `/proc/meminfo`, and SIGKILL of a whole tree.

use std::collections::{HashMap, HashSet};
use std::path::Path;

/// One process as `/proc/<pid>/stat` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcEntry {
    /// Process id.
    pub pid: u32,
    /// Parent process id.
    pub ppid: u32,
    /// Process group id.
    pub pgrp: u32,
    /// State letter (`R`, `S`, `Z`…).
    pub state: char,
    /// Resident set size in pages.
    pub rss_pages: u64,
    /// Start time in clock ticks after boot; with the pid it names a process uniquely.
    pub start_time: u64,
}

/// Parses the text of `/proc/<pid>/stat`. The command name may hold spaces and parentheses,
/// so fields are counted after the last `)`.
pub fn parse_stat(text: &str) -> Option<ProcEntry> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let pid = text[..open].trim().parse().ok()?;
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3 (state); starttime is field 22, rss field 24.
    Some(ProcEntry {
        pid,
        state: rest.first()?.chars().next()?,
        ppid: rest.get(1)?.parse().ok()?,
        pgrp: rest.get(2)?.parse().ok()?,
        start_time: rest.get(19)?.parse().ok()?,
        rss_pages: rest.get(21)?.parse().ok()?,
    })
}

/// Every process visible in `/proc` (processes that vanish while reading are skipped).
pub fn read_all() -> Vec<ProcEntry> {
    read_all_in(Path::new("/proc"))
}

fn read_all_in(root: &Path) -> Vec<ProcEntry> {
    let Ok(dir) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let name = e.file_name();
        let name = name.to_str()?;
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        parse_stat(&std::fs::read_to_string(e.path().join("stat")).ok()?)
    })
    .collect()
}

/// The process tree of a job whose leader is `pgid` (it was started in its own process group):
/// every member of the group plus every descendant of the leader.
pub fn tree_of(entries: &[ProcEntry], pgid: u32) -> Vec<&ProcEntry> {
    let mut children: HashMap<u32, Vec<&ProcEntry>> = HashMap::new();
    for e in entries {
        children.entry(e.ppid).or_default().push(e);
    }
    let mut seen: HashSet<u32> = HashSet::new();
    let mut out = Vec::new();
    let mut stack: Vec<&ProcEntry> = entries
        .iter()
        .filter(|e| e.pgrp == pgid || e.pid == pgid)
        .collect();
    while let Some(e) = stack.pop() {
        if !seen.insert(e.pid) {
            continue;
        }
        out.push(e);
        if let Some(kids) = children.get(&e.pid) {
            stack.extend(kids.iter().copied());
        }
    }
    out.sort_by_key(|e| e.pid);
    out
}

/// Resident memory of a job's tree and the pids in it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TreeMemory {
    /// Sum of the resident set sizes, in bytes.
    pub rss_bytes: u64,
    /// The pids of the tree (live and zombie).
    pub pids: Vec<u32>,
}

/// Measures the tree of `pgid` from an already-read process table; each member's resident
/// size is read from `/proc/<pid>/statm` (what `VmRSS` says; the `stat` field can lag behind
/// it), falling back to the table's value for a process that just exited.
pub fn tree_memory(entries: &[ProcEntry], pgid: u32) -> TreeMemory {
    let page = kiln_job::memory::page_size();
    tree_memory_with(entries, pgid, |e| {
        std::fs::read_to_string(format!("/proc/{}/statm", e.pid))
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
            .unwrap_or(e.rss_pages)
            * page
    })
}

/// Measures the tree of `pgid` with `rss_bytes` giving each member's resident bytes.
pub fn tree_memory_with(
    entries: &[ProcEntry],
    pgid: u32,
    rss_bytes: impl Fn(&ProcEntry) -> u64,
) -> TreeMemory {
    let tree = tree_of(entries, pgid);
    TreeMemory {
        rss_bytes: tree.iter().map(|e| rss_bytes(e)).sum(),
        pids: tree.iter().map(|e| e.pid).collect(),
    }
}

/// SIGKILLs the process group `pgid` and every other process of its tree: descendants that
/// left the group (and their own groups), and the `known` processes seen in the tree earlier
/// that are still the same processes (same pid and start time) — those were orphaned when their
/// parent died and can no longer be found from the leader. Processes already gone are fine.
pub fn kill_tree(pgid: u32, known: &[ProcEntry]) {
    signal_tree(pgid, known, libc::SIGKILL);
}

/// Sends `sig` to the process group `pgid` and every other process of its tree, as
/// [`kill_tree`] does with SIGKILL (SIGTERM first is how a cancelled exec job gets its grace).
pub fn signal_tree(pgid: u32, known: &[ProcEntry], sig: i32) {
    if pgid == 0 {
        return;
    }
    let table = read_all();
    let mut doomed: Vec<&ProcEntry> = tree_of(&table, pgid);
    let now: HashMap<u32, &ProcEntry> = table.iter().map(|e| (e.pid, e)).collect();
    for k in known {
        if let Some(e) = now.get(&k.pid) {
            if e.start_time == k.start_time && !doomed.iter().any(|d| d.pid == e.pid) {
                doomed.push(e);
            }
        }
    }
    // SAFETY: kill has no memory-safety preconditions; a negative pid names a group.
    unsafe { libc::kill(-(pgid as i32), sig) };
    for e in doomed {
        if e.pgrp != pgid {
            // SAFETY: as above. A member that leads its own group takes that group with it.
            unsafe {
                if e.pgrp == e.pid {
                    libc::kill(-(e.pid as i32), sig);
                }
                libc::kill(e.pid as i32, sig);
            }
        }
    }
}

/// The inode of an open descriptor of this process (what `/proc/*/fd` links name as
/// `pipe:[INODE]` for a pipe).
pub fn fd_inode(fd: std::os::fd::RawFd) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/self/fd/{fd}"))
        .ok()
        .map(|m| m.ino())
}

/// The processes (other than this one) that hold an open descriptor on one of the pipes with
/// these inodes, as `(pid, fd)`: who keeps a job's output open after the job is gone.
pub fn pipe_holders(inodes: &[u64]) -> Vec<(u32, u32)> {
    let names: HashSet<String> = inodes.iter().map(|i| format!("pipe:[{i}]")).collect();
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            if names.contains(target.to_string_lossy().as_ref()) {
                if let Some(n) = fd.file_name().to_str().and_then(|n| n.parse().ok()) {
                    out.push((pid, n));
                }
            }
        }
    }
    out
}

/// Whether `pid` exists and is not a zombie.
pub fn is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(text) => parse_stat(&text).is_some_and(|e| e.state != 'Z' && e.state != 'X'),
        Err(_) => false,
    }
}

/// Host memory from `/proc/meminfo`, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostMemory {
    /// MemTotal.
    pub total: u64,
    /// MemAvailable (what can still be allocated without swapping).
    pub available: u64,
}

impl HostMemory {
    /// Memory in use: total − available.
    pub fn used(&self) -> u64 {
        self.total.saturating_sub(self.available)
    }
}

/// Parses the text of `/proc/meminfo`.
pub fn parse_meminfo(text: &str) -> Option<HostMemory> {
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    };
    Some(HostMemory {
        total: field("MemTotal:")?,
        available: field("MemAvailable:")?,
    })
}

/// Reads `/proc/meminfo`.
pub fn host_memory() -> std::io::Result<HostMemory> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    parse_meminfo(&text).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "no MemTotal/MemAvailable lines",
        )
    })
}

/// The host name (`localhost` if it cannot be read).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is writable for its length; gethostname NUL-terminates within it on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        if let Ok(s) = std::str::from_utf8(&buf[..end]) {
            if !s.is_empty() {
                return s.to_string();
            }
        }
    }
    "localhost".into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    #[test]
    fn stat_with_odd_command_names_parses() {
        let text = "4242 (my (weird) proc) S 10 4242 4242 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 \
                    99 1000000 321 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        let e = parse_stat(text).unwrap();
        assert_eq!(
            e,
            ProcEntry {
                pid: 4242,
                ppid: 10,
                pgrp: 4242,
                state: 'S',
                rss_pages: 321,
                start_time: 99
            }
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    fn entry(pid: u32, ppid: u32, pgrp: u32, rss_pages: u64) -> ProcEntry {
        ProcEntry {
            pid,
            ppid,
            pgrp,
            state: 'S',
            rss_pages,
            start_time: 0,
        }
    }

    #[test]
    fn tree_is_group_plus_descendants() {
        let table = vec![
            entry(1, 0, 1, 5),
            entry(100, 1, 100, 10),   // the job leader
            entry(101, 100, 100, 20), // a child in the group
            entry(102, 101, 102, 40), // a grandchild that called setsid: still counted
            entry(103, 102, 102, 80), // and its child
            entry(200, 1, 200, 1000), // someone else
            entry(201, 1, 100, 3),    // reparented to init but still in the group
        ];
        let pids: Vec<u32> = tree_of(&table, 100).iter().map(|e| e.pid).collect();
        assert_eq!(pids, vec![100, 101, 102, 103, 201]);
        let mem = tree_memory_with(&table, 100, |e| e.rss_pages * 4096);
        assert_eq!(mem.rss_bytes, (10 + 20 + 40 + 80 + 3) * 4096);
        assert!(tree_of(&table, 999).is_empty());
    }

    #[test]
    fn meminfo_parses() {
        let text = "MemTotal:       16384 kB\nMemFree:  100 kB\nMemAvailable:    8192 kB\n";
        let m = parse_meminfo(text).unwrap();
        assert_eq!(m.total, 16384 * 1024);
        assert_eq!(m.used(), 8192 * 1024);
        assert!(host_memory().unwrap().total > 0);
    }

    #[test]
    fn real_tree_rss_counts_every_process_and_kill_tree_ends_them() {
        // A shell in its own group with two children; one of them leaves the group.
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 30 & setsid sleep 30 & wait"])
            .process_group(0)
            .spawn()
            .unwrap();
        let pgid = child.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        // Wait until all three exist and the tree has settled (two equal readings in a row).
        let mut prev = TreeMemory::default();
        let mem = loop {
            std::thread::sleep(std::time::Duration::from_millis(50));
            let mem = tree_memory(&read_all(), pgid);
            if (mem.pids.len() >= 3 && mem == prev) || std::time::Instant::now() > deadline {
                break mem;
            }
            prev = mem;
        };
        assert!(mem.pids.len() >= 3, "shell + 2 sleeps, got {:?}", mem.pids);
        // The sum equals what each process's own statm says (within a re-read's drift).
        let page = kiln_job::memory::page_size();
        let direct: u64 = mem
            .pids
            .iter()
            .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/statm")).ok())
            .filter_map(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|pages| pages * page)
            .sum();
        assert!(mem.rss_bytes > 0);
        let diff = mem.rss_bytes.abs_diff(direct);
        assert!(
            diff <= 64 * page,
            "tree {} vs direct {}",
            mem.rss_bytes,
            direct
        );
        kill_tree(pgid, &[]);
        let _ = child.wait();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while mem.pids.iter().any(|&p| is_alive(p)) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        for p in &mem.pids {
            assert!(!is_alive(*p), "pid {p} survived kill_tree");
        }
    }

    #[test]
    fn kill_tree_finds_orphans_it_saw_before() {
        // The leader starts a child that leaves the group, then the leader dies: the child is
        // an orphan that only the earlier snapshot knows about.
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "setsid sleep 30 & sleep 30"])
            .process_group(0)
            .spawn()
            .unwrap();
        let pgid = child.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let known: Vec<ProcEntry> = loop {
            std::thread::sleep(std::time::Duration::from_millis(50));
            let table = read_all();
            let tree: Vec<ProcEntry> = tree_of(&table, pgid).into_iter().cloned().collect();
            let escaped = tree.iter().any(|e| e.pgrp != pgid);
            if escaped || std::time::Instant::now() > deadline {
                break tree;
            }
        };
        let orphan = known
            .iter()
            .find(|e| e.pgrp != pgid)
            .expect("setsid child")
            .pid;
        // SAFETY: kills our own child's group.
        unsafe { libc::kill(-(pgid as i32), libc::SIGKILL) };
        let _ = child.wait();
        assert!(is_alive(orphan), "the orphan outlived its group");
        kill_tree(pgid, &known);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while is_alive(orphan) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(!is_alive(orphan), "orphan {orphan} survived kill_tree");
    }
}
