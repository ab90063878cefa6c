//! Reading files a user or a checkpoint names, safely: only regular files are opened (a FIFO, a
//! device such as `/dev/zero`, a socket or a directory is refused before anything blocks on it or
//! reads it), their size is checked against a limit before it is read, and a file a checkpoint
//! names must be a plain file name inside the checkpoint's directory ([`confined`]).

use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// The largest JSON file flexrun reads (config.json, an index, a manifest, a tokenizer, a
/// dataset's meta): real ones are kilobytes to a few megabytes (a 200k-token tokenizer.json is
/// about 10 MB).
pub const MAX_JSON_BYTES: u64 = 256 << 20;

/// Opens `path` for reading if it is a regular file (symbolic links are followed), and returns
/// it with its size. `what` names the file in errors ("config", "shard", ...).
///
/// The file is opened without blocking, so a FIFO with no writer is refused instead of hanging;
/// the type is then checked on the open file itself, so it cannot change between check and read.
pub fn open_regular(path: &Path, what: &str) -> Result<(File, u64)> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NONBLOCK);
    }
    let file = opts.open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error(format!("{what} {} does not exist", path.display())),
        _ => Error(format!("cannot open {what} {}: {e}", path.display())),
    })?;
    let meta = file
        .metadata()
        .map_err(|e| Error(format!("cannot read {what} {}: {e}", path.display())))?;
    if !meta.is_file() {
        let kind = if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file (a FIFO, device or socket)"
        };
        return Err(Error(format!("{what} {} is {kind}", path.display())));
    }
    Ok((file, meta.len()))
}

/// The bytes of the regular file `path`, refused (before reading) when larger than `max`.
pub fn read_regular(path: &Path, what: &str, max: u64) -> Result<Vec<u8>> {
    let (file, len) = open_regular(path, what)?;
    check_len(path, what, len, max)?;
    let mut bytes = Vec::with_capacity(len as usize);
    // `take` bounds the read even if the file grows while it is read.
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error(format!("cannot read {what} {}: {e}", path.display())))?;
    check_len(path, what, bytes.len() as u64, max)?;
    Ok(bytes)
}

/// The UTF-8 text of the regular file `path`, at most `max` bytes.
pub fn read_text(path: &Path, what: &str, max: u64) -> Result<String> {
    String::from_utf8(read_regular(path, what, max)?)
        .map_err(|_| Error(format!("{what} {} is not UTF-8 text", path.display())))
}

fn check_len(path: &Path, what: &str, len: u64, max: u64) -> Result<()> {
    crate::ensure!(
        len <= max,
        "{what} {} is {} bytes, more than the {} a {what} can be",
        path.display(),
        len,
        max
    );
    Ok(())
}

/// `dir/name` for a file that a checkpoint in `dir` names (a weight shard in an index, say),
/// refused unless `name` is a plain file name (no directory part, not `..`, not absolute) and the
/// file, followed through symbolic links, stays inside `dir`. The one exception is the Hugging
/// Face cache layout, where `snapshots/<revision>/<file>` is a link into the sibling `blobs/`.
///
/// Names are checked before anything is looked up, so a hostile name learns nothing about the
/// files outside the directory. `what` names the file in errors.
pub fn confined(dir: &Path, name: &str, what: &str) -> Result<PathBuf> {
    let mut parts = Path::new(name).components();
    let plain = matches!(
        (parts.next(), parts.next()),
        (Some(Component::Normal(_)), None)
    ) && !name.contains(['/', '\\', '\0'])
        && !name.is_empty();
    crate::ensure!(
        plain,
        "{what} name {name:?} is not a plain file name inside {}",
        dir.display()
    );
    let path = dir.join(name);
    let link = match std::fs::symlink_metadata(&path) {
        Ok(m) => m.file_type().is_symlink(),
        Err(_) => return Ok(path), // missing: the caller's open reports it
    };
    if link {
        let inside = match (path.canonicalize(), dir.canonicalize()) {
            (Ok(target), Ok(root)) => target.starts_with(&root) || in_hf_blobs(&root, &target),
            _ => false,
        };
        crate::ensure!(
            inside,
            "{what} {} is a symbolic link that leaves the model directory",
            path.display()
        );
    }
    Ok(path)
}

