//! `flexrun demo`: the whole FlexOlmo pipeline on the built-in corpus, with its baselines.

use crate::opts::DeviceOpts;
use clap::Args;
use flexrun::demo;
use flexrun::error::Result;
use std::path::PathBuf;

#[derive(Args)]
pub struct DemoArgs {
    /// Working directory for corpus, models and results.
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also run the ablations (no bias, random router init, top-k sweep).
    #[arg(long)]
    pub ablations: bool,
    /// A tiny configuration that runs in seconds (smoke test).
    #[arg(long)]
    pub quick: bool,
    #[arg(long)]
    pub public_steps: Option<u64>,
    #[arg(long)]
    pub expert_steps: Option<u64>,
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Fraction of each expert's training rows drawn from public data.
    #[arg(long)]
    pub public_mix: Option<f64>,
    /// Weight of the public anchor on the public rows of expert training (default 10: opting an
    /// expert out then moves every other domain by less than 2%; lower weights give lower
    /// losses and more interference).
    #[arg(long)]
    pub public_anchor: Option<f32>,
    /// Per-layer weights of the public anchor (one per layer; default 4,1,...,1,4).
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    pub public_anchor_layers: Option<Vec<f32>>,
    /// BPE-dropout of the public training data (default 0.01; see `data prepare --bpe-dropout`).
    #[arg(long)]
    pub bpe_dropout: Option<f64>,
    /// Tokenizer vocabulary size.
    #[arg(long)]
    pub vocab: Option<usize>,
    /// Model width (default 128).
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Number of layers (default 4).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Attention heads (default 4; must divide --hidden).
    #[arg(long)]
    pub heads: Option<usize>,
    /// FFN width of the public model and of every expert (default 352).
    #[arg(long)]
    pub intermediate: Option<usize>,
    /// A sentence encoder (sentence-transformers directory, e.g. all-MiniLM-L6-v2): with
    /// --ablations, also experts whose router rows come from its embeddings.
    #[arg(long)]
    pub encoder: Option<PathBuf>,
    /// Run on this corpus (one sub-directory per domain, public/ among them) instead of FlexMix.
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    /// Where the models are trained and evaluated.
    #[command(flatten)]
    pub device: DeviceOpts,
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(a: DemoArgs) -> Result<()> {
    let mut c = if a.quick {
        demo::DemoConfig::quick()
    } else {
        demo::DemoConfig::default()
    };
    c.seed = a.seed;
    c.ablations = a.ablations;
    c.corpus = a.corpus.clone();
    c.encoder = a.encoder.clone();
    // Each flag given overrides the configuration's field of the same name.
    macro_rules! override_fields {
        ($($f:ident),*) => {$(
            if let Some(v) = a.$f {
                c.$f = v;
            }
        )*};
    }
    override_fields!(
        public_mix,
        public_anchor,
        bpe_dropout,
        vocab,
        hidden,
        layers,
        heads,
        intermediate,
        public_steps,
        top_k
    );
    if let Some(w) = &a.public_anchor_layers {
        c.public_anchor_layers = Some(w.clone());
    }
    if let Some(s) = a.expert_steps {
        c.expert_steps = s;
        c.dense_steps = s;
    }
    let device = a.device.open()?;
    demo::run(&c, &a.out, &device, a.quiet)?;
    out!("{}", std::fs::read_to_string(a.out.join("results.md"))?);
    outln!(
        "\nresults: {}, {}; routing heatmap: {}; loss curves: {}",
        a.out.join("results.md").display(),
        a.out.join("results.json").display(),
        a.out.join("routing.svg").display(),
        a.out.join("loss_curves.svg").display()
    );
    Ok(())
}
