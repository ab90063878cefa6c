//! Token shards: tokenized documents in one flat binary file, memory-mapped for training.
//!
//! A prepared dataset directory holds `train.bin`, `valid.bin` and `meta.json`. A shard file is
//! little-endian:
//!
//! | bytes      | field                                                        |
//! |------------|--------------------------------------------------------------|
//! | 8          | magic `FLEXTOK\0`                                            |
//! | 4          | format version ([`FORMAT_VERSION`])                          |
//! | 4          | token width in bytes: 2 (vocab <= 65536) or 4                |
//! | 8          | token count `T`                                              |
//! | 8          | document count `D`                                           |
//! | `T*width`  | the tokens; every document ends with the eos token           |
//! | 0-7        | zero padding to a multiple of 8 bytes                        |
//! | `D*8`      | document start offsets (u64, in tokens; 0 first, increasing) |

use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::text::{expand_inputs, read_documents, FileSplit};
use super::tokenizer::Tokenizer;
use crate::error::{Context, Result};
use crate::fsutil::{write_atomic, write_bytes_atomic};
use crate::hash::{fnv1a, mix};

/// First bytes of every shard file.
pub const MAGIC: &[u8; 8] = b"FLEXTOK\0";
/// Version of the shard layout and of `meta.json`.
pub const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 32;

/// The contents of `meta.json`: what [`prepare`] wrote and from what.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub format_version: u32,
    pub vocab_size: usize,
    pub eos_id: u32,
    /// Bytes per token in the shard files (2 or 4).
    pub token_bytes: u32,
    pub train_tokens: u64,
    pub valid_tokens: u64,
    pub train_docs: u64,
    pub valid_docs: u64,
    /// [`Tokenizer::content_hash`] of the tokenizer used.
    pub tokenizer_hash: String,
    /// The input files, in the order their documents were read.
    pub sources: Vec<String>,
    pub valid_fraction: f64,
    pub seed: u64,
    /// BPE-dropout of the training split ([`Tokenizer::split_merges`]; 0: none).
    #[serde(default)]
    pub bpe_dropout: f64,
}