/// `target` is a blob of the Hugging Face cache whose snapshot directory is `root`
/// (`<repo>/snapshots/<revision>` links its files to `<repo>/blobs/<hash>`).
fn in_hf_blobs(root: &Path, target: &Path) -> bool {
    let snapshots = root.parent();
    let is_snapshot = snapshots
        .and_then(|s| s.file_name())
        .is_some_and(|n| n == "snapshots");
    match (is_snapshot, snapshots.and_then(Path::parent)) {
        (true, Some(repo)) => target.parent() == Some(&repo.join("blobs")),
        _ => false,
    }
}

/// A directory held open while its files are read, so that a concurrent whole-directory write
/// (which swaps a new directory in) cannot make a reader mix the old directory's files with the
/// new one's: on Linux every file is read through `/proc/self/fd/N`, the directory opened first.
pub struct PinnedDir {
    _dir: std::fs::File,
    path: PathBuf,
    shown: PathBuf,
}

impl PinnedDir {
    pub fn open(dir: &Path) -> Result<PinnedDir> {
        let file = std::fs::File::open(dir)
            .map_err(|e| Error(format!("cannot open the directory {}: {e}", dir.display())))?;
        #[cfg(target_os = "linux")]
        let path = {
            use std::os::unix::io::AsRawFd;
            let p = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
            if p.is_dir() {
                p
            } else {
                dir.to_path_buf()
            }
        };
        #[cfg(not(target_os = "linux"))]
        let path = dir.to_path_buf();
        Ok(PinnedDir {
            _dir: file,
            path,
            shown: dir.to_path_buf(),
        })
    }

    /// The path to read the directory's files through.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `e` with the pinned path shown as the directory's own name.
    pub fn explain(&self, e: Error) -> Error {
        let pinned = self.path.display().to_string();
        Error(e.0.replace(&pinned, &self.shown.display().to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("flexrun-read-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn names_that_leave_the_directory_are_refused() {
        let d = tmp("names");
        std::fs::write(d.join("a.safetensors"), b"x").unwrap();
        assert!(confined(&d, "a.safetensors", "shard").is_ok());
        for bad in [
            "../a.safetensors",
            "/etc/passwd",
            "sub/a.safetensors",
            "..",
            ".",
            "",
            "a\0b",
            "..\\x",
        ] {
            let e = confined(&d, bad, "shard").unwrap_err().0;
            assert!(e.contains("not a plain file name"), "{bad:?}: {e}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn links_stay_inside_or_follow_the_hf_cache_layout() {
        let d = tmp("links");
        let outside = d.join("secret.safetensors");
        std::fs::write(&outside, b"x").unwrap();
        let model = d.join("model");
        std::fs::create_dir_all(&model).unwrap();
        std::os::unix::fs::symlink(&outside, model.join("evil.safetensors")).unwrap();
        std::fs::write(model.join("real.safetensors"), b"y").unwrap();
        std::os::unix::fs::symlink("real.safetensors", model.join("ok.safetensors")).unwrap();
        assert!(confined(&model, "ok.safetensors", "shard").is_ok());
        let e = confined(&model, "evil.safetensors", "shard").unwrap_err().0;
        assert!(e.contains("leaves the model directory"), "{e}");
        // <repo>/snapshots/<rev>/model.safetensors -> ../../blobs/<hash>
        let repo = d.join("models--x");
        let snap = repo.join("snapshots").join("abc");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        std::fs::write(repo.join("blobs").join("f00"), b"z").unwrap();
        std::os::unix::fs::symlink("../../blobs/f00", snap.join("model.safetensors")).unwrap();
        assert!(confined(&snap, "model.safetensors", "shard").is_ok());
    }

    #[cfg(unix)]
    #[test]
    fn fifos_devices_and_directories_are_not_read() {
        let d = tmp("kinds");
        let fifo = d.join("config.json");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_regular(&fifo, "config", 10).unwrap_err().0;
        assert!(e.contains("not a regular file"), "{e}");
        let e = read_regular(Path::new("/dev/zero"), "expert", 10)
            .unwrap_err()
            .0;
        assert!(e.contains("not a regular file"), "{e}");
        let e = read_regular(&d, "config", 10).unwrap_err().0;
        assert!(e.contains("is a directory"), "{e}");
        std::fs::write(d.join("big"), vec![b'x'; 11]).unwrap();
        let e = read_regular(&d.join("big"), "config", 10).unwrap_err().0;
        assert!(e.contains("11 bytes"), "{e}");
        assert_eq!(
            read_regular(&d.join("big"), "config", 11).unwrap().len(),
            11
        );
    }
}
