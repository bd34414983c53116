//! Safetensors reading and writing. A tensor is [`TensorData`] (dtype, shape, raw little-endian
//! bytes); a file is a `BTreeMap<String, TensorData>`. Every failure names the file and what is
//! wrong (missing, truncated, corrupt header, a shard the index points to that is not there).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::Dtype;

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

    /// The values as f32, for F32, F16 and BF16 tensors (None for other dtypes); large
    /// tensors are converted on all cores (an 8B model's embeddings are 1.2 B values).
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        use rayon::prelude::*;
        let width = match self.dtype {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            _ => return None,
        };
        const CHUNK: usize = 1 << 16;
        let mut out = vec![0f32; self.data.len() / width];
        let dtype = self.dtype;
        out.par_chunks_mut(CHUNK)
            .zip(self.data.par_chunks(CHUNK * width))
            .for_each(|(dst, src)| {
                let values = dst.iter_mut().zip(src.chunks_exact(width));
                match dtype {
                    Dtype::F32 => values.for_each(|(d, b)| {
                        *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    }),
                    Dtype::F16 => values.for_each(|(d, b)| {
                        *d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                    }),
                    _ => values.for_each(|(d, b)| {
                        *d = half::bf16::from_le_bytes([b[0], b[1]]).to_f32();
                    }),
                }
            });
        Some(out)
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
    use std::io::Read;
    let corrupt = |what: String| {
        KernelError::checkpoint(
            path,
            format!("not a valid safetensors file ({what}); it may be truncated or corrupt — download it again"),
        )
    };
    let mut file = std::fs::File::open(path).map_err(|e| KernelError::io("reading", path, e))?;
    let len = file
        .metadata()
        .map_err(|e| KernelError::io("reading", path, e))?
        .len();
    let read = |file: &mut std::fs::File, buf: &mut [u8], what: &str| {
        file.read_exact(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => corrupt(format!("it ends inside its {what}")),
            _ => KernelError::io("reading", path, e),
        })
    };
    let mut n8 = [0u8; 8];
    read(&mut file, &mut n8, "header length")?;
    let n = u64::from_le_bytes(n8);
    if n > MAX_HEADER_BYTES || 8 + n > len {
        return Err(corrupt(format!("a {n}-byte header in a {len}-byte file")));
    }
    let mut header = vec![0u8; n as usize];
    read(&mut file, &mut header, "header")?;
    let meta: safetensors::tensor::Metadata = serde_json::from_slice(&header)
        .map_err(|e| corrupt(format!("its header does not parse: {e}")))?;
    // Metadata's parse checked that the tensors tile the data from 0 without gaps; the file
    // must end where the last one does.
    let mut infos: Vec<(String, &safetensors::tensor::TensorInfo)> =
        meta.tensors().into_iter().collect();
    infos.sort_by_key(|(_, i)| i.data_offsets);
    let end = infos.last().map_or(0, |(_, i)| i.data_offsets.1) as u64;
    if 8 + n + end != len {
        return Err(corrupt(format!(
            "the header declares {end} bytes of tensor data, the file holds {}",
            len - 8 - n
        )));
    }
    // Each tensor read straight into its own buffer (no copy of the whole file first).
    let mut out = BTreeMap::new();
    for (name, info) in infos {
        let (s, e) = info.data_offsets;
        let mut data = Vec::with_capacity(e - s);
        (&mut file)
            .take((e - s) as u64)
            .read_to_end(&mut data)
            .map_err(|err| KernelError::io("reading", path, err))?;
        if data.len() != e - s {
            return Err(corrupt(format!("it ends inside tensor {name}")));
        }
        out.insert(
            name,
            TensorData {
                dtype: info.dtype,
                shape: info.shape.clone(),
                data,
            },
        );
    }
    Ok((out, meta.metadata().clone()))
}

/// The largest safetensors header read (the format's own limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

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

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dir: &Path) -> (PathBuf, Vec<u8>) {
        let p = dir.join("m.safetensors");
        let mut t = BTreeMap::new();
        t.insert(
            "a".to_string(),
            TensorData::from_f32(vec![2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
        );
        t.insert(
            "b".to_string(),
            TensorData::new(Dtype::U8, vec![5], vec![9, 8, 7, 6, 5]).unwrap(),
        );
        let meta = HashMap::from([("step".to_string(), "3".to_string())]);
        write_safetensors_file(&p, &t, Some(meta)).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        (p, bytes)
    }

    #[test]
    fn a_written_file_reads_back_tensor_by_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let (p, _) = sample(dir.path());
        let (t, meta) = read_safetensors_file(&p).unwrap();
        assert_eq!(t["a"].to_f32().unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(
            (t["b"].shape.clone(), t["b"].data.clone()),
            (vec![5], vec![9, 8, 7, 6, 5])
        );
        assert_eq!(meta.unwrap()["step"], "3");
    }

    #[test]
    fn to_f32_widens_every_float_dtype_across_chunk_edges() {
        // More than one parallel chunk (65,536 values), with a partial last one.
        let vals: Vec<f32> = (0..150_001).map(|i| (i as f32 - 75_000.0) * 0.25).collect();
        let f32t = TensorData::from_f32(vec![vals.len()], &vals);
        assert_eq!(f32t.to_f32().unwrap(), vals);
        // each 16-bit dtype: (its bytes of v, v rounded to it and widened back)
        type Half = (Dtype, fn(f32) -> [u8; 2], fn(f32) -> f32);
        let halves: [Half; 2] = [
            (
                Dtype::BF16,
                |v| half::bf16::from_f32(v).to_le_bytes(),
                |v| half::bf16::from_f32(v).to_f32(),
            ),
            (
                Dtype::F16,
                |v| half::f16::from_f32(v).to_le_bytes(),
                |v| half::f16::from_f32(v).to_f32(),
            ),
        ];
        for (dtype, bytes, rounded) in halves {
            let data: Vec<u8> = vals.iter().flat_map(|&v| bytes(v)).collect();
            let t = TensorData::new(dtype, vec![vals.len()], data).unwrap();
            let want: Vec<f32> = vals.iter().map(|&v| rounded(v)).collect();
            assert_eq!(t.to_f32().unwrap(), want, "{dtype:?}");
        }
        let u8t = TensorData::new(Dtype::U8, vec![2], vec![1, 2]).unwrap();
        assert!(u8t.to_f32().is_none());
    }

    #[test]
    fn truncated_padded_or_garbled_files_are_named_and_explained() {
        let dir = tempfile::tempdir().unwrap();
        let (p, bytes) = sample(dir.path());
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("short", bytes[..5].to_vec(), "header length"),
            ("in-header", bytes[..8 + n / 2].to_vec(), "header"),
            ("in-data", bytes[..bytes.len() - 3].to_vec(), "tensor data"),
            (
                "padded",
                [bytes.clone(), vec![0; 4]].concat(),
                "tensor data",
            ),
            (
                "huge-header",
                {
                    let mut b = bytes.clone();
                    b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
                    b
                },
                "header",
            ),
            (
                "garbled",
                {
                    let mut b = bytes.clone();
                    b[8] = b'#';
                    b
                },
                "does not parse",
            ),
        ];
        for (name, data, why) in cases {
            std::fs::write(&p, &data).unwrap();
            let e = read_safetensors_file(&p).unwrap_err().to_string();
            assert!(
                e.contains("m.safetensors")
                    && e.contains("not a valid safetensors file")
                    && e.contains(why),
                "{name}: {e}"
            );
        }
    }
}
