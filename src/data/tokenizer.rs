//! Byte-level BPE: training with the `tokenizers` crate and a thin wrapper for encode/decode.
//!
//! Tokenizers trained here use the GPT-2 byte-level scheme without an added prefix space, so
//! `decode(encode(s)) == s` for every string. Ids 0 and 1 are the special tokens
//! [`EOS_TOKEN`] and [`PAD_TOKEN`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rand::rngs::StdRng;
use rand::Rng;

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, TokenizerBuilder};

use super::text::{expand_inputs, read_documents};
use crate::error::{Context, Result};
use crate::fsutil::write_bytes_atomic;
use crate::hash::fnv1a;

/// End-of-text token appended after every document (id 0 in tokenizers trained here).
pub const EOS_TOKEN: &str = "<|endoftext|>";
/// Padding token (id 1 in tokenizers trained here).
pub const PAD_TOKEN: &str = "<|pad|>";

/// Names tried, in order, for the end-of-text token of a foreign `tokenizer.json`.
const EOS_NAMES: &[&str] = &[
    EOS_TOKEN,
    "<|end_of_text|>",
    "</s>",
    "<eos>",
    "<|eot_id|>",
    "<|im_end|>",
    "[SEP]",
];
/// Names tried, in order, for the padding token; the eos token is used when none exists.
const PAD_NAMES: &[&str] = &[
    PAD_TOKEN,
    "<pad>",
    "<|padding|>",
    "[PAD]",
    "<|finetune_right_pad_id|>",
];

/// 256 byte symbols plus the two special tokens.
const MIN_VOCAB: usize = 258;

/// Trains a byte-level BPE of `vocab_size` tokens (special tokens included; fewer if the text
/// runs out of pairs seen at least twice) on all documents of `files` (`.txt`/`.jsonl` files or
/// directories of them) and writes `out` (a `tokenizer.json`) atomically.
pub fn train_bpe(files: &[PathBuf], vocab_size: usize, out: &Path) -> Result<()> {
    crate::ensure!(
        vocab_size >= MIN_VOCAB,
        "vocab size {vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB}"
    );
    // The output must not replace a corpus file (named, or found in a directory of inputs), nor
    // a file of a model or dataset.
    let corpus: Vec<PathBuf> = expand_inputs(files)?.into_iter().map(|f| f.path).collect();
    let inputs: Vec<&Path> = corpus.iter().map(PathBuf::as_path).collect();
    crate::fsutil::check_output_file(out, "--out", &inputs)?;
    crate::limits::check_dim(
        "--vocab",
        vocab_size,
        crate::limits::MAX_TOKENIZER_VOCAB,
        "far beyond any trained BPE vocabulary",
    )?;
    // The trainer keeps per-byte state of its whole input (pre-token offsets and words): about
    // 25 times the text's size.
    let total: u64 = expand_inputs(files)?
        .iter()
        .filter_map(|f| std::fs::metadata(&f.path).ok())
        .map(|m| m.len())
        .sum();
    crate::limits::check_memory(
        &format!("training a tokenizer on {total} bytes of text"),
        40 * total as u128,
    )?;
    let mut docs = Vec::new();
    for file in expand_inputs(files)? {
        docs.extend(read_documents(&file.path)?);
    }
    crate::ensure!(!docs.is_empty(), "no documents to train a tokenizer on");
    // The BPE trainer's time grows with the square of a word's length: a run of thousands of
    // characters without a space (a base64 blob, a minified line) is cut into pieces of at most
    // MAX_TRAIN_WORD characters for training, which changes no ordinary word.
    // Documents longer than a piece are trained on in pieces (the library's pre-tokenizer keeps
    // 16 bytes of offsets per byte of a document).
    let docs: Vec<String> = docs
        .iter()
        .flat_map(|d| chunks(d, ENCODE_CHUNK))
        .map(|d| bounded_words(d.to_string(), MAX_TRAIN_WORD))
        .collect();

    let byte_level = ByteLevel::new(false, false, true);
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(2)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(vec![
            AddedToken::from(EOS_TOKEN, true),
            AddedToken::from(PAD_TOKEN, true),
        ])
        .build();
    let mut tok = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None::<tokenizers::NormalizerWrapper>)
        .with_pre_tokenizer(Some(byte_level))
        .with_post_processor(None::<tokenizers::PostProcessorWrapper>)
        .with_decoder(Some(byte_level))
        .build()
        .context("building tokenizer")?;
    tok.train(&mut trainer, docs.iter())
        .context("training tokenizer")?;
    let json = tok.to_string(true).context("serialising tokenizer")?;
    write_bytes_atomic(out, json.as_bytes())
}

