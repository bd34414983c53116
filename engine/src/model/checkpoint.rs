//! `Checkpoint`: read access to the `.safetensors` files of a Hugging Face model directory —
//! one file, or many shards listed by `model.safetensors.index.json` — memory-mapped, with
//! every header validated up front so a truncated or corrupt file fails at open, naming it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata};
use safetensors::SafeTensors;

use crate::error::{EngineError, Result};

/// Name of the shard index file.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// One memory-mapped `.safetensors` file with its parsed header.
struct ShardFile {
    path: PathBuf,
    mmap: Mmap,
    /// Byte offset of the data section (8 + header length).
    data_start: usize,
    metadata: Metadata,
}

/// A tensor as stored: dtype, shape and raw little-endian bytes (borrowed from the mapping).
#[derive(Debug, Clone, Copy)]
pub struct RawTensor<'a> {
    /// The tensor's name.
    pub name: &'a str,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: &'a [usize],
    /// Raw bytes (`numel · size_of(dtype)`).
    pub data: &'a [u8],
}

impl RawTensor<'_> {
    /// The elements converted to f32 (from F32, F16 or BF16).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let d = self.data;
        Ok(match self.dtype {
            Dtype::F32 => d
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::BF16 => d
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::F16 => d
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(EngineError::UnsupportedDtype {
                    name: self.name.to_string(),
                    dtype: format!("{other:?}"),
                    expected: "F32, F16 or BF16",
                })
            }
        })
    }

    /// Check the shape, naming the tensor and both shapes on a mismatch.
    pub fn expect_shape(&self, expected: &[usize]) -> Result<()> {
        if self.shape != expected {
            return Err(EngineError::ShapeMismatch {
                name: self.name.to_string(),
                expected: expected.to_vec(),
                got: self.shape.to_vec(),
            });
        }
        Ok(())
    }

    /// Check the dtype.
    pub fn expect_dtype(&self, dtype: Dtype, expected: &'static str) -> Result<()> {
        if self.dtype != dtype {
            return Err(EngineError::UnsupportedDtype {
                name: self.name.to_string(),
                dtype: format!("{:?}", self.dtype),
                expected,
            });
        }
        Ok(())
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The safetensors files of one model directory, indexed by tensor name.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<ShardFile>,
    /// Tensor name → index into `files`.
    index: HashMap<String, usize>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field(
                "files",
                &self.files.iter().map(|s| &s.path).collect::<Vec<_>>(),
            )
            .field("tensors", &self.index.len())
            .finish()
    }
}

impl Checkpoint {
    /// Open the weights of `dir`: the shards named by `model.safetensors.index.json` if it
    /// exists, otherwise every `*.safetensors` file in the directory.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        let paths: Vec<PathBuf> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|e| EngineError::io("reading", &index_path, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| EngineError::config(&index_path, format!("not valid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    EngineError::config(&index_path, "missing the `weight_map` object")
                })?;
            let mut files: Vec<String> = map
                .values()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect();
            files.sort();
            files.dedup();
            files.into_iter().map(|f| dir.join(f)).collect()
        } else {
            let rd = std::fs::read_dir(dir).map_err(|e| EngineError::io("listing", dir, e))?;
            let mut files: Vec<PathBuf> = rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            files.sort();
            files
        };
        if paths.is_empty() {
            return Err(EngineError::config(
                dir,
                "no .safetensors weights found (expected model.safetensors or sharded files with model.safetensors.index.json)",
            ));
        }
        Self::from_files(dir, &paths)
    }

    /// Open an explicit list of files (`dir` is used in error messages).
    pub fn from_files(dir: &Path, paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for path in paths {
            let file =
                std::fs::File::open(path).map_err(|e| EngineError::io("opening", path, e))?;
            // SAFETY: the mapping is read-only; Kiln never writes a checkpoint while it is
            // loaded (exports write new files and rename them into place).
            let mmap =
                unsafe { Mmap::map(&file) }.map_err(|e| EngineError::io("mapping", path, e))?;
            let (n, metadata) =
                SafeTensors::read_metadata(&mmap).map_err(|e| EngineError::CorruptSafetensors {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            let fi = files.len();
            for name in metadata.tensors().keys() {
                index.insert(name.clone(), fi);
            }
            files.push(ShardFile {
                path: path.clone(),
                mmap,
                data_start: 8 + n,
                metadata,
            });
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            files,
            index,
        })
    }

    /// The model directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether a tensor of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.index.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// A tensor by name; `MissingTensor` (naming it) if absent.
    pub fn get(&self, name: &str) -> Result<RawTensor<'_>> {
        let fi = *self
            .index
            .get(name)
            .ok_or_else(|| EngineError::MissingTensor {
                name: name.to_string(),
                dir: self.dir.clone(),
            })?;
        let f = &self.files[fi];
        let info = f
            .metadata
            .info(name)
            .expect("indexed names exist in their file");
        let (a, b) = info.data_offsets;
        // read_metadata validated that the offsets cover the data section exactly.
        let data = &f.mmap[f.data_start + a..f.data_start + b];
        let (key, _) = self.index.get_key_value(name).expect("present");
        Ok(RawTensor {
            name: key,
            dtype: info.dtype,
            shape: &info.shape,
            data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    fn write_file(path: &Path, tensors: &[(&str, Vec<f32>, Vec<usize>)]) {
        let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
            .iter()
            .map(|(n, v, s)| {
                (
                    n.to_string(),
                    v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    s.clone(),
                )
            })
            .collect();
        let views: Vec<(String, TensorView<'_>)> = bytes
            .iter()
            .map(|(n, b, s)| {
                (
                    n.clone(),
                    TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    #[test]
    fn reads_sharded_directories_and_names_missing_tensors() {
        let dir = tempfile::tempdir().unwrap();
        write_file(
            &dir.path().join("a.safetensors"),
            &[("x", vec![1.0, 2.0], vec![2])],
        );
        write_file(
            &dir.path().join("b.safetensors"),
            &[("y", vec![3.0; 4], vec![2, 2])],
        );
        std::fs::write(
            dir.path().join(INDEX_FILE),
            r#"{"metadata":{},"weight_map":{"x":"a.safetensors","y":"b.safetensors"}}"#,
        )
        .unwrap();
        let ck = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(ck.get("x").unwrap().to_f32().unwrap(), vec![1.0, 2.0]);
        let y = ck.get("y").unwrap();
        y.expect_shape(&[2, 2]).unwrap();
        let err = y.expect_shape(&[4]).unwrap_err().to_string();
        assert!(
            err.contains("y") && err.contains("[2, 2]") && err.contains("[4]"),
            "{err}"
        );
        let err = ck.get("z").unwrap_err().to_string();
        assert!(err.contains("tensor z is missing"), "{err}");
    }

    #[test]
    fn truncated_file_is_reported_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.safetensors");
        write_file(&p, &[("x", vec![1.0; 64], vec![64])]);
        let full = std::fs::read(&p).unwrap();
        std::fs::write(&p, &full[..full.len() - 10]).unwrap();
        let err = Checkpoint::open(dir.path()).unwrap_err();
        assert!(
            matches!(err, EngineError::CorruptSafetensors { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("model.safetensors"));
        std::fs::write(&p, b"garbage!garbage").unwrap();
        assert!(matches!(
            Checkpoint::open(dir.path()).unwrap_err(),
            EngineError::CorruptSafetensors { .. }
        ));
    }
}
