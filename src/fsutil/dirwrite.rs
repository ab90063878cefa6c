//! Whole-directory writes for model outputs: a model directory (config.json, weights, manifest,
//! tokenizer) is written into a hidden sibling, synced, and swapped in with one atomic exchange of
//! the two directories, under a [`PathLock`]. A reader, a concurrent writer or a crash therefore
//! sees the old model or the new one, never one's weights beside the other's manifest; and the
//! model files of the old directory (a stale `flexolmo.json`, a stale shard) never survive into
//! the new one. What else the directory holds (a training run's log and checkpoint, plots) is
//! kept: it is moved into the new directory after the swap.

use std::fs;
use std::path::{Path, PathBuf};

use super::PathLock;
use crate::error::{Context, Error, Result};

/// Whether `name`, an entry of a model directory, is part of the model (replaced as a whole by
/// the next write) rather than something kept beside it. Hidden temporary files of interrupted
/// writes count as model files, so that they are cleaned up too.
pub fn is_model_file(name: &str) -> bool {
    matches!(
        name,
        "config.json"
            | "flexolmo.json"
            | "generation_config.json"
            | "tokenizer.json"
            | "tokenizer_config.json"
            | "special_tokens_map.json"
    ) || name.ends_with(".safetensors")
        || name.ends_with(".safetensors.index.json")
        || (name.starts_with('.') && name.contains(".tmp"))
}

/// What kind of directory is written as a whole: the entries that say a directory is one (so it
/// may be replaced), and which of its entries belong to it (replaced by the next write; the rest
/// is kept).
pub struct DirKind {
    pub what: &'static str,
    pub markers: &'static [&'static str],
    pub owns: fn(&str) -> bool,
}

/// A model directory (a training run may share it).
pub const MODEL_DIR: DirKind = DirKind {
    what: "a flexrun model or run",
    markers: &["config.json", "train_log.jsonl", "checkpoint", "run"],
    owns: is_model_file,
};

/// A prepared dataset (`data prepare`).
pub const DATASET_DIR: DirKind = DirKind {
    what: "a prepared dataset",
    markers: &["meta.json"],
    owns: |n| {
        matches!(
            n,
            "meta.json" | "train.bin" | "valid.bin" | "tokenizer.json"
        ) || (n.starts_with('.') && n.contains(".tmp"))
    },
};

/// Refuse an output `out` (named by `flag`) that is one of `inputs`, or lies inside one of them:
/// writing it would destroy or change what the command reads.
pub fn check_not_input(out: &Path, flag: &str, inputs: &[&Path]) -> Result<()> {
    let real = |p: &Path| -> Option<PathBuf> {
        // A path that does not exist yet is resolved through its parent.
        p.canonicalize().ok().or_else(|| {
            let parent = p.parent().filter(|d| !d.as_os_str().is_empty())?;
            Some(parent.canonicalize().ok()?.join(p.file_name()?))
        })
    };
    let Some(o) = real(out) else { return Ok(()) };
    for input in inputs {
        if let Some(i) = real(input) {
            crate::ensure!(
                o != i && !o.starts_with(&i) && !i.starts_with(&o),
                "{flag} {} would overwrite an input ({}): write to another path",
                out.display(),
                input.display()
            );
        }
    }
    Ok(())
}

/// A single-file output (a JSON report, a plot, a tokenizer) named by `flag`: not a directory, not
/// a file of a model or dataset directory, and not one of `inputs`.
pub fn check_output_file(out: &Path, flag: &str, inputs: &[&Path]) -> Result<()> {
    super::check_output_syntax(out)?;
    crate::ensure!(
        !out.is_dir(),
        "{flag} {} is a directory; it must name a file",
        out.display()
    );
    if let Ok(m) = fs::metadata(out) {
        crate::ensure!(
            m.is_file(),
            "{flag} {} exists and is not a regular file: write to another path",
            out.display()
        );
    }
    // Weights (an expert artifact, a shard) are never replaced by a report or a tokenizer.
    crate::ensure!(
        !(out.exists() && out.to_string_lossy().ends_with(".safetensors")),
        "{flag} {} would overwrite a weights file: write to another path",
        out.display()
    );
    if let (Some(dir), Some(name)) = (out.parent(), out.file_name()) {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let name = name.to_string_lossy();
        // Nothing in a model, run, checkpoint or dataset directory is replaced by a report.
        let kept = [
            "trainer_state.json",
            "optimizer.safetensors",
            "train_log.jsonl",
        ];
        let marked = MODEL_DIR
            .markers
            .iter()
            .chain(DATASET_DIR.markers)
            .chain(&kept)
            .any(|m| dir.join(m).exists());
        crate::ensure!(
            !(marked && out.exists()),
            "{flag} {} would overwrite a file of the model, run or dataset in {}: write to another path",
            out.display(),
            dir.display()
        );
        for kind in [&MODEL_DIR, &DATASET_DIR] {
            let marked = kind.markers.iter().any(|m| dir.join(m).exists());
            crate::ensure!(
                !(marked && (kind.owns)(&name)),
                "{flag} {} would overwrite a file of {} in {}: write to another path",
                out.display(),
                kind.what,
                dir.display()
            );
        }
    }
    check_not_input(out, flag, inputs)
}

