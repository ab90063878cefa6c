//! Files in and out: atomic file writes (a temporary file in the target directory, fsync,
//! rename), whole-directory writes for models ([`write_dir_atomic`]), one writer per output
//! ([`PathLock`]), and reads that only touch regular files of bounded size inside the directory
//! that names them ([`read_regular`], [`confined`]).

mod dirwrite;
mod lock;
mod read;

pub use dirwrite::{
    check_model_out, check_not_input, check_out, check_output_file, is_model_file,
    recover_interrupted, write_dir_atomic, write_dir_atomic_as, DirKind, DATASET_DIR, MODEL_DIR,
};
pub use lock::PathLock;
pub use read::{confined, open_regular, read_regular, read_text, PinnedDir, MAX_JSON_BYTES};

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::Path;

use crate::error::{Context, Result};

/// Writes `path` atomically: readers see either the old file or the complete new one.
///
/// `fill` streams the content into a buffered writer; on any error the temporary file is removed.
pub fn write_atomic(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?;
    // Replacing a device, a FIFO or a directory by a regular file would destroy it (as root,
    // `--json /dev/null` would turn /dev/null into a file).
    if let Ok(m) = std::fs::metadata(path) {
        crate::ensure!(
            m.is_file(),
            "{} exists and is not a regular file: write to another path",
            path.display()
        );
    }
    check_output_syntax(path)?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result: std::io::Result<()> = (|| {
        let mut w = BufWriter::new(File::create(&tmp)?);
        fill(&mut w)?;
        w.flush()?;
        w.get_ref().sync_all()?;
        fs::rename(&tmp, path)?;
        // Persist the rename itself; not every platform can open a directory, so best effort.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

/// An output path must name its file or directory plainly: one ending in `/`, `/.` or `/..`
/// resolves to another name than the one a sibling temporary file is made from.
pub fn check_output_syntax(path: &Path) -> Result<()> {
    let s = path.as_os_str().to_string_lossy();
    let last = path.components().next_back();
    crate::ensure!(
        !s.ends_with('/')
            && !matches!(
                last,
                Some(std::path::Component::CurDir | std::path::Component::ParentDir) | None
            )
            && !s.ends_with("/.")
            && s != ".",
        "output {} must name a file or directory without a trailing '/', '.' or '..'",
        path.display()
    );
    Ok(())
}

/// Write `bytes` to `path` atomically.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |w| w.write_all(bytes))
}
