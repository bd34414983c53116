//! `Checkpoint`: the tensors of a Hugging Face model directory by name. Finding the files (one
//! `.safetensors` file, or the shards `model.safetensors.index.json` lists — each of which must
//! exist) and reading and validating each one is `kiln_kernels::checkpoint`'s job
//! (`list_shards`, `read_safetensors_file`); this module maps its errors to the engine's (a
//! truncated or corrupt file, naming it) and answers typed questions (a missing tensor, a
//! shape that does not match the config).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_kernels::checkpoint::{list_shards, read_safetensors_file, TensorData};
use kiln_kernels::KernelError;
use safetensors::tensor::Dtype;

use crate::error::{EngineError, Result};

/// A tensor as stored: dtype, shape and raw little-endian bytes (borrowed from the checkpoint).
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
    tensor: &'a TensorData,
}

impl RawTensor<'_> {
    /// The elements converted to f32 (from F32, F16 or BF16).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        self.tensor
            .to_f32()
            .ok_or_else(|| EngineError::UnsupportedDtype {
                name: self.name.to_string(),
                dtype: format!("{:?}", self.dtype),
                expected: "F32, F16 or BF16",
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
        self.tensor.numel()
    }
}

/// The safetensors files of one model directory, their tensors indexed by name.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<PathBuf>,
    tensors: BTreeMap<String, TensorData>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("files", &self.files)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Checkpoint {
    /// Open the weights of `dir`: the shards named by `model.safetensors.index.json` if it
    /// exists, otherwise `model.safetensors`, otherwise every `*.safetensors` file in the
    /// directory. Every file is read and checked here, so a truncated or corrupt one fails at
    /// open, naming it.
    pub fn open(dir: &Path) -> Result<Self> {
        let shards = list_shards(dir).map_err(|e| match e {
            // The one error about the directory itself: it holds no weights.
            KernelError::Checkpoint { path, .. } if path == dir => EngineError::config(
                dir,
                "no .safetensors weights found (expected model.safetensors or sharded files with model.safetensors.index.json)",
            ),
            e => io_or_kernel(e),
        })?;
        // shards are read in parallel (a 7B model is several files of gigabytes); their
        // tensors join in file order
        use rayon::prelude::*;
        let read: Vec<_> = shards
            .files
            .par_iter()
            .map(|path| {
                read_safetensors_file(path).map_err(|e| match e {
                    KernelError::Checkpoint { path, message } => EngineError::CorruptSafetensors {
                        path,
                        reason: message,
                    },
                    e => io_or_kernel(e),
                })
            })
            .collect::<Result<_>>()?;
        let mut tensors = BTreeMap::new();
        for (file, _) in read {
            tensors.extend(file);
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            files: shards.files,
            tensors,
        })
    }

    /// The model directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether a tensor of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }

    /// Every tensor by name (what `kiln_kernels::checkpoint::nvfp4_from_tensors` reads).
    pub fn tensors(&self) -> &BTreeMap<String, TensorData> {
        &self.tensors
    }

    /// A tensor by name; `MissingTensor` (naming it) if absent.
    pub fn get(&self, name: &str) -> Result<RawTensor<'_>> {
        let (key, t) =
            self.tensors
                .get_key_value(name)
                .ok_or_else(|| EngineError::MissingTensor {
                    name: name.to_string(),
                    dir: self.dir.clone(),
                })?;
        Ok(RawTensor {
            name: key,
            dtype: t.dtype,
            shape: &t.shape,
            data: &t.data,
            tensor: t,
        })
    }
}

/// A kernels-crate error as the engine's: I/O errors keep their own variant.
fn io_or_kernel(e: KernelError) -> EngineError {
    match e {
        KernelError::Io { op, path, source } => EngineError::Io { op, path, source },
        e => EngineError::Kernel(e),
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
            dir.path().join("model.safetensors.index.json"),
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

    #[test]
    fn a_shard_the_index_names_but_that_is_missing_is_named() {
        let dir = tempfile::tempdir().unwrap();
        write_file(
            &dir.path().join("a.safetensors"),
            &[("x", vec![1.0, 2.0], vec![2])],
        );
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            r#"{"metadata":{},"weight_map":{"x":"a.safetensors","y":"b.safetensors"}}"#,
        )
        .unwrap();
        let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("b.safetensors") && err.contains("does not exist"),
            "{err}"
        );
    }
}
