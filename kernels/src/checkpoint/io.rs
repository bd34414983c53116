//! Safetensors reading and writing. A tensor is [`TensorData`] (dtype, shape, raw little-endian
//! bytes); a file is a `BTreeMap<String, TensorData>`. Every failure names the file and what is
//! wrong (missing, truncated, corrupt header, a shard the index points to that is not there).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::KernelError;

/// One tensor as stored: dtype, shape and its raw bytes (row-major, little-endian).
#[derive(Clone, Debug, PartialEq)]
pub struct TensorData {
    /// Element type.
    pub dtype: Dtype,
    /// Shape (empty for a scalar).
    pub shape: Vec<usize>,
    /// Raw bytes; `len == shape.product() * dtype size`.
    pub data: Vec<u8>,
}

impl TensorData {
    /// A tensor from its parts, checking the byte length.
    pub fn new(dtype: Dtype, shape: Vec<usize>, data: Vec<u8>) -> Result<Self, KernelError> {
        let n: usize = shape.iter().product();
        let want = n * dtype.bitsize() / 8;
        if data.len() != want {
            return Err(KernelError::LengthMismatch {
                what: "tensor bytes for dtype and shape",
                expected: want,
                got: data.len(),
            });
        }
        Ok(TensorData { dtype, shape, data })
    }

    /// An f32 tensor.
    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Self {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        TensorData {
            dtype: Dtype::F32,
            shape,
            data,
        }
    }

    /// The values as f32, for F32, F16 and BF16 tensors (None for other dtypes).
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        let c = self.data.chunks_exact(2);
        match self.dtype {
            Dtype::F32 => Some(
                self.data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            ),
            Dtype::F16 => Some(
                c.map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
            ),
            Dtype::BF16 => Some(
                c.map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
            ),
            _ => None,
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

impl safetensors::View for &TensorData {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// A file's tensors by name.
pub type TensorMap = BTreeMap<String, TensorData>;

/// A file's `__metadata__` strings.
pub type Metadata = HashMap<String, String>;

/// Where a checkpoint's tensors are: the shard files in order, and the directory holding the
/// config and tokenizer files (None when the input is a lone `.safetensors` file).
#[derive(Clone, Debug)]
pub struct CheckpointShards {
    /// The `.safetensors` files.
    pub files: Vec<PathBuf>,
    /// The model directory, if the input was one.
    pub dir: Option<PathBuf>,
    /// Whether the shards came from `model.safetensors.index.json`.
    pub indexed: bool,
}

/// Find the safetensors files of `path`: a `.safetensors` file; or a directory with
/// `model.safetensors.index.json` (every shard it names must exist), `model.safetensors`, or
/// otherwise all `*.safetensors` files in name order.
pub fn list_shards(path: &Path) -> Result<CheckpointShards, KernelError> {
    let meta =
        std::fs::metadata(path).map_err(|e| KernelError::io("opening the model at", path, e))?;
    if meta.is_file() {
        return Ok(CheckpointShards {
            files: vec![path.to_path_buf()],
            dir: None,
            indexed: false,
        });
    }
    let index = path.join("model.safetensors.index.json");
    if index.exists() {
        let text =
            std::fs::read_to_string(&index).map_err(|e| KernelError::io("reading", &index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| KernelError::checkpoint(&index, format!("not valid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| {
                KernelError::checkpoint(
                    &index,
                    "has no \"weight_map\" object mapping tensor names to shard files",
                )
            })?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        files.sort();
        files.dedup();
        let files: Vec<PathBuf> = files.into_iter().map(|f| path.join(f)).collect();
        if let Some(missing) = files.iter().find(|f| !f.exists()) {
            return Err(KernelError::checkpoint(
                missing,
                format!(
                    "shard listed in {} does not exist; the download is incomplete",
                    index.display()
                ),
            ));
        }
        return Ok(CheckpointShards {
            files,
            dir: Some(path.to_path_buf()),
            indexed: true,
        });
    }
    let single = path.join("model.safetensors");
    if single.exists() {
        return Ok(CheckpointShards {
            files: vec![single],
            dir: Some(path.to_path_buf()),
            indexed: false,
        });
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| KernelError::io("listing", path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(KernelError::checkpoint(
            path,
            "no .safetensors files (expected model.safetensors, model.safetensors.index.json or *.safetensors)",
        ));
    }
    Ok(CheckpointShards {
        files,
        dir: Some(path.to_path_buf()),
        indexed: false,
    })
}

/// Read one safetensors file completely: its tensors (name order) and its metadata.
pub fn read_safetensors_file(path: &Path) -> Result<(TensorMap, Option<Metadata>), KernelError> {
    let bytes = std::fs::read(path).map_err(|e| KernelError::io("reading", path, e))?;
    let corrupt = |e: safetensors::SafeTensorError| {
        KernelError::checkpoint(
            path,
            format!("not a valid safetensors file ({e:?}); it may be truncated or corrupt — download it again"),
        )
    };
    let st = SafeTensors::deserialize(&bytes).map_err(corrupt)?;
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(corrupt)?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        out.insert(name, tensor_from_view(&view));
    }
    Ok((out, header.metadata().clone()))
}

fn tensor_from_view(v: &TensorView<'_>) -> TensorData {
    TensorData {
        dtype: v.dtype(),
        shape: v.shape().to_vec(),
        data: v.data().to_vec(),
    }
}

/// Write `tensors` to one safetensors file (written to a temporary name, then renamed, so a
/// crash never leaves a half-written file under the final name). Reusable for any export:
/// name → (dtype, shape, bytes).
pub fn write_safetensors_file(
    path: &Path,
    tensors: &BTreeMap<String, TensorData>,
    metadata: Option<HashMap<String, String>>,
) -> Result<(), KernelError> {
    for (name, t) in tensors {
        let want = t.numel() * t.dtype.bitsize() / 8;
        if t.data.len() != want {
            return Err(KernelError::checkpoint(
                path,
                format!(
                    "tensor {name}: {} bytes for {:?} {:?} (expected {want})",
                    t.data.len(),
                    t.dtype,
                    t.shape
                ),
            ));
        }
    }
    let tmp = path.with_extension("safetensors.partial");
    safetensors::serialize_to_file(tensors.iter().map(|(k, v)| (k.as_str(), v)), metadata, &tmp)
        .map_err(|e| KernelError::checkpoint(path, format!("writing failed: {e:?}")))?;
    std::fs::rename(&tmp, path).map_err(|e| KernelError::io("renaming into place", path, e))
}
