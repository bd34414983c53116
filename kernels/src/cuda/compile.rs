//! Run-time compilation of the CUDA C kernels in `kernels/cuda/` with NVRTC, with the PTX
//! cached on disk keyed by a hash of (common header + source with its headers + target arch +
//! options). With the `bench` feature the GEMV files' benchmark-only kernels are compiled too
//! (`-DKILN_BENCH`).
//!
//! Cache directory: `$KILN_CACHE_DIR`, else `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`
//! (subfolder `ptx/`). A cache that cannot be written only costs a recompile next time.

use std::path::PathBuf;

use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions, Ptx};

use crate::KernelError;

/// One `.cu` file and the kernels it defines.
pub struct KernelSource {
    /// File name under `kernels/cuda/`.
    pub file: &'static str,
    /// Its text (embedded at build time).
    pub source: &'static str,
}

/// Device helpers prepended to every kernel file.
pub const COMMON: &str = include_str!("../../cuda/nvfp4_common.cuh");

/// Headers a kernel file may `#include "NAME"` (on a line of its own); [`full_source`] pastes
/// them in, so NVRTC gets one self-contained translation unit per file.
pub const HEADERS: &[(&str, &str)] = &[
    (
        "gemv_tensor_core.cuh",
        include_str!("../../cuda/gemv_tensor_core.cuh"),
    ),
    (
        "block_reduce.cuh",
        include_str!("../../cuda/block_reduce.cuh"),
    ),
    (
        "flash_attention.cuh",
        include_str!("../../cuda/flash_attention.cuh"),
    ),
    ("decode_ops.cuh", include_str!("../../cuda/decode_ops.cuh")),
    (
        "gemv_cuda_core.cuh",
        include_str!("../../cuda/gemv_cuda_core.cuh"),
    ),
    ("gemv_x.cuh", include_str!("../../cuda/gemv_x.cuh")),
];

/// Kernel files whose kernels the rest can do without: if one fails to compile or load, its
/// kernels report that when asked for and everything else loads — the fused decode GEMVs
/// (the separate kernels serve), the flash train attention (the materialized one serves) and
/// the persistent decode kernel (the captured step of separate kernels serves).
pub const OPTIONAL_SOURCES: &[&str] = &[
    "gemv_fused.cu",
    "attention_train.cu",
    "decode_persistent.cu",
];

/// Every kernel file, in load order.
pub const SOURCES: &[KernelSource] = &[
    KernelSource {
        file: "amax.cu",
        source: include_str!("../../cuda/amax.cu"),
    },
    KernelSource {
        file: "quantize_nvfp4.cu",
        source: include_str!("../../cuda/quantize_nvfp4.cu"),
    },
    KernelSource {
        file: "dequantize_nvfp4.cu",
        source: include_str!("../../cuda/dequantize_nvfp4.cu"),
    },
    KernelSource {
        file: "gemv_cuda_core.cu",
        source: include_str!("../../cuda/gemv_cuda_core.cu"),
    },
    KernelSource {
        file: "gemv_fused.cu",
        source: include_str!("../../cuda/gemv_fused.cu"),
    },
    KernelSource {
        file: "gemv_tensor_core_hilo.cu",
        source: include_str!("../../cuda/gemv_tensor_core_hilo.cu"),
    },
    KernelSource {
        file: "gemv_tensor_core.cu",
        source: include_str!("../../cuda/gemv_tensor_core.cu"),
    },
    KernelSource {
        file: "gemv_tensor_core_split_k.cu",
        source: include_str!("../../cuda/gemv_tensor_core_split_k.cu"),
    },
    KernelSource {
        file: "decode.cu",
        source: include_str!("../../cuda/decode.cu"),
    },
    KernelSource {
        file: "decode_persistent.cu",
        source: include_str!("../../cuda/decode_persistent.cu"),
    },
    KernelSource {
        file: "attention_prefill.cu",
        source: include_str!("../../cuda/attention_prefill.cu"),
    },
    KernelSource {
        file: "attention_train.cu",
        source: include_str!("../../cuda/attention_train.cu"),
    },
    KernelSource {
        file: "adamw_nvfp4.cu",
        source: include_str!("../../cuda/adamw_nvfp4.cu"),
    },
    KernelSource {
        file: "train.cu",
        source: include_str!("../../cuda/train.cu"),
    },
];

/// NVRTC options (besides the arch). Keep IEEE division/sqrt and no flush-to-zero: the
/// quantizer must match the CPU bit for bit.
const OPTIONS: &[&str] = &[
    "--std=c++17",
    "--ftz=false",
    "--prec-div=true",
    "--prec-sqrt=true",
];