/// Refuse to write a model into `out` when it is something else: a file, or a directory that
/// holds files but neither a model nor a training run (writing there would bury them).
pub fn check_model_out(out: &Path) -> Result<()> {
    check_out(out, &MODEL_DIR)
}

/// Refuse to write a directory of `kind` over `out` when `out` is something else.
pub fn check_out(out: &Path, kind: &DirKind) -> Result<()> {
    super::check_output_syntax(out)?;
    let meta = match fs::symlink_metadata(out) {
        Ok(m) => m,
        Err(_) => return Ok(()),
    };
    ensure_dir(out, &meta)?;
    let names = entry_names(out)?;
    let ours = names.is_empty() || names.iter().any(|n| kind.markers.contains(&n.as_str()));
    crate::ensure!(
        ours,
        "{} already holds files that are not {}; give a new or empty directory",
        out.display(),
        kind.what
    );
    Ok(())
}

fn ensure_dir(out: &Path, meta: &fs::Metadata) -> Result<()> {
    crate::ensure!(
        meta.is_dir() && !meta.file_type().is_symlink(),
        "{} exists and is not a directory",
        out.display()
    );
    Ok(())
}

fn entry_names(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for e in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e.with_context(|| format!("listing {}", dir.display()))?;
        names.push(e.file_name().to_string_lossy().to_string());
    }
    names.sort();
    Ok(names)
}

fn sibling(out: &Path, suffix: &str) -> Result<PathBuf> {
    let name = out
        .file_name()
        .with_context(|| format!("{} does not name a directory", out.display()))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Ok(parent.join(format!(".{}.{suffix}", name.to_string_lossy())))
}

