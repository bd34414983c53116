//! The agent's data roots (`--data-root DIR`, repeatable): when any are configured, every path a
//! job names on this host (model, dataset, checkpoint, output directory, an exec job's working
//! directory) must lie under one of them, so a submitter cannot make a job read or write
//! elsewhere. Bundled names (`tiny`, `whoami`) are not paths.

use kiln_proto::v1::{job_spec::Spec, JobSpec};
use std::path::{Path, PathBuf};

/// The host paths a job spec names, with the field each came from.
pub fn job_paths(spec: &JobSpec) -> Vec<(&'static str, &str)> {
    let mut out = Vec::new();
    match &spec.spec {
        Some(Spec::Generate(g)) if g.model != "tiny" => out.push(("model", g.model.as_str())),
        Some(Spec::Train(t)) => {
            if t.model != "tiny" {
                out.push(("model", t.model.as_str()));
            }
            if t.dataset != "whoami" {
                out.push(("dataset", t.dataset.as_str()));
            }
            out.push(("out", t.out_dir.as_str()));
        }
        Some(Spec::Export(e)) => {
            out.push(("checkpoint", e.checkpoint.as_str()));
            out.push(("out", e.out_dir.as_str()));
        }
        Some(Spec::Exec(e)) if !e.workdir.is_empty() => out.push(("workdir", e.workdir.as_str())),
        _ => {}
    }
    out
}

/// The path as it would be reached: absolute, with every existing prefix's symlinks resolved
/// (the rest, not yet created, appended as written).
fn resolved(path: &Path) -> Option<PathBuf> {
    if !path.is_absolute() {
        return None;
    }
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    loop {
        if let Ok(c) = std::fs::canonicalize(&existing) {
            let mut p = c;
            for part in rest.iter().rev() {
                p.push(part);
            }
            return Some(p);
        }
        let name = existing.file_name()?.to_os_string();
        rest.push(name);
        if !existing.pop() {
            return None;
        }
    }
}

/// `Err` naming the first path of `spec` outside every root (roots are canonical); `Ok` when
/// no roots are configured.
pub fn check(spec: &JobSpec, roots: &[PathBuf]) -> Result<(), String> {
    if roots.is_empty() {
        return Ok(());
    }
    for (field, p) in job_paths(spec) {
        let inside =
            resolved(Path::new(p)).is_some_and(|r| roots.iter().any(|root| r.starts_with(root)));
        if !inside {
            return Err(format!(
                "{field} path {p:?} is outside this agent's data roots {roots:?} (paths must be absolute and under a --data-root)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::v1::ExportSpec;

    #[test]
    fn paths_must_lie_under_a_root() {
        let root = tempfile::tempdir().unwrap();
        let roots = vec![std::fs::canonicalize(root.path()).unwrap()];
        let export = |checkpoint: &str, out: &str| JobSpec {
            spec: Some(Spec::Export(ExportSpec {
                checkpoint: checkpoint.into(),
                out_dir: out.into(),
                format: "safetensors".into(),
            })),
        };
        let inside = root.path().join("ckpt");
        let out = root.path().join("new/out");
        assert!(check(
            &export(inside.to_str().unwrap(), out.to_str().unwrap()),
            &roots
        )
        .is_ok());
        let err = check(&export("/etc", out.to_str().unwrap()), &roots).unwrap_err();
        assert!(err.contains("checkpoint path \"/etc\""), "{err}");
        assert!(check(&export("relative/ckpt", out.to_str().unwrap()), &roots).is_err());
        // A symlink inside a root that points outside is outside.
        std::os::unix::fs::symlink("/etc", root.path().join("escape")).unwrap();
        let escape = root.path().join("escape/passwd");
        assert!(check(
            &export(escape.to_str().unwrap(), out.to_str().unwrap()),
            &roots
        )
        .is_err());
        assert!(
            check(&export("/etc", "/tmp"), &[]).is_ok(),
            "no roots: no restriction"
        );
    }
}
