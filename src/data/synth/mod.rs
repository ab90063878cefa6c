//! FlexMix: a built-in synthetic multi-domain corpus, deterministic per seed, needing nothing
//! from outside.
//!
//! One broad public domain and closed domains, each closed one with its own style so a router
//! can tell them apart. As in FlexOlmo, where the public model is trained on web data, the
//! public domain covers the general formats and vocabulary of every domain; what a closed
//! domain adds is its specific knowledge or skill, which appears nowhere else:
//! - `public`: half short stories from a grammar, with common knowledge in fixed phrasings;
//!   half public-grade versions of the closed formats: single-digit addition worksheets,
//!   encyclopedia entries about a small public world, and code from a public function family;
//! - `math`: harder arithmetic with exact answers ("Q: 14 + 8 = ? A: 22."): additions with a
//!   two-digit operand, subtraction, multiplication (also as word problems), two-step problems;
//! - `facts`: an encyclopedia of a fictional world that only this domain describes;
//! - `code`: small Python modules from a closed family of patterns (two-argument operators,
//!   loops, classes that store their arguments).
//!
//! Every domain also yields exact-match [`Task`]s for evaluation; closed-domain tasks test only
//! the closed content, public tasks test the stories' common knowledge.

mod code;
mod facts;
mod math;
mod public;
mod words;

use std::fs;
use std::io::Write;
use std::path::Path;

use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::error::{Context, Result};
use crate::fsutil::{write_atomic, write_bytes_atomic};
use crate::hash::{fnv1a, mix};

/// Domain names; the public domain comes first.
pub const DOMAINS: &[&str] = &["public", "math", "facts", "code"];

/// Whether `name` is one of [`DOMAINS`].
pub fn is_known_domain(name: &str) -> bool {
    DOMAINS.contains(&name)
}

/// Which half of a domain a document belongs to; the two are generated from different streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Valid,
}

impl Split {
    fn tag(self) -> u64 {
        match self {
            Split::Train => tag("train"),
            Split::Valid => tag("valid"),
        }
    }
}

/// How much FlexMix to write.
///
/// The default (800 train and 50 validation documents per domain) gives each domain 0.35-0.55 M
/// characters of train text (0.1-0.18 M tokens with a 2048-token BPE trained on all domains;
/// `public`, the broad mix, is about 0.43 M characters, 0.13 M tokens): enough for a tiny model
/// to learn every domain in a ~10-minute CPU demo.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SynthConfig {
    pub seed: u64,
    pub docs_per_domain: usize,
    pub valid_docs_per_domain: usize,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            seed: 0,
            docs_per_domain: 800,
            valid_docs_per_domain: 50,
        }
    }
}

/// An exact-match evaluation item: a model that learned the domain continues `prompt` greedily
/// with `answer`.
///
/// `answer` starts with a space and ends with its delimiter ("." for prose, "\n" for code), and
/// `prompt` has no trailing whitespace, so the prompt/answer boundary is a token boundary.
/// Generate a few tokens more than `answer` has and score with [`Task::is_correct`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    pub prompt: String,
    pub answer: String,
}

impl Task {
    /// Whether a generated continuation of the prompt starts with the answer.
    pub fn is_correct(&self, continuation: &str) -> bool {
        continuation.starts_with(&self.answer)
    }
}

/// A domain's source of documents and tasks; `public` and `facts` carry the seed's public and
/// closed world.
enum Generator {
    Public(facts::World),
    Math,
    Facts(facts::World),
    Code,
}

impl Generator {
    fn new(domain: &str, seed: u64) -> Result<Self> {
        Ok(match domain {
            "public" => Generator::Public(facts::Worlds::new(seed).public),
            "math" => Generator::Math,
            "facts" => Generator::Facts(facts::Worlds::new(seed).closed),
            "code" => Generator::Code,
            _ => crate::bail!(
                "unknown FlexMix domain '{domain}' (known: {})",
                DOMAINS.join(", ")
            ),
        })
    }
}

/// The first `n` documents of `domain`'s `split` for `seed`.
///
/// Document `i` depends only on (`seed`, `domain`, `split`, `i`), so a longer request extends a
/// shorter one. Validation documents of `facts` re-phrase the same facts as its train documents.
pub fn generate_docs(domain: &str, seed: u64, n: usize, split: Split) -> Result<Vec<String>> {
    let generator = Generator::new(domain, seed)?;
    let docs = (0..n as u64)
        .map(|i| {
            let rng = &mut StdRng::seed_from_u64(mix(&[seed, tag(domain), split.tag(), i]));
            match &generator {
                Generator::Public(world) => public::doc(i, world, rng),
                Generator::Math => math::doc(rng),
                Generator::Facts(world) => world.doc(split, i, rng),
                Generator::Code => code::doc(rng),
            }
        })
        .collect();
    Ok(docs)
}

/// Writes `out_dir/<domain>/train.jsonl` and `valid.jsonl` for every domain (one
/// `{"text": ...}` object per line; each domain directory is what one data owner holds) and
/// `out_dir/flexmix.json` with the config, so evaluation can regenerate the tasks.
pub fn write_corpus(out_dir: &Path, cfg: &SynthConfig) -> Result<()> {
    // Only into a new or empty directory, or over a corpus this command wrote.
    crate::fsutil::check_out(
        out_dir,
        &crate::fsutil::DirKind {
            what: "a corpus written by data synth",
            markers: &["public"],
            owns: |_| false,
        },
    )?;
    for &domain in DOMAINS {
        let dir = out_dir.join(domain);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for (split, n, file) in [
            (Split::Train, cfg.docs_per_domain, "train.jsonl"),
            (Split::Valid, cfg.valid_docs_per_domain, "valid.jsonl"),
        ] {
            let docs = generate_docs(domain, cfg.seed, n, split)?;
            write_atomic(&dir.join(file), |w| {
                for text in &docs {
                    serde_json::to_writer(&mut *w, &serde_json::json!({ "text": text }))?;
                    w.write_all(b"\n")?;
                }
                Ok(())
            })?;
        }
    }
    let manifest = serde_json::to_string_pretty(cfg)?;
    write_bytes_atomic(&out_dir.join("flexmix.json"), manifest.as_bytes())
}

/// `n` evaluation tasks of `domain` for `seed`.
///
/// `math`: fresh one-step problems from the closed worksheet distribution, never single-digit
/// additions (operands are small, so the same problems also occur in training; a model must
/// have learned the arithmetic facts); `facts`: the closed world's facts, each once before any
/// repeats; `code`: completions the closed code patterns determine; `public`: common-knowledge
/// completions in the stories' phrasing.
pub fn tasks(domain: &str, seed: u64, n: usize) -> Result<Vec<Task>> {
    let generator = Generator::new(domain, seed)?;
    let tasks = (0..n as u64)
        .map(|i| {
            let rng = &mut StdRng::seed_from_u64(mix(&[seed, tag(domain), tag("tasks"), i]));
            match &generator {
                Generator::Public(_) => public::task(rng),
                Generator::Math => math::task(rng),
                Generator::Facts(world) => world.task(i),
                Generator::Code => code::task(rng),
            }
        })
        .collect();
    Ok(tasks)
}

/// A stable 64-bit tag for a name, used to separate random streams.
fn tag(name: &str) -> u64 {
    fnv1a(name.as_bytes())
}
