//! The layout of an agent's session store on disk, as both sides see it: one file per session,
//! `<id>.session.safetensors`, in one directory. The engine writes and reads the files (their
//! contents are its business); the agent lists them to tell the coordinator which sessions it
//! holds, so a session's next turn is placed where its KV cache is.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// File name suffix of a stored session.
pub const SUFFIX: &str = ".session.safetensors";

/// A stored session as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSession {
    /// The session id.
    pub id: String,
    /// File size.
    pub bytes: u64,
    /// Last load or save (the file's modification time).
    pub last_used: SystemTime,
}

/// Whether `id` is a valid session id: 1–128 letters, digits, '-', '_' or '.', not starting
/// with '.'. `Err` says so in words.
pub fn check_session_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "session id {id:?} must be 1–128 characters of letters, digits, '-', '_' or '.', not starting with '.'"
        ))
    }
}

/// The file of session `id` in the store `dir`.
pub fn session_file(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}{SUFFIX}"))
}

/// The sessions stored in `dir`, least recently used first. Files being written (hidden
/// temporaries) and files that vanish while listing are skipped.
pub fn list_sessions(dir: &Path) -> std::io::Result<Vec<StoredSession>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(id) = name.strip_suffix(SUFFIX) else {
            continue;
        };
        if id.starts_with('.') {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        out.push(StoredSession {
            id: id.to_string(),
            bytes: meta.len(),
            last_used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        });
    }
    out.sort_by(|a, b| a.last_used.cmp(&b.last_used).then_with(|| a.id.cmp(&b.id)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_listing() {
        assert!(check_session_id("chat-1.a_b").is_ok());
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(129)] {
            assert!(check_session_id(bad).is_err(), "{bad:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(session_file(dir.path(), "s1"), b"12345").unwrap();
        std::fs::write(dir.path().join(".s2.session.safetensors"), b"x").unwrap();
        std::fs::write(dir.path().join("other.txt"), b"x").unwrap();
        let listed = list_sessions(dir.path()).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].id.as_str(), listed[0].bytes), ("s1", 5));
    }
}