/// [`OPTIONS`], and with the `bench` feature `-DKILN_BENCH`, which compiles the benchmark's
/// experiments and probes (the `#ifdef KILN_BENCH` sections of the GEMV files).
fn options() -> Vec<&'static str> {
    let mut o = OPTIONS.to_vec();
    if cfg!(feature = "bench") {
        o.push("-DKILN_BENCH");
    }
    o
}

/// The virtual architecture to compile for, from the device's compute capability.
pub fn arch_for(major: i32, minor: i32) -> &'static str {
    match (major, minor) {
        (9, 0) => "compute_90",
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 9) => "compute_89",
        (10, 0) => "compute_100",
        (12, 0) => "compute_120",
        (ma, mi) => Box::leak(format!("compute_{ma}{mi}").into_boxed_str()),
    }
}

/// Where compiled PTX is kept.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("KILN_CACHE_DIR") {
        return Some(PathBuf::from(d).join("ptx"));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("kiln").join("ptx"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("kiln").join("ptx"))
}

/// FNV-1a 64: stable across Rust versions (unlike `DefaultHasher`), fine for a cache key.
fn fnv1a64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The full translation unit NVRTC compiles for `src`: [`COMMON`], then the file with each
/// `#include "NAME"` of a [`HEADERS`] entry replaced by that header (`#line` directives keep
/// compiler messages pointing at the right file and line). Any other `#include` is left to
/// NVRTC, which fails on it.
pub fn full_source(src: &KernelSource) -> String {
    let mut out = format!("{COMMON}\n#line 1 \"{}\"\n", src.file);
    for (i, line) in src.source.lines().enumerate() {
        match included_header(line) {
            Some((name, text)) => {
                out.push_str(&format!("#line 1 \"{name}\"\n{text}\n"));
                out.push_str(&format!("#line {} \"{}\"\n", i + 2, src.file));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// The [`HEADERS`] entry a line `#include "NAME"` names, if it is one.
fn included_header(line: &str) -> Option<(&'static str, &'static str)> {
    let name = line
        .trim()
        .strip_prefix("#include")?
        .trim()
        .strip_prefix('"')?
        .strip_suffix('"')?;
    HEADERS.iter().find(|(h, _)| *h == name).copied()
}

/// Compile `src` for `arch`, or load the PTX from the disk cache. Returns the PTX and whether it
/// came from the cache.
pub fn compile_cached(src: &KernelSource, arch: &'static str) -> Result<(Ptx, bool), KernelError> {
    let full = full_source(src);
    let opts = options().join(" ");
    let key = fnv1a64(&[full.as_bytes(), arch.as_bytes(), opts.as_bytes()]);
    let stem = src.file.trim_end_matches(".cu");
    let path = cache_dir().map(|d| d.join(format!("{stem}-{arch}-{key:016x}.ptx")));
    if let Some(p) = &path {
        if let Ok(text) = std::fs::read_to_string(p) {
            if text.contains(".entry") {
                tracing::debug!(file = src.file, path = %p.display(), "PTX from cache");
                return Ok((Ptx::from_src(text), true));
            }
        }
    }
    let ptx = compile(src, &full, arch)?;
    if let Some(p) = &path {
        let text = ptx.to_src();
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(p.parent().expect("cache path has a parent"))?;
            let tmp = p.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&tmp, text.as_bytes())?;
            std::fs::rename(&tmp, p)
        };
        if let Err(e) = write() {
            tracing::warn!(path = %p.display(), error = %e, "could not cache compiled PTX");
        }
    }
    Ok((ptx, false))
}

/// Compile without the cache (used by the compile check and on a cache miss).
pub fn compile(src: &KernelSource, full: &str, arch: &'static str) -> Result<Ptx, KernelError> {
    let opts = CompileOptions {
        arch: Some(arch),
        options: options().iter().map(|s| s.to_string()).collect(),
        name: Some(src.file.to_string()),
        ..Default::default()
    };
    compile_ptx_with_opts(full, opts).map_err(|e| KernelError::Nvrtc {
        kernel: src.file,
        log: match e {
            CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
            other => format!("{other:?}"),
        },
    })
}

/// Whether the NVRTC library can be loaded (it can be present without a GPU driver).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library; never calls into it.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// The numeric arguments of every `NAME(a, b, ...)` instantiation line of a kernel file, in
/// order, each with whether it sits in the file's `#ifdef KILN_BENCH` section (the launchers'
/// tables of built kernels are checked against these).
#[cfg(test)]
pub(crate) fn macro_instances(src: &str, name: &str) -> Vec<(Vec<usize>, bool)> {
    let prefix = format!("{name}(");
    let mut bench = false;
    let mut out = Vec::new();
    for l in src.lines() {
        match l.trim() {
            "#ifdef KILN_BENCH" => bench = true,
            "#endif" => bench = false,
            _ => {}
        }
        if let Some(args) = l.strip_prefix(prefix.as_str()) {
            let args = args
                .trim_end_matches(')')
                .split(',')
                .map(|t| t.trim().parse().unwrap())
                .collect();
            out.push((args, bench));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compiles every kernel file with NVRTC when the library is present (no GPU needed), so a
    /// syntax error in a `.cu` file fails `cargo test` wherever NVRTC is installed.
    #[test]
    fn every_kernel_compiles_with_nvrtc() {
        if !nvrtc_present() {
            eprintln!("skipping: libnvrtc not found (set LD_LIBRARY_PATH to a CUDA 13 NVRTC to run this check)");
            return;
        }
        // KILN_PTX_DUMP=DIR keeps each file's PTX there (scripts/ptxas-check.sh reads
        // registers and spills from it without a GPU)
        let dump = std::env::var_os("KILN_PTX_DUMP").map(PathBuf::from);
        for src in SOURCES {
            let ptx =
                compile(src, &full_source(src), "compute_90").unwrap_or_else(|e| panic!("{e}"));
            assert!(
                ptx.to_src().contains(".entry"),
                "{} produced no kernels",
                src.file
            );
            if let Some(d) = &dump {
                std::fs::create_dir_all(d).unwrap();
                let name = src.file.replace(".cu", ".ptx");
                std::fs::write(d.join(name), ptx.to_src()).unwrap();
            }
        }
    }

    #[test]
    fn optional_sources_are_kernel_files() {
        for f in OPTIONAL_SOURCES {
            assert!(
                SOURCES.iter().any(|s| s.file == *f),
                "{f} is not in SOURCES"
            );
        }
    }

    /// Every `.cu` file in `kernels/cuda/` is compiled and loaded (a kernel file missing from
    /// `SOURCES` would only fail on a GPU).
    #[test]
    fn every_cu_file_is_listed() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda");
        for e in std::fs::read_dir(dir).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            if name.ends_with(".cu") {
                assert!(
                    SOURCES.iter().any(|s| s.file == name),
                    "{name} is not in SOURCES"
                );
            }
        }
    }

    /// Every `.cuh` file besides the common one is in `HEADERS`, and every `#include` line of a
    /// kernel file names one of them (an unknown one would only fail where NVRTC runs).
    #[test]
    fn every_header_is_listed_and_every_include_resolves() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda");
        for e in std::fs::read_dir(dir).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            if name.ends_with(".cuh") && name != "nvfp4_common.cuh" {
                assert!(
                    HEADERS.iter().any(|(h, _)| *h == name),
                    "{name} is not in HEADERS"
                );
            }
        }
        for src in SOURCES {
            for line in src
                .source
                .lines()
                .filter(|l| l.trim().starts_with("#include"))
            {
                assert!(
                    included_header(line).is_some(),
                    "{}: {line} names no header in HEADERS",
                    src.file
                );
            }
            let full = full_source(src);
            assert!(!full.lines().any(|l| l.trim().starts_with("#include")));
        }
    }

    #[test]
    fn an_include_is_replaced_by_the_header_with_line_markers() {
        let src = KernelSource {
            file: "t.cu",
            source: "a\n#include \"gemv_tensor_core.cuh\"\nb",
        };
        let full = full_source(&src);
        let tail = &full[COMMON.len()..];
        assert!(tail.starts_with("\n#line 1 \"t.cu\"\na\n#line 1 \"gemv_tensor_core.cuh\"\n"));
        assert!(tail.ends_with("\n#line 3 \"t.cu\"\nb\n"), "{tail}");
        assert!(tail.contains(HEADERS[0].1));
    }

    #[test]
    fn cache_key_depends_on_every_part() {
        let a = fnv1a64(&[b"abc", b"compute_90"]);
        assert_ne!(a, fnv1a64(&[b"abc", b"compute_80"]));
        assert_ne!(a, fnv1a64(&[b"abd", b"compute_90"]));
        assert_ne!(fnv1a64(&[b"ab", b"c"]), fnv1a64(&[b"a", b"bc"]));
    }
}
