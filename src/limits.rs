//! Sizes that files and arguments may ask for, checked before anything is allocated.
//!
//! Two kinds of limit. Hard caps on each dimension a config, a dataset meta or an argument can
//! set, each far above any real model (the largest published LLMs have vocabularies near 256k,
//! widths near 25k, contexts near 1M) and each with its reason; they keep arithmetic on sizes
//! from overflowing and make nonsense a one-line error. And a memory check: what a command is
//! about to allocate (a model's parameters, optimizer state, activations, a KV cache), estimated
//! from below, against this machine's memory, so that a size that would abort the process with
//! "memory allocation failed" is refused first.

use crate::error::Result;

/// Token ids are u32 and shards store them in 2 or 4 bytes; embeddings and the output layer are
/// `vocab x hidden`.
pub const MAX_VOCAB: usize = 1 << 24;
/// Width of the residual stream.
pub const MAX_HIDDEN: usize = 1 << 16;
/// Width of one FFN (an expert's).
pub const MAX_INTERMEDIATE: usize = 1 << 20;
pub const MAX_LAYERS: usize = 1 << 12;
pub const MAX_HEADS: usize = 1 << 12;
pub const MAX_HEAD_DIM: usize = 1 << 12;
pub const MAX_EXPERTS: usize = 1 << 12;
/// flexrun precomputes the RoPE table of every position a model allows.
pub const MAX_POSITIONS: usize = 1 << 21;
/// Entries of the precomputed RoPE table (`max_position_embeddings x head_dim`: 2 GiB of f32 cos
/// and sin at the limit; a 1M-token context at head dim 128 is half of it).
pub const MAX_ROPE_ENTRIES: usize = 1 << 28;
/// Rows of one training or decoding batch.
pub const MAX_BATCH: usize = 1 << 20;
/// Vocabulary a BPE tokenizer is trained to (the trainer keeps per-merge state).
pub const MAX_TOKENIZER_VOCAB: usize = 1 << 21;
/// Documents, samples or tasks a command is asked to process (far beyond any evaluation).
pub const MAX_COUNT: usize = 1 << 24;
/// Worker threads.
pub const MAX_THREADS: usize = 1 << 10;

/// `value` (named `what`) must be at most `max`, for `why`.
pub fn check_dim(what: &str, value: usize, max: usize, why: &str) -> Result<()> {
    crate::ensure!(
        value <= max,
        "{what} = {value} is larger than flexrun allows ({max}: {why})"
    );
    Ok(())
}

/// The memory this process may use, in bytes: physical memory plus swap, or less where the
/// process's address-space limit (`ulimit -v`) or its cgroup's `memory.max` says so (None where
/// none of them can be read).
pub fn machine_memory() -> Option<u128> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u128> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kb: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    };
    let mut have = field("MemTotal:")? + field("SwapTotal:").unwrap_or(0);
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the struct it is given.
        if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut lim) } == 0
            && lim.rlim_cur != libc::RLIM_INFINITY
        {
            have = have.min(lim.rlim_cur as u128);
        }
    }
    if let Some(max) = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u128>().ok())
    {
        have = have.min(max);
    }
    Some(have)
}

fn gib(bytes: u128) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Refuse `what` when it needs more than this machine's memory (`bytes`, a lower bound).
pub fn check_memory(what: &str, bytes: u128) -> Result<()> {
    if let Some(have) = machine_memory() {
        crate::ensure!(
            bytes <= have,
            "{what} needs at least {:.1} GiB of memory, more than this machine's {:.1} GiB",
            gib(bytes),
            gib(have)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_say_what_and_why() {
        assert!(check_dim("vocab_size", MAX_VOCAB, MAX_VOCAB, "x").is_ok());
        let e = check_dim("vocab_size", MAX_VOCAB + 1, MAX_VOCAB, "ids are u32")
            .unwrap_err()
            .0;
        assert!(
            e.contains("vocab_size = 16777217") && e.contains("ids are u32"),
            "{e}"
        );
        let e = check_memory("a model of 10^15 parameters", 4 << 50)
            .unwrap_err()
            .0;
        assert!(e.contains("GiB"), "{e}");
        assert!(check_memory("a small model", 1 << 20).is_ok());
    }
}