/// The longest run of non-space characters the BPE trainer sees (see [`train_bpe`]).
const MAX_TRAIN_WORD: usize = 256;

/// `doc` with a space inserted into every run of more than `max` non-whitespace characters.
fn bounded_words(doc: String, max: usize) -> String {
    let mut run = 0;
    if doc.chars().all(|c| {
        run = if c.is_whitespace() { 0 } else { run + 1 };
        run <= max
    }) {
        return doc;
    }
    let mut out = String::with_capacity(doc.len() + doc.len() / max);
    run = 0;
    for c in doc.chars() {
        run = if c.is_whitespace() { 0 } else { run + 1 };
        if run > max {
            out.push(' ');
            run = 1;
        }
        out.push(c);
    }
    out
}

/// A tokenizer whose normalizer or pre-tokenizer replaces text with more than this many bytes
/// is refused: it multiplies the size of whatever it reads.
const MAX_REPLACE_BYTES: usize = 256;

/// Refuse `Replace` rules (anywhere in a tokenizer.json) whose replacement is longer than
/// [`MAX_REPLACE_BYTES`].
fn check_expansion(path: &Path, v: &serde_json::Value) -> Result<()> {
    match v {
        serde_json::Value::Object(m) => {
            if m.get("type").and_then(|t| t.as_str()) == Some("Replace") {
                let n = m
                    .get("content")
                    .and_then(|c| c.as_str())
                    .map_or(0, str::len);
                crate::ensure!(
                    n <= MAX_REPLACE_BYTES,
                    "{}: a Replace rule writes {n} bytes for each match (at most {MAX_REPLACE_BYTES} are accepted: it would multiply the text's size)",
                    path.display()
                );
            }
            m.values().try_for_each(|x| check_expansion(path, x))
        }
        serde_json::Value::Array(a) => a.iter().try_for_each(|x| check_expansion(path, x)),
        _ => Ok(()),
    }
}

/// Texts longer than this are tokenized in pieces (see [`Tokenizer::encode`]).
pub const ENCODE_CHUNK: usize = 1 << 20;

/// `text` in pieces of at least `target` bytes (the last may be shorter), each cut before a
/// space that follows a non-space character and precedes one, found within `target / 8` bytes
/// past `target`; a text without such a space there is cut at a character boundary.
fn chunks(text: &str, target: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while rest.len() > target + target / 8 {
        let b = rest.as_bytes();
        let window = target..(target + target / 8).min(b.len() - 1);
        let cut = window
            .clone()
            .find(|&i| {
                b[i] == b' ' && !b[i - 1].is_ascii_whitespace() && !b[i + 1].is_ascii_whitespace()
            })
            .unwrap_or_else(|| {
                (target..)
                    .find(|&i| rest.is_char_boundary(i))
                    .unwrap_or(rest.len())
            });
        let (head, tail) = rest.split_at(cut);
        out.push(head);
        rest = tail;
    }
    out.push(rest);
    out
}

/// A loaded tokenizer: ours or any Hugging Face `tokenizer.json`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eos: u32,
    pad: u32,
    hash: String,
    /// The tokenizer.json it was read from, as read.
    json: Vec<u8>,
    /// For a BPE model: each merged token's id -> the ids of the pair it was merged from (read
    /// on first use by [`Tokenizer::split_merges`]).
    parents: OnceLock<HashMap<u32, (u32, u32)>>,
}

