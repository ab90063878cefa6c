//! One writer per output: an exclusive, non-blocking lock on a path (a model directory, a training
//! run, an expert artifact), so that two processes writing the same `--out` cannot interleave; the
//! second one gets a one-line error instead. The lock is a hidden sibling file `.<name>.lock`
//! held with `flock`, so it is released by the kernel when its process ends, however it ends.
//! Within one process the lock is re-entrant (a training run and its final model may share a
//! directory).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use crate::error::{Error, Result};

/// Locks held by this process: lock file -> (holders, the open file carrying the lock).
fn held() -> &'static Mutex<HashMap<PathBuf, (usize, File)>> {
    static HELD: OnceLock<Mutex<HashMap<PathBuf, (usize, File)>>> = OnceLock::new();
    HELD.get_or_init(Default::default)
}

/// An exclusive lock on one output path, released on drop.
#[must_use = "the lock is released when this value is dropped"]
pub struct PathLock {
    key: PathBuf,
}

impl PathLock {
    /// Lock `target` for writing (its parent directory is created if missing).
    pub fn acquire(target: &Path) -> Result<PathLock> {
        let name = target
            .file_name()
            .ok_or_else(|| {
                Error(format!(
                    "{} does not name a file or directory",
                    target.display()
                ))
            })?
            .to_string_lossy()
            .to_string();
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent)
            .map_err(|e| Error(format!("creating {}: {e}", parent.display())))?;
        let parent = parent
            .canonicalize()
            .map_err(|e| Error(format!("resolving {}: {e}", parent.display())))?;
        let key = parent.join(format!(".{name}.lock"));
        let mut map = held().lock().unwrap_or_else(|p| p.into_inner());
        if let Some((n, _)) = map.get_mut(&key) {
            *n += 1;
            return Ok(PathLock { key });
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&key)
            .map_err(|e| Error(format!("cannot create the lock {}: {e}", key.display())))?;
        #[cfg(unix)]
        {
            use std::os::unix::io::AsRawFd;
            // SAFETY: flock on a file descriptor this function owns.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    return Err(Error(format!(
                        "{} is being written by another flexrun process (lock {})",
                        target.display(),
                        key.display()
                    )));
                }
                return Err(Error(format!("cannot lock {}: {e}", key.display())));
            }
        }
        map.insert(key.clone(), (1, file));
        Ok(PathLock { key })
    }
}

impl Drop for PathLock {
    fn drop(&mut self) {
        let mut map = held().lock().unwrap_or_else(|p| p.into_inner());
        if let Some((n, _)) = map.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                // Closing the file releases the flock.
                map.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reentrant_in_process_exclusive_across_processes() {
        let d = std::env::temp_dir().join(format!("flexrun-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let out = d.join("out");
        let a = PathLock::acquire(&out).unwrap();
        let b = PathLock::acquire(&out).unwrap();
        drop(a);
        // Another open file description of the same lock file (as another process has) fails
        // while `b` holds it, and succeeds once it is released.
        let lockfile = d.canonicalize().unwrap().join(".out.lock");
        let try_other = || {
            use std::os::unix::io::AsRawFd;
            let f = File::open(&lockfile).unwrap();
            // SAFETY: flock on a descriptor owned here.
            unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
        };
        assert!(!try_other());
        drop(b);
        assert!(try_other());
    }
}
