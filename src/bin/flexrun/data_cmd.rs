//! `flexrun data` and `flexrun tokenizer`: the built-in corpus, token shards, BPE training.

use clap::Subcommand;
use flexrun::data::{shards, synth, tokenizer, Tokenizer};
use flexrun::ensure;
use flexrun::error::Result;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum DataCmd {
    /// Write the built-in synthetic multi-domain corpus (one directory per domain).
    Synth {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Training documents per domain (default: the demo size).
        #[arg(long)]
        docs: Option<usize>,
    },
    /// Tokenize text files (.txt, .jsonl, or directories of them) into train/valid shards.
    Prepare {
        #[arg(long, required = true, num_args = 1..)]
        input: Vec<PathBuf>,
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0.05)]
        valid_fraction: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// BPE-dropout of the training split: each merged token is split back into its pair
        /// with this probability, so that every token of the vocabulary is trained (validation
        /// stays deterministic). For a public model whose tokenizer has intermediate tokens
        /// that its data never shows on their own.
        #[arg(long, default_value_t = 0.0)]
        bpe_dropout: f64,
    },
}

#[derive(Subcommand)]
pub enum TokCmd {
    /// Train a byte-level BPE on text files and write tokenizer.json.
    Train {
        #[arg(long, required = true, num_args = 1..)]
        input: Vec<PathBuf>,
        #[arg(long, default_value_t = 2048)]
        vocab: usize,
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run_data(cmd: DataCmd) -> Result<()> {
    match cmd {
        DataCmd::Synth { out, seed, docs } => {
            let mut cfg = synth::SynthConfig {
                seed,
                ..Default::default()
            };
            if let Some(d) = docs {
                ensure!(d >= 1, "--docs must be at least 1");
                flexrun::limits::check_dim(
                    "--docs",
                    d,
                    flexrun::limits::MAX_COUNT,
                    "far beyond any corpus this generator makes",
                )?;
                cfg.docs_per_domain = d;
            }
            synth::write_corpus(&out, &cfg)?;
            outln!(
                "wrote {} domains ({}) to {}",
                synth::DOMAINS.len(),
                synth::DOMAINS.join(", "),
                out.display()
            );
        }
        DataCmd::Prepare {
            input,
            tokenizer,
            out,
            valid_fraction,
            seed,
            bpe_dropout,
        } => {
            // The dataset directory is replaced whole: its tokenizer cannot be an input.
            flexrun::fsutil::check_not_input(&out, "--out", &[&tokenizer])?;
            let tok = Tokenizer::load(&tokenizer)?;
            let meta = shards::prepare(&input, &tok, &out, valid_fraction, seed, bpe_dropout)?;
            outln!(
                "{}: {} train tokens ({} docs), {} valid tokens ({} docs), vocab {}",
                out.display(),
                meta.train_tokens,
                meta.train_docs,
                meta.valid_tokens,
                meta.valid_docs,
                meta.vocab_size
            );
        }
    }
    Ok(())
}

pub fn run_tokenizer(cmd: TokCmd) -> Result<()> {
    match cmd {
        TokCmd::Train { input, vocab, out } => {
            tokenizer::train_bpe(&input, vocab, &out)?;
            let tok = Tokenizer::load(&out)?;
            outln!("wrote {} (vocab {})", out.display(), tok.vocab_size());
        }
    }
    Ok(())
}