impl Tokenizer {
    /// Loads a `tokenizer.json`; finds the eos token by common names (see [`EOS_TOKEN`]) and the
    /// pad token likewise, falling back to eos when there is no pad token.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = crate::fsutil::read_regular(path, "tokenizer", crate::fsutil::MAX_JSON_BYTES)?;
        let json: serde_json::Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a valid tokenizer.json", path.display()))?;
        check_expansion(path, &json)?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .with_context(|| format!("{} is not a valid tokenizer.json", path.display()))?;
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let eos = find(EOS_NAMES).with_context(|| {
            format!(
                "{}: no end-of-text token found (looked for {})",
                path.display(),
                EOS_NAMES.join(", ")
            )
        })?;
        let pad = find(PAD_NAMES).unwrap_or(eos);
        Ok(Self {
            inner,
            eos,
            pad,
            hash: bytes_hash(&bytes),
            json: bytes,
            parents: OnceLock::new(),
        })
    }

    /// [`Tokenizer::content_hash`] of the `tokenizer.json` at `path`, without parsing it.
    pub fn file_hash(path: &Path) -> Result<String> {
        let bytes = crate::fsutil::read_regular(path, "tokenizer", crate::fsutil::MAX_JSON_BYTES)?;
        Ok(bytes_hash(&bytes))
    }

    /// Token ids of `text`, without any special tokens added. As in Hugging Face tokenizers, the
    /// literal text of a special token (e.g. `<|endoftext|>`) still maps to its id.
    ///
    /// Long texts are encoded in pieces of about [`ENCODE_CHUNK`] bytes, split before a single
    /// space between two non-space characters, where pre-tokenization splits anyway, so the ids
    /// are those of the whole text; the tokenizer library keeps per-byte state many times the
    /// text's size, which a document of hundreds of megabytes would not fit in.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_pieces(text, ENCODE_CHUNK)
    }

    fn encode_pieces(&self, text: &str, target: usize) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        for piece in chunks(text, target) {
            let enc = self
                .inner
                .encode_fast(piece, false)
                .context("tokenizing text")?;
            ids.extend_from_slice(enc.get_ids());
        }
        Ok(ids)
    }

    /// BPE-dropout for training data: every token of `ids` that BPE merged from a pair is split
    /// back into that pair with probability `p`, and so on down to single bytes. The text is
    /// unchanged (`decode` gives the same string); the model then also learns the tokens that
    /// the deterministic segmentation only passes through on the way to longer ones, which it
    /// would otherwise never see as targets. Deterministic given `rng`. Tokenizers other than
    /// BPE have no merges: their ids come back unchanged.
    pub fn split_merges(&self, ids: &[u32], p: f64, rng: &mut StdRng) -> Result<Vec<u32>> {
        let parents = match self.parents.get() {
            Some(m) => m,
            None => {
                let json = self
                    .inner
                    .to_string(false)
                    .context("serialising tokenizer")?;
                let m = bpe_parents(json.as_bytes(), &self.inner)
                    .map_err(|e| crate::error::Error::msg(format!("BPE merges: {e}")))?;
                self.parents.get_or_init(|| m)
            }
        };
        let mut out = Vec::with_capacity(ids.len());
        let mut stack = Vec::new();
        for &id in ids {
            stack.push(id);
            while let Some(t) = stack.pop() {
                match parents.get(&t) {
                    Some(&(l, r)) if p > 0.0 && rng.random_bool(p) => {
                        stack.push(r);
                        stack.push(l);
                    }
                    _ => out.push(t),
                }
            }
        }
        Ok(out)
    }

    /// The text of `ids`; special tokens are kept as their literal text.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let vocab = self.vocab_size();
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            crate::bail!("cannot decode token id {bad}: the vocabulary has {vocab} tokens");
        }
        self.inner.decode(ids, false).context("decoding tokens")
    }

    /// Number of token ids, added tokens included (ids are `0..vocab_size()`).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The end-of-text id appended after every document.
    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// The padding id (the eos id when the tokenizer has no pad token).
    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// Hex FNV-1a hash of the `tokenizer.json` bytes; datasets record it to detect mismatches.
    pub fn json_bytes(&self) -> &[u8] {
        &self.json
    }

    pub fn content_hash(&self) -> &str {
        &self.hash
    }
}

