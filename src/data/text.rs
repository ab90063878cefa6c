//! Text inputs: expanding files and directories, and reading documents from `.txt` and `.jsonl`.

use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Context, Result};

/// Where a file's documents go when a dataset is split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FileSplit {
    Train,
    Valid,
    /// Each document is assigned by a seeded hash of its text.
    ByHash,
}

/// One text file found among the inputs.
#[derive(Clone, Debug)]
pub(crate) struct InputFile {
    pub path: PathBuf,
    pub split: FileSplit,
}

/// Expands files and directories into the text files they hold, in a deterministic order.
///
/// Directories are walked recursively (sorted, hidden entries skipped) and only `.txt` and
/// `.jsonl` files are taken from them. A directory holding both a `train.*` and a `valid.*` file
/// is pre-split: those files keep their split and any other file in it is split by hash. A file
/// named explicitly must be `.txt` or `.jsonl`; its documents are split by hash.
pub(crate) fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<InputFile>> {
    let mut out: Vec<InputFile> = Vec::new();
    // Directories already walked (canonical paths): a symbolic link back up the tree is walked
    // once, not until the path grows too long.
    let mut visited = std::collections::HashSet::new();
    for input in inputs {
        let meta = fs::metadata(input)
            .with_context(|| format!("cannot read input {}", input.display()))?;
        if meta.is_dir() {
            walk_dir(input, &mut out, &mut visited)?;
        } else {
            crate::ensure!(
                is_text_file(input),
                "input {} is not a .txt or .jsonl file",
                input.display()
            );
            out.push(InputFile {
                path: input.clone(),
                split: FileSplit::ByHash,
            });
        }
    }
    // A file reached twice (named twice, or through a link) is read once.
    let mut seen = std::collections::HashSet::new();
    out.retain(|f| seen.insert(f.path.canonicalize().unwrap_or_else(|_| f.path.clone())));
    Ok(out)
}

fn walk_dir(
    dir: &Path,
    out: &mut Vec<InputFile>,
    visited: &mut std::collections::HashSet<PathBuf>,
) -> Result<()> {
    let real = dir
        .canonicalize()
        .with_context(|| format!("cannot list {}", dir.display()))?;
    if !visited.insert(real) {
        return Ok(());
    }
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("cannot list {}", dir.display()))?
            .path();
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if !hidden {
            entries.push(path);
        }
    }
    entries.sort();
    let files: Vec<&PathBuf> = entries
        .iter()
        .filter(|p| p.is_file() && is_text_file(p))
        .collect();
    let stem_is = |p: &Path, s: &str| p.file_stem().is_some_and(|x| x == s);
    let pre_split =
        files.iter().any(|p| stem_is(p, "train")) && files.iter().any(|p| stem_is(p, "valid"));
    for path in files {
        let split = if pre_split && stem_is(path, "train") {
            FileSplit::Train
        } else if pre_split && stem_is(path, "valid") {
            FileSplit::Valid
        } else {
            FileSplit::ByHash
        };
        out.push(InputFile {
            path: path.clone(),
            split,
        });
    }
    for sub in entries.iter().filter(|p| p.is_dir()) {
        walk_dir(sub, out, visited)?;
    }
    Ok(())
}

fn is_text_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("txt" | "jsonl")
    )
}

/// Reads the non-empty documents of one file.
///
/// `.jsonl`: one JSON object per line with a string field `"text"` (other fields are ignored,
/// blank lines skipped). `.txt`: documents separated by blank lines.
pub(crate) fn read_documents(path: &Path) -> Result<Vec<String>> {
    // Only a regular file, and only one that fits in memory with its documents (they are all
    // held in memory while a dataset is prepared).
    let (_, len) = crate::fsutil::open_regular(path, "input")?;
    crate::limits::check_memory(&format!("reading {}", path.display()), 3 * len as u128)?;
    let content = crate::fsutil::read_text(path, "input", u64::MAX - 1)?;
    if path.extension().is_some_and(|e| e == "jsonl") {
        #[derive(Deserialize)]
        struct Line {
            text: String,
        }
        let mut docs = Vec::new();
        for (i, line) in content.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let parsed: Line = serde_json::from_str(line).with_context(|| {
                format!(
                    "{}:{}: expected a JSON object with a string \"text\" field",
                    path.display(),
                    i + 1
                )
            })?;
            if !parsed.text.trim().is_empty() {
                docs.push(parsed.text);
            }
        }
        Ok(docs)
    } else {
        Ok(split_paragraphs(&content))
    }
}

/// Splits text into documents at blank lines (lines that are empty or only whitespace).
fn split_paragraphs(content: &str) -> Vec<String> {
    let mut docs = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    for line in content.lines().chain(std::iter::once("")) {
        if line.trim().is_empty() {
            if !current.is_empty() {
                docs.push(current.join("\n"));
                current.clear();
            }
        } else {
            current.push(line);
        }
    }
    docs
}
