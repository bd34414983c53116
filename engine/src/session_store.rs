//! `SessionStore`: sessions kept between jobs in a directory, one safetensors file per
//! session (`<id>.session.safetensors`: the token ids, every layer's keys and values, and in
//! the header metadata the model fingerprint and the messages), under a byte budget with
//! least-recently-used eviction. Last use is the file's modification time, refreshed on each
//! load and save, so several job processes can share one store without an index file.
//!
//! Contract: `save` is atomic (write a temporary file, fsync, rename, fsync the directory):
//! when it returns, the session is durable and a crash never leaves a half-written session
//! under its name. A missing or evicted session loads as `None`.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use crate::chat::ChatMessage;
use crate::engine::{Engine, HostTensor};
use crate::error::{EngineError, Result};
use crate::generate::Sequence;
use crate::session::{validate_session_id, Session};

pub use kiln_job::sessions::StoredSession as SessionInfo;
use kiln_job::sessions::{list_sessions, session_file};
/// Format version written to the metadata.
const VERSION: &str = "1";

/// What a save did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaveReport {
    /// Bytes of the saved session.
    pub bytes: u64,
    /// Sessions evicted to stay under the budget, oldest first.
    pub evicted: Vec<String>,
    /// Bytes of all stored sessions after the save.
    pub total_bytes: u64,
}

/// A directory of sessions under a byte budget.
#[derive(Debug, Clone)]
pub struct SessionStore {
    dir: PathBuf,
    budget_bytes: u64,
}