/// Tokenizes `inputs` into `out_dir/{train.bin, valid.bin, meta.json, tokenizer.json}` (written as
/// one directory) and returns the meta.
///
/// Inputs are `.txt` files (documents separated by blank lines), `.jsonl` files (`{"text": ..}`
/// per line) or directories of them. A directory holding both `train.*` and `valid.*` keeps that
/// split; every other document goes to validation when a seeded hash of its text falls below
/// `valid_fraction` (so duplicates land together). If that leaves validation empty while
/// `valid_fraction > 0`, the document with the smallest hash moves there. Tokenization runs in
/// parallel over documents; the whole input is held in memory.
///
/// With `bpe_dropout > 0`, training documents (never validation ones) get BPE-dropout
/// ([`Tokenizer::split_merges`]), seeded by `seed` and each document's text.
pub fn prepare(
    inputs: &[PathBuf],
    tokenizer: &Tokenizer,
    out_dir: &Path,
    valid_fraction: f64,
    seed: u64,
    bpe_dropout: f64,
) -> Result<Meta> {
    crate::ensure!(
        (0.0..1.0).contains(&valid_fraction),
        "valid fraction must be in [0, 1), got {valid_fraction}"
    );
    crate::ensure!(
        (0.0..1.0).contains(&bpe_dropout),
        "BPE-dropout must be in [0, 1), got {bpe_dropout}"
    );
    crate::fsutil::check_out(out_dir, &crate::fsutil::DATASET_DIR)?;
    let input_paths: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
    crate::fsutil::check_not_input(out_dir, "--out", &input_paths)?;
    let files = expand_inputs(inputs)?;
    crate::ensure!(
        !files.is_empty(),
        "no .txt or .jsonl files among the inputs"
    );

    let mut docs: Vec<InputDoc> = Vec::new();
    for file in &files {
        for text in read_documents(&file.path)? {
            let (valid, score) = match file.split {
                FileSplit::Train => (false, f64::INFINITY),
                FileSplit::Valid => (true, f64::INFINITY),
                FileSplit::ByHash => {
                    let h = mix(&[seed, fnv1a(text.as_bytes())]);
                    let score = (h >> 11) as f64 / (1u64 << 53) as f64;
                    (score < valid_fraction, score)
                }
            };
            docs.push(InputDoc { text, valid, score });
        }
    }
    crate::ensure!(!docs.is_empty(), "the inputs hold no documents");
    if valid_fraction > 0.0 && docs.len() >= 2 && !docs.iter().any(|d| d.valid) {
        let lowest = docs
            .iter_mut()
            .filter(|d| d.score.is_finite())
            .min_by(|a, b| a.score.total_cmp(&b.score));
        if let Some(doc) = lowest {
            doc.valid = true;
        }
    }

    let eos = tokenizer.eos_id();
    let encoded: Vec<(Vec<u32>, bool)> = docs
        .par_iter()
        .map(|doc| {
            let mut ids = tokenizer.encode(&doc.text)?;
            if bpe_dropout > 0.0 && !doc.valid {
                let rng = &mut StdRng::seed_from_u64(mix(&[
                    seed,
                    fnv1a(b"bpe-dropout"),
                    fnv1a(doc.text.as_bytes()),
                ]));
                ids = tokenizer.split_merges(&ids, bpe_dropout, rng)?;
            }
            ids.push(eos);
            Ok((ids, doc.valid))
        })
        .collect::<Result<_>>()?;
    let (valid, train): (Vec<_>, Vec<_>) = encoded.into_iter().partition(|(_, v)| *v);
    let train: Vec<Vec<u32>> = train.into_iter().map(|(ids, _)| ids).collect();
    let valid: Vec<Vec<u32>> = valid.into_iter().map(|(ids, _)| ids).collect();

    let vocab_size = tokenizer.vocab_size();
    let count = |docs: &[Vec<u32>]| docs.iter().map(|d| d.len() as u64).sum::<u64>();
    let meta = Meta {
        format_version: FORMAT_VERSION,
        vocab_size,
        eos_id: eos,
        token_bytes: token_width(vocab_size) as u32,
        train_tokens: count(&train),
        valid_tokens: count(&valid),
        train_docs: train.len() as u64,
        valid_docs: valid.len() as u64,
        tokenizer_hash: tokenizer.content_hash().to_string(),
        sources: files.iter().map(|f| f.path.display().to_string()).collect(),
        valid_fraction,
        seed,
        bpe_dropout,
    };
    let json = serde_json::to_string_pretty(&meta)?;
    // The dataset is written as one directory (shards, meta and the tokenizer together), so a
    // kill or a concurrent `data prepare` leaves the old dataset or the new one.
    crate::fsutil::write_dir_atomic_as(out_dir, &crate::fsutil::DATASET_DIR, |tmp| {
        write_shard(&tmp.join("train.bin"), &train, vocab_size)?;
        write_shard(&tmp.join("valid.bin"), &valid, vocab_size)?;
        write_bytes_atomic(&tmp.join("tokenizer.json"), tokenizer.json_bytes())?;
        write_bytes_atomic(&tmp.join("meta.json"), json.as_bytes())
    })?;
    Ok(meta)
}

/// A document read for [`prepare`].
struct InputDoc {
    text: String,
    valid: bool,
    /// Seeded hash of the text in [0, 1); infinite when the file fixes the split.
    score: f64,
}

/// Bytes per token for a vocabulary.
fn token_width(vocab_size: usize) -> usize {
    if vocab_size <= 1 << 16 {
        2
    } else {
        4
    }
}

/// Writes `docs` (each non-empty, ids below `vocab_size`) as one shard file, atomically.
pub fn write_shard(path: &Path, docs: &[Vec<u32>], vocab_size: usize) -> Result<()> {
    let width = token_width(vocab_size);
    for (i, doc) in docs.iter().enumerate() {
        crate::ensure!(!doc.is_empty(), "document {i} is empty");
        if let Some(&bad) = doc.iter().find(|&&t| t as usize >= vocab_size) {
            crate::bail!("document {i} has token id {bad}, outside vocab size {vocab_size}");
        }
    }
    let n_tokens: usize = docs.iter().map(Vec::len).sum();
    write_atomic(path, |w| {
        w.write_all(MAGIC)?;
        w.write_all(&FORMAT_VERSION.to_le_bytes())?;
        w.write_all(&(width as u32).to_le_bytes())?;
        w.write_all(&(n_tokens as u64).to_le_bytes())?;
        w.write_all(&(docs.len() as u64).to_le_bytes())?;
        for &t in docs.iter().flatten() {
            match width {
                2 => w.write_all(&(t as u16).to_le_bytes())?,
                _ => w.write_all(&t.to_le_bytes())?,
            }
        }
        w.write_all(&vec![0u8; padding(n_tokens * width)])?;
        let mut start = 0u64;
        for doc in docs {
            w.write_all(&start.to_le_bytes())?;
            start += doc.len() as u64;
        }
        Ok(())
    })
}