/// The merge pairs of a BPE `tokenizer.json` (`model.merges`, as `["a", "b"]` or `"a b"`), as
/// merged id -> (left id, right id); empty for other models.
fn bpe_parents(
    bytes: &[u8],
    inner: &tokenizers::Tokenizer,
) -> std::result::Result<HashMap<u32, (u32, u32)>, String> {
    #[derive(serde::Deserialize)]
    struct File {
        model: Model,
    }
    #[derive(serde::Deserialize)]
    struct Model {
        #[serde(default)]
        merges: Vec<serde_json::Value>,
    }
    let file: File = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let id = |t: &str| {
        inner
            .token_to_id(t)
            .ok_or_else(|| format!("merge token {t:?} is not in the vocabulary"))
    };
    let mut parents = HashMap::new();
    for m in &file.model.merges {
        let (l, r) = match m {
            serde_json::Value::Array(a) if a.len() == 2 => match (a[0].as_str(), a[1].as_str()) {
                (Some(l), Some(r)) => (l.to_string(), r.to_string()),
                _ => return Err(format!("merge {m} is not a pair of strings")),
            },
            serde_json::Value::String(s) => match s.split_once(' ') {
                Some((l, r)) => (l.to_string(), r.to_string()),
                None => return Err(format!("merge {s:?} is not a pair")),
            },
            _ => return Err(format!("merge {m} is not a pair")),
        };
        parents.insert(id(&format!("{l}{r}"))?, (id(&l)?, id(&r)?));
    }
    Ok(parents)
}

/// The content hash of a `tokenizer.json`'s bytes.
fn bytes_hash(bytes: &[u8]) -> String {
    format!("{:016x}", fnv1a(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_texts_encode_in_pieces_as_a_whole() {
        let dir = std::env::temp_dir().join(format!("flexrun-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let corpus = dir.join("c.txt");
        let text: String = (0..4000)
            .map(|i| format!("word{} the  cat, sat\t on {}-mat. ", i % 37, i % 11))
            .collect();
        std::fs::write(&corpus, &text).unwrap();
        let out = dir.join("tok.json");
        train_bpe(&[corpus], 400, &out).unwrap();
        let tok = Tokenizer::load(&out).unwrap();
        let whole = tok
            .inner
            .encode_fast(text.as_str(), false)
            .unwrap()
            .get_ids()
            .to_vec();
        for target in [256, 1000, 4096] {
            assert!(chunks(&text, target).len() > 1);
            assert_eq!(chunks(&text, target).concat(), text);
            let got = tok.encode_pieces(&text, target).unwrap();
            if got != whole {
                let at = got.iter().zip(&whole).position(|(a, b)| a != b).unwrap();
                let show = |ids: &[u32]| {
                    tok.inner
                        .decode(&ids[at.saturating_sub(3)..(at + 4).min(ids.len())], false)
                        .unwrap()
                };
                let pieces = chunks(&text, target);
                panic!(
                    "pieces of {target} differ at token {at}: {:?} vs {:?}; first pieces {:?}",
                    show(&got),
                    show(&whole),
                    &pieces[..2]
                );
            }
        }
        // No space to cut at: pieces still cover the text, cut at character boundaries.
        let solid = "\u{e9}".repeat(300);
        assert_eq!(chunks(&solid, 64).concat(), solid);
    }
}