/// Move the entries of `from` that `kind` does not own into `to` (those `to` does not have).
fn carry_over(from: &Path, to: &Path, kind: &DirKind) -> Result<()> {
    for name in entry_names(from)? {
        if (kind.owns)(&name) || to.join(&name).exists() {
            continue;
        }
        fs::rename(from.join(&name), to.join(&name))
            .with_context(|| format!("moving {name} into {}", to.display()))?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Atomically exchange two directories (Linux `renameat2(RENAME_EXCHANGE)`); `Ok(false)` where
/// the platform or file system cannot.
fn exchange(a: &Path, b: &Path) -> Result<bool> {
    #[cfg(target_os = "linux")]
    {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let ca = CString::new(a.as_os_str().as_bytes()).context("path with a NUL byte")?;
        let cb = CString::new(b.as_os_str().as_bytes()).context("path with a NUL byte")?;
        // SAFETY: two valid NUL-terminated paths relative to the working directory.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                ca.as_ptr(),
                libc::AT_FDCWD,
                cb.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        if rc == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => Ok(false),
            _ => Err(Error(format!("replacing {}: {e}", b.display()))),
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (a, b);
        Ok(false)
    }
}

/// Finish or undo what an interrupted write of `out` left behind: a filled or swapped-out
/// temporary directory, or (on file systems without an atomic exchange) the old directory moved
/// aside before the new one was renamed in.
fn recover(out: &Path, tmp: &Path, old: &Path, kind: &DirKind) -> Result<()> {
    if old.exists() {
        if out.exists() {
            carry_over(old, out, kind)?;
            fs::remove_dir_all(old).with_context(|| format!("removing {}", old.display()))?;
        } else {
            fs::rename(old, out).with_context(|| format!("restoring {}", out.display()))?;
        }
    }
    if tmp.exists() {
        if out.exists() {
            carry_over(tmp, out, kind)?;
        }
        fs::remove_dir_all(tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    Ok(())
}

/// Finish or undo an interrupted [`write_dir_atomic`] of `out` (under its lock): afterwards `out`
/// is the old directory or the new one, with what was kept beside the model moved back into it.
pub fn recover_interrupted(out: &Path) -> Result<()> {
    let _lock = PathLock::acquire(out)?;
    recover(
        out,
        &sibling(out, "tmp")?,
        &sibling(out, "old")?,
        &MODEL_DIR,
    )
}

/// Write the directory `out` as a whole: `fill` writes the new content into an empty temporary
/// directory, which then replaces `out` in one atomic step (see the module documentation).
pub fn write_dir_atomic(out: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    write_dir_atomic_as(out, &MODEL_DIR, fill)
}

/// [`write_dir_atomic`] for a directory of `kind`.
pub fn write_dir_atomic_as(
    out: &Path,
    kind: &DirKind,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let _lock = PathLock::acquire(out)?;
    check_out(out, kind)?;
    let tmp = sibling(out, "tmp")?;
    let old = sibling(out, "old")?;
    recover(out, &tmp, &old, kind)?;
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    if let Err(e) = fill(&tmp) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    sync_dir(&tmp);
    install(out, &tmp, &old, kind)
}

/// Swap the filled `tmp` in as `out` (see [`write_dir_atomic_as`]).
fn install(out: &Path, tmp: &Path, old: &Path, kind: &DirKind) -> Result<()> {
    // Until the swap succeeds, `tmp` holds only the new content: a failure drops it, and `out`
    // is as it was.
    let swapped = if !out.exists() {
        fs::rename(tmp, out).with_context(|| format!("installing {}", out.display()))
    } else {
        match exchange(tmp, out) {
            Ok(true) => Ok(()),
            Ok(false) => fs::rename(out, old)
                .with_context(|| format!("moving {} aside", out.display()))
                .and_then(|_| {
                    fs::rename(tmp, out).with_context(|| format!("installing {}", out.display()))
                }),
            Err(e) => Err(e),
        }
    };
    if let Err(e) = swapped {
        let _ = fs::remove_dir_all(tmp);
        if old.exists() && !out.exists() {
            let _ = fs::rename(old, out);
        }
        return Err(e);
    }
    // `tmp` (exchanged) or `old` (moved aside) now holds the old directory: keep what is not
    // the model, drop the rest.
    for prev in [tmp, old] {
        if prev.exists() {
            carry_over(prev, out, kind)?;
            fs::remove_dir_all(prev).with_context(|| format!("removing {}", prev.display()))?;
        }
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("flexrun-dirw-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn replaces_model_files_and_keeps_the_run() {
        let d = tmp("replace");
        let out = d.join("m");
        write_dir_atomic(&out, |t| {
            fs::write(t.join("config.json"), "a")?;
            fs::write(t.join("flexolmo.json"), "stale")?;
            fs::write(t.join(".config.json.tmp123"), "junk")?;
            Ok(())
        })
        .unwrap();
        fs::write(out.join("train_log.jsonl"), "log").unwrap();
        write_dir_atomic(&out, |t| Ok(fs::write(t.join("config.json"), "b")?)).unwrap();
        assert_eq!(
            entry_names(&out).unwrap(),
            ["config.json", "train_log.jsonl"]
        );
        assert_eq!(fs::read_to_string(out.join("config.json")).unwrap(), "b");
        assert!(!d.join(".m.tmp").exists() && !d.join(".m.old").exists());
        // A failing fill leaves the old directory as it was.
        let e = write_dir_atomic(&out, |t| {
            fs::write(t.join("config.json"), "c")?;
            Err(Error("boom".into()))
        });
        assert!(e.is_err());
        assert_eq!(fs::read_to_string(out.join("config.json")).unwrap(), "b");
    }

    #[test]
    fn interrupted_writes_are_finished_or_undone() {
        let d = tmp("recover");
        let out = d.join("m");
        // Old directory moved aside, new one never installed: the old one comes back.
        fs::create_dir_all(d.join(".m.old")).unwrap();
        fs::write(d.join(".m.old").join("config.json"), "old").unwrap();
        fs::create_dir_all(d.join(".m.tmp")).unwrap();
        fs::write(d.join(".m.tmp").join("config.json"), "half").unwrap();
        write_dir_atomic(&out, |t| {
            assert!(!t.join("config.json").exists(), "starts empty");
            Ok(fs::write(t.join("config.json"), "new")?)
        })
        .unwrap();
        assert_eq!(fs::read_to_string(out.join("config.json")).unwrap(), "new");
        assert_eq!(entry_names(&d).unwrap(), [".m.lock", "m"]);
    }

    #[test]
    fn foreign_directories_and_files_are_not_replaced() {
        let d = tmp("foreign");
        fs::write(d.join("notes.txt"), "mine").unwrap();
        let e = write_dir_atomic(&d, |_| Ok(())).unwrap_err().0;
        assert!(e.contains("not a flexrun model"), "{e}");
        let e = write_dir_atomic(&d.join("notes.txt"), |_| Ok(()))
            .unwrap_err()
            .0;
        assert!(e.contains("not a directory"), "{e}");
        assert_eq!(fs::read_to_string(d.join("notes.txt")).unwrap(), "mine");
    }
}