/// Zero bytes after `len` token bytes so the offsets start 8-byte aligned.
fn padding(len: usize) -> usize {
    (8 - len % 8) % 8
}

/// A memory-mapped shard file; token ids are returned as `u32` whatever the width on disk.
pub struct TokenShard {
    map: Mmap,
    path: PathBuf,
    width: usize,
    n_tokens: usize,
    n_docs: usize,
    /// Byte offset of the document start offsets.
    docs_at: usize,
}

impl TokenShard {
    /// Maps and validates a shard: magic, version, width, that the file length matches the
    /// header, and that the document offsets are well formed.
    pub fn open(path: &Path) -> Result<Self> {
        let (file, _) = crate::fsutil::open_regular(path, "token shard")?;
        // SAFETY: the map is read-only. Shards are written atomically (rename) and never modified
        // in place, so the mapped bytes do not change underneath us in normal use.
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot map token shard {}", path.display()))?;
        let bad = |why: String| crate::error::Error(format!("{}: {why}", path.display()));
        if map.len() < HEADER_LEN || &map[..8] != MAGIC {
            return Err(bad(
                "not a flexrun token shard (bad magic or too short)".into()
            ));
        }
        let u32_at = |at: usize| u32::from_le_bytes(map[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(map[at..at + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(bad(format!(
                "shard format version {version}, this build reads version {FORMAT_VERSION}"
            )));
        }
        let width = u32_at(12) as usize;
        if width != 2 && width != 4 {
            return Err(bad(format!(
                "invalid token width {width} (expected 2 or 4)"
            )));
        }
        let (n_tokens, n_docs) = (u64_at(16), u64_at(24));
        let expected = (|| {
            let tokens = n_tokens.checked_mul(width as u64)?;
            let padded = tokens.checked_add((8 - tokens % 8) % 8)?;
            padded
                .checked_add(n_docs.checked_mul(8)?)?
                .checked_add(HEADER_LEN as u64)
        })();
        if expected != Some(map.len() as u64) {
            return Err(bad(format!(
                "truncated or corrupt: the header promises {n_tokens} tokens and {n_docs} \
                 documents, which does not match the file size of {} bytes",
                map.len()
            )));
        }
        let (n_tokens, n_docs) = (n_tokens as usize, n_docs as usize);
        let shard = TokenShard {
            path: path.to_path_buf(),
            width,
            n_tokens,
            n_docs,
            docs_at: HEADER_LEN + n_tokens * width + padding(n_tokens * width),
            map,
        };
        let mut previous = None;
        for i in 0..n_docs {
            let start = shard.doc_start(i);
            let ok = match previous {
                None => start == 0,
                Some(p) => start > p,
            } && start < n_tokens;
            if !ok {
                return Err(bad(format!(
                    "corrupt document offset {start} for document {i}"
                )));
            }
            previous = Some(start);
        }
        if (n_docs == 0) != (n_tokens == 0) {
            return Err(bad(format!("{n_tokens} tokens in {n_docs} documents")));
        }
        Ok(shard)
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.n_tokens
    }

    /// Whether the shard holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.n_tokens == 0
    }

    /// Number of documents.
    pub fn n_docs(&self) -> usize {
        self.n_docs
    }

    /// The file this shard maps.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Token `i`. Panics if `i >= len()`.
    pub fn get(&self, i: usize) -> u32 {
        assert!(
            i < self.n_tokens,
            "token {i} out of range ({} tokens)",
            self.n_tokens
        );
        self.slice(i, 1)[0]
    }

    /// Tokens `start..start + len`. Panics if the range exceeds the shard.
    pub fn slice(&self, start: usize, len: usize) -> Vec<u32> {
        assert!(
            start + len <= self.n_tokens,
            "tokens {start}..{} out of range ({} tokens)",
            start + len,
            self.n_tokens
        );
        let bytes =
            &self.map[HEADER_LEN + start * self.width..HEADER_LEN + (start + len) * self.width];
        match self.width {
            2 => bytes
                .chunks_exact(2)
                .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
            _ => bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        }
    }

    /// The tokens of document `i`, ending with its eos token. Panics if `i >= n_docs()`.
    pub fn doc(&self, i: usize) -> Vec<u32> {
        assert!(
            i < self.n_docs,
            "document {i} out of range ({} documents)",
            self.n_docs
        );
        let start = self.doc_start(i);
        let end = if i + 1 < self.n_docs {
            self.doc_start(i + 1)
        } else {
            self.n_tokens
        };
        self.slice(start, end - start)
    }

    fn doc_start(&self, i: usize) -> usize {
        let at = self.docs_at + 8 * i;
        u64::from_le_bytes(self.map[at..at + 8].try_into().expect("8 bytes")) as usize
    }

    /// Errs, naming the first offending id and its position, if any token is `>= vocab_size`.
    pub fn check_vocab(&self, vocab_size: usize) -> Result<()> {
        const CHUNK: usize = 1 << 16;
        for start in (0..self.n_tokens).step_by(CHUNK) {
            let tokens = self.slice(start, CHUNK.min(self.n_tokens - start));
            if let Some(pos) = tokens.iter().position(|&t| t as usize >= vocab_size) {
                crate::bail!(
                    "{}: token id {} at position {} is outside the vocab size {vocab_size}",
                    self.path.display(),
                    tokens[pos],
                    start + pos
                );
            }
        }
        Ok(())
    }
}

/// A prepared dataset directory: both shards and their meta, checked against each other.
pub struct Dataset {
    pub train: TokenShard,
    pub valid: TokenShard,
    pub meta: Meta,
}

impl Dataset {
    /// [`Dataset::open`], then check that the data suits the model in `model_dir` with
    /// `vocab_size` tokens: every id in range and, when the model ships a `tokenizer.json`, the
    /// data tokenized with that very tokenizer (ids from another one would be scored silently).
    pub fn open_for(dir: &Path, model_dir: &Path, vocab_size: usize) -> Result<Self> {
        let ds = Dataset::open(dir)?;
        ds.check_for(dir, model_dir, vocab_size)?;
        Ok(ds)
    }

    /// A short hash of the dataset's meta (token and document counts, tokenizer, sources,
    /// split seed): a run records it so that a resume on other data is refused.
    pub fn fingerprint(&self) -> String {
        let bytes = serde_json::to_vec(&self.meta).unwrap_or_default();
        format!("{:016x}", crate::hash::fnv1a(&bytes))
    }

    /// The checks of [`Dataset::open_for`] on an open dataset (read from `dir`).
    pub fn check_for(&self, dir: &Path, model_dir: &Path, vocab_size: usize) -> Result<()> {
        let ds = self;
        crate::ensure!(
            ds.meta.vocab_size <= vocab_size,
            "{}: vocabulary {} exceeds the model's {} ({})",
            dir.display(),
            ds.meta.vocab_size,
            vocab_size,
            model_dir.display()
        );
        let tok = crate::fsutil::confined(model_dir, "tokenizer.json", "tokenizer")?;
        if tok.exists() {
            crate::ensure!(
                Tokenizer::file_hash(&tok)? == ds.meta.tokenizer_hash,
                "{} was tokenized with a different tokenizer than the model in {}",
                dir.display(),
                model_dir.display()
            );
        }
        Ok(())
    }

    /// Opens `dir/{meta.json, train.bin, valid.bin}`, checking the token and document counts
    /// against the meta and every token id against its vocab size.
    pub fn open(dir: &Path) -> Result<Self> {
        let meta_path = dir.join("meta.json");
        let text =
            crate::fsutil::read_text(&meta_path, "dataset meta", crate::fsutil::MAX_JSON_BYTES)
                .with_context(|| format!("cannot read the prepared dataset {}", dir.display()))?;
        let meta: Meta = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid dataset meta", meta_path.display()))?;
        crate::ensure!(
            meta.format_version == FORMAT_VERSION,
            "{}: format version {}, this build reads version {FORMAT_VERSION}",
            meta_path.display(),
            meta.format_version
        );
        crate::limits::check_dim(
            "vocab_size",
            meta.vocab_size,
            crate::limits::MAX_VOCAB,
            "token ids are 32-bit",
        )
        .with_context(|| format!("{}", meta_path.display()))?;
        crate::ensure!(
            (meta.eos_id as usize) < meta.vocab_size,
            "{}: eos_id {} is not below vocab_size {}",
            meta_path.display(),
            meta.eos_id,
            meta.vocab_size
        );
        let train = TokenShard::open(&dir.join("train.bin"))?;
        let valid = TokenShard::open(&dir.join("valid.bin"))?;
        for shard in [&train, &valid] {
            crate::ensure!(
                shard.width == meta.token_bytes as usize,
                "{}: token_bytes {} but {} stores {}-byte tokens",
                meta_path.display(),
                meta.token_bytes,
                shard.path().display(),
                shard.width
            );
        }
        for (shard, tokens, docs) in [
            (&train, meta.train_tokens, meta.train_docs),
            (&valid, meta.valid_tokens, meta.valid_docs),
        ] {
            crate::ensure!(
                shard.len() as u64 == tokens && shard.n_docs() as u64 == docs,
                "{} holds {} tokens in {} documents but {} records {tokens} in {docs}",
                shard.path().display(),
                shard.len(),
                shard.n_docs(),
                meta_path.display()
            );
            shard.check_vocab(meta.vocab_size)?;
        }
        Ok(Dataset { train, valid, meta })
    }
}

/// A training batch: inputs and targets, each `batch * seq` ids row-major, targets being the
/// inputs shifted by one token.
///
/// Rows are windows at random positions (crossing document boundaries, which eos marks) that
/// depend only on (`seed`, `step`, `micro`), so a resumed run sees exactly the same data.
pub fn train_batch(
    shard: &TokenShard,
    batch: usize,
    seq: usize,
    seed: u64,
    step: u64,
    micro: u64,
) -> Result<(Vec<u32>, Vec<u32>)> {
    crate::ensure!(
        batch > 0 && seq > 0,
        "batch size and sequence length must be positive"
    );
    crate::ensure!(
        shard.len() > seq,
        "{} has {} tokens, too few for a window of {seq} + 1",
        shard.path().display(),
        shard.len()
    );
    let mut rng = StdRng::seed_from_u64(mix(&[seed, step, micro]));
    let (mut inputs, mut targets) = (
        Vec::with_capacity(batch * seq),
        Vec::with_capacity(batch * seq),
    );
    for _ in 0..batch {
        let start = rng.random_range(0..=shard.len() - seq - 1);
        let window = shard.slice(start, seq + 1);
        inputs.extend_from_slice(&window[..seq]);
        targets.extend_from_slice(&window[1..]);
    }
    Ok((inputs, targets))
}

/// [`valid_batches`] for a measurement that needs at least one window: an error naming `what`
/// when the validation split, or `max_tokens`, holds less than one window of `seq` tokens.
pub fn eval_batches(
    shard: &TokenShard,
    batch: usize,
    seq: usize,
    max_tokens: usize,
    what: &str,
) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
    let batches = valid_batches(shard, batch, seq, max_tokens)?;
    crate::ensure!(
        !batches.is_empty(),
        "{what}: no window of {seq} tokens to score (the validation split holds {} tokens, \
         at most {max_tokens} are used): lower --seq or raise --tokens",
        shard.len()
    );
    Ok(batches)
}

/// Validation batches: consecutive non-overlapping windows from the start of the shard, at most
/// `max_tokens` input tokens in all, grouped `batch` rows at a time. The last batch may have
/// fewer rows (its length is a multiple of `seq`); an empty shard gives no batches.
pub fn valid_batches(
    shard: &TokenShard,
    batch: usize,
    seq: usize,
    max_tokens: usize,
) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
    crate::ensure!(
        batch > 0 && seq > 0,
        "batch size and sequence length must be positive"
    );
    let windows = (shard.len().saturating_sub(1) / seq).min(max_tokens / seq);
    let batches = (0..windows)
        .step_by(batch)
        .map(|first| {
            let rows = first..(first + batch).min(windows);
            let (mut inputs, mut targets) = (Vec::new(), Vec::new());
            for row in rows {
                let window = shard.slice(row * seq, seq + 1);
                inputs.extend_from_slice(&window[..seq]);
                targets.extend_from_slice(&window[1..]);
            }
            (inputs, targets)
        })
        .collect();
    Ok(batches)
}

/// `n` distinct documents (all of them when the shard has fewer), each truncated to `max_len`
/// tokens, chosen deterministically by `seed`.
pub fn sample_docs(shard: &TokenShard, n: usize, max_len: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = StdRng::seed_from_u64(mix(&[seed, fnv1a(b"sample_docs")]));
    rand::seq::index::sample(&mut rng, shard.n_docs(), n.min(shard.n_docs()))
        .into_iter()
        .map(|i| {
            let mut doc = shard.doc(i);
            doc.truncate(max_len);
            doc
        })
        .collect()
}