impl SessionStore {
    /// Open (creating) the store in `dir` with a budget of `budget_bytes`.
    pub fn open(dir: &Path, budget_bytes: u64) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| EngineError::io("creating", dir, e))?;
        Ok(SessionStore {
            dir: dir.to_path_buf(),
            budget_bytes,
        })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The byte budget.
    pub fn budget_bytes(&self) -> u64 {
        self.budget_bytes
    }

    fn path(&self, id: &str) -> PathBuf {
        session_file(&self.dir, id)
    }

    /// Load a session (refreshing its last use) onto `engine`; `None` if it is not stored.
    pub fn load(&self, id: &str, engine: &Engine) -> Result<Option<Session>> {
        validate_session_id(id)?;
        let path = self.path(id);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(EngineError::io("reading", &path, e)),
        };
        touch(&path);
        decode(id, &bytes, engine)
            .map(Some)
            .map_err(|m| EngineError::Session {
                id: id.to_string(),
                message: format!(
                    "stored file {} is unreadable ({m}); remove it to start over",
                    path.display()
                ),
            })
    }

    /// Save a session atomically, then evict least-recently-used others until the store is
    /// within budget. A session larger than the whole budget is not kept (error).
    pub fn save(&self, session: &Session) -> Result<SaveReport> {
        validate_session_id(&session.id)?;
        let data = encode(session)?;
        let bytes = data.len() as u64;
        if bytes > self.budget_bytes {
            let _ = std::fs::remove_file(self.path(&session.id));
            return Err(EngineError::Session {
                id: session.id.clone(),
                message: format!(
                    "needs {bytes} bytes, more than the session store's whole budget of {} bytes; raise the budget or keep conversations shorter",
                    self.budget_bytes
                ),
            });
        }
        let path = self.path(&session.id);
        let tmp = self
            .dir
            .join(format!(".{}.{}.tmp", session.id, std::process::id()));
        let mut f = File::create(&tmp).map_err(|e| EngineError::io("creating", &tmp, e))?;
        f.write_all(&data)
            .map_err(|e| EngineError::io("writing", &tmp, e))?;
        f.sync_all()
            .map_err(|e| EngineError::io("syncing", &tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(|e| EngineError::io("renaming into", &path, e))?;
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        let evicted = self.evict_except(&session.id)?;
        let total_bytes = self.list()?.iter().map(|s| s.bytes).sum();
        tracing::debug!(id = %session.id, bytes, total_bytes, ?evicted, "session saved");
        Ok(SaveReport {
            bytes,
            evicted,
            total_bytes,
        })
    }

    /// Remove a session; `true` if it existed.
    pub fn remove(&self, id: &str) -> Result<bool> {
        validate_session_id(id)?;
        match std::fs::remove_file(self.path(id)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(EngineError::io("removing", self.path(id), e)),
        }
    }

    /// Stored sessions, least recently used first.
    pub fn list(&self) -> Result<Vec<SessionInfo>> {
        list_sessions(&self.dir).map_err(|e| EngineError::io("listing", &self.dir, e))
    }

    /// Evict LRU sessions (never `keep`) until the total is within budget.
    fn evict_except(&self, keep: &str) -> Result<Vec<String>> {
        let list = self.list()?;
        let mut total: u64 = list.iter().map(|s| s.bytes).sum();
        let mut evicted = Vec::new();
        for s in &list {
            if total <= self.budget_bytes {
                break;
            }
            if s.id == keep {
                continue;
            }
            if self.remove(&s.id)? {
                evicted.push(s.id.clone());
            }
            total -= s.bytes;
        }
        Ok(evicted)
    }
}

/// Set a file's modification time to now (its last use); best effort.
fn touch(path: &Path) {
    if let Ok(f) = File::options().write(true).open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

/// Serialize a session to safetensors bytes.
fn encode(s: &Session) -> Result<Vec<u8>> {
    let n = s.seq.tokens.len();
    let cache = &s.seq.cache;
    let cached = !cache.is_empty();
    debug_assert!(
        !cached || cache.len() == n,
        "cache holds every token or none"
    );
    let mut bufs: Vec<(String, Vec<usize>, Vec<u8>, Dtype)> = vec![(
        "tokens".into(),
        vec![n],
        s.seq.tokens.iter().flat_map(|t| t.to_le_bytes()).collect(),
        Dtype::U32,
    )];
    for (i, (k, v)) in cache.to_host()?.into_iter().enumerate() {
        for (name, t) in [("k", k), ("v", v)] {
            let data: Vec<u8> = t.data.iter().flat_map(|x| x.to_le_bytes()).collect();
            bufs.push((format!("layers.{i}.{name}"), t.shape, data, Dtype::F32));
        }
    }
    let views: Vec<(String, TensorView<'_>)> = bufs
        .iter()
        .map(|(name, shape, data, dt)| {
            Ok((
                name.clone(),
                TensorView::new(*dt, shape.clone(), data).map_err(st_err)?,
            ))
        })
        .collect::<Result<_>>()?;
    let mut meta = HashMap::new();
    meta.insert("kiln_session".to_string(), VERSION.to_string());
    meta.insert("model".to_string(), s.model_fingerprint.clone());
    meta.insert("layers".to_string(), cache.num_layers().to_string());
    meta.insert(
        "messages".to_string(),
        serde_json::to_string(&s.messages).expect("serializable"),
    );
    safetensors::serialize(views, Some(meta)).map_err(st_err)
}

fn st_err(e: safetensors::SafeTensorError) -> EngineError {
    EngineError::InvalidArgument(format!("session serialization: {e}"))
}

/// Parse a stored session; the error string says what is wrong.
fn decode(id: &str, bytes: &[u8], engine: &Engine) -> std::result::Result<Session, String> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let (_, md) = SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
    let meta = md.metadata().clone().unwrap_or_default();
    if meta.get("kiln_session").map(String::as_str) != Some(VERSION) {
        return Err(format!("not a version {VERSION} Kiln session"));
    }
    let get = |k: &str| {
        meta.get(k)
            .cloned()
            .ok_or_else(|| format!("metadata `{k}` missing"))
    };
    let layers: usize = get("layers")?
        .parse()
        .map_err(|_| "bad `layers`".to_string())?;
    let messages: Vec<ChatMessage> =
        serde_json::from_str(&get("messages")?).map_err(|e| format!("bad `messages`: {e}"))?;
    let tv = st.tensor("tokens").map_err(|e| e.to_string())?;
    if tv.dtype() != Dtype::U32 {
        return Err("`tokens` is not U32".into());
    }
    let tokens: Vec<u32> = tv
        .data()
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let cache = if st.names().iter().any(|n| n.starts_with("layers.")) {
        let mut kv = Vec::with_capacity(layers);
        for i in 0..layers {
            let load = |name: String| -> std::result::Result<HostTensor, String> {
                let t = st.tensor(&name).map_err(|e| e.to_string())?;
                if t.dtype() != Dtype::F32 || t.shape().len() != 4 || t.shape()[2] != tokens.len() {
                    return Err(format!(
                        "`{name}` has dtype {:?} shape {:?}",
                        t.dtype(),
                        t.shape()
                    ));
                }
                let v: Vec<f32> = t
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                Ok(HostTensor {
                    shape: t.shape().to_vec(),
                    data: v,
                })
            };
            kv.push((
                load(format!("layers.{i}.k"))?,
                load(format!("layers.{i}.v"))?,
            ));
        }
        engine.cache_from_host(kv).map_err(|e| e.to_string())?
    } else {
        engine.empty_cache(layers)
    };
    Ok(Session {
        id: id.to_string(),
        model_fingerprint: get("model")?,
        seq: Sequence { tokens, cache },
        messages,
    })
}
