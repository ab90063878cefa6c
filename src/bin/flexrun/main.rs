//! The flexrun command line: parses arguments, calls the library, prints results. Every error
//! is printed as one line on stderr with exit status 1. One file per command group; options that
//! several commands take are declared once (opts.rs).

/// `outln!` / `out!`: `println!` / `print!` that return an error (one line, exit 1) when stdout
/// cannot be written (a full disk, /dev/full) instead of panicking.
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($t)*)
            .map_err(|e| flexrun::Error(format!("cannot write the output: {e}")))?;
    }};
}
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let mut o = std::io::stdout();
        write!(o, $($t)*)
            .and_then(|_| o.flush())
            .map_err(|e| flexrun::Error(format!("cannot write the output: {e}")))?;
    }};
}

mod bench_cmd;
mod data_cmd;
mod demo_cmd;
mod eval_cmd;
mod flex_cmd;
mod model_cmd;
mod opts;
mod serve_cmd;

use clap::{Parser, Subcommand};
use flexrun::error::Result;

#[derive(Parser)]
#[command(
    name = "flexrun",
    version,
    about = "FlexOlmo from scratch: train, merge and serve mixture-of-experts language models"
)]
struct Cli {
    /// Worker threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Corpus tools: the built-in synthetic corpus and token shards.
    #[command(subcommand)]
    Data(data_cmd::DataCmd),
    /// Byte-level BPE tokenizer.
    #[command(subcommand)]
    Tokenizer(data_cmd::TokCmd),
    /// Train a public (dense OLMo-2) model from scratch on prepared data.
    Pretrain(model_cmd::PretrainArgs),
    /// Generate text (or token ids) from a model with a KV cache.
    Generate(model_cmd::GenerateArgs),
    /// Print the logits of one sequence as JSON.
    Logits(model_cmd::LogitsArgs),
    /// Throughput benchmarks.
    #[command(subcommand)]
    Bench(bench_cmd::BenchCmd),
    /// Train one data owner's expert against the frozen public model, on its own data only.
    TrainExpert(flex_cmd::TrainExpertArgs),
    /// Merge the public model and expert artifacts into one FlexOlmo checkpoint (no data needed).
    Merge(flex_cmd::MergeArgs),
    /// Tune only the router rows of a merged model on proxy data (breaks strict opt-out).
    RouterTune(flex_cmd::RouterTuneArgs),
    /// Baseline: fine-tune every weight of the public model on one domain (a dense expert), or
    /// only some of them (`--only`).
    Finetune(flex_cmd::FinetuneArgs),
    /// Baseline: uniform parameter average of dense experts.
    Soup(flex_cmd::SoupArgs),
    /// Baseline: BTX, the dense experts' FFNs (and the public one) as the experts of one MoE,
    /// every other weight averaged, the router trained on public data only.
    Btx(flex_cmd::BtxArgs),
    /// Per-domain held-out loss and task accuracy of a model, expert subset, or BTM ensemble.
    Eval(eval_cmd::EvalArgs),
    /// Per-layer fraction of each domain's tokens routed to each expert: table and SVG heatmap.
    AnalyzeRouting(eval_cmd::RoutingArgs),
    /// Where a model's held-out loss on one domain differs from a reference model's (e.g. a
    /// merged FlexOlmo model and that domain's dense expert), per target token and by how
    /// often the token is a target in public training data.
    Compare(eval_cmd::CompareArgs),
    /// Training-data extraction check: how often sampled continuations of a document's prefix
    /// reproduce the document (FlexOlmo's data extraction check).
    Extract(eval_cmd::ExtractArgs),
    /// The main job: the whole FlexOlmo pipeline on the built-in corpus, with baselines.
    Demo(demo_cmd::DemoArgs),
    /// An OpenAI-compatible HTTP server: continuous batching, and experts opted out per request.
    Serve(serve_cmd::ServeArgs),
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Data(c) => data_cmd::run_data(c),
        Cmd::Tokenizer(c) => data_cmd::run_tokenizer(c),
        Cmd::Pretrain(a) => model_cmd::pretrain(a),
        Cmd::Generate(a) => model_cmd::generate(a),
        Cmd::Logits(a) => model_cmd::logits(a),
        Cmd::Bench(c) => bench_cmd::run(c),
        Cmd::TrainExpert(a) => flex_cmd::train_expert(a),
        Cmd::Merge(a) => flex_cmd::merge(a),
        Cmd::RouterTune(a) => flex_cmd::router_tune(a),
        Cmd::Finetune(a) => flex_cmd::finetune(a),
        Cmd::Soup(a) => flex_cmd::soup(a),
        Cmd::Btx(a) => flex_cmd::btx(a),
        Cmd::Eval(a) => eval_cmd::eval(a),
        Cmd::AnalyzeRouting(a) => eval_cmd::analyze_routing(a),
        Cmd::Compare(a) => eval_cmd::compare(a),
        Cmd::Extract(a) => eval_cmd::extract(a),
        Cmd::Demo(a) => demo_cmd::run(a),
        Cmd::Serve(a) => serve_cmd::serve(a),
    }
}

/// `--help` and `--version` print and exit 0; any other argument error is one line on stderr and
/// exit status 1, like every other error (clap's own report is several lines with exit 2).
fn exit_on_parse_error(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        use std::io::Write as _;
        let shown = e.print().and_then(|_| std::io::stdout().flush());
        if let Err(err) = shown {
            flexrun::note!("error: cannot write the output: {err}");
            std::process::exit(1);
        }
        std::process::exit(0);
    }
    let what = if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        "no command given".to_string()
    } else {
        // clap's first paragraph, on one line: "the following required arguments were not
        // provided: --public <PUBLIC> --data <DATA>".
        let text = e.render().to_string();
        let para: Vec<&str> = text
            .lines()
            .map(str::trim)
            .skip_while(|l| l.is_empty())
            .take_while(|l| !l.is_empty())
            .collect();
        let line = para.join(" ");
        line.strip_prefix("error: ").unwrap_or(&line).to_string()
    };
    // The command the arguments were for, so that its help is one copy-paste away.
    let cmd: Vec<String> = std::env::args()
        .skip(1)
        .take_while(|a| !a.starts_with('-'))
        .take(2)
        .collect();
    let help = match cmd.is_empty() {
        true => "flexrun --help".to_string(),
        false => format!("flexrun {} --help", cmd.join(" ")),
    };
    flexrun::note!("error: {what} (see {help})");
    std::process::exit(1);
}

fn main() {
    // Like other Unix tools, end quietly when the reader of stdout goes away (`flexrun ... | head`)
    // instead of panicking on the broken pipe.
    #[cfg(unix)]
    // SAFETY: restores the default disposition of SIGPIPE, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => exit_on_parse_error(e),
    };
    // Training and evaluation keep their freed activation buffers in the process (see
    // `tune_allocator`); set before the first allocation of any worker thread.
    if matches!(
        cli.cmd,
        Cmd::Pretrain(_)
            | Cmd::TrainExpert(_)
            | Cmd::Finetune(_)
            | Cmd::RouterTune(_)
            | Cmd::Btx(_)
            | Cmd::Demo(_)
            | Cmd::Eval(_)
            | Cmd::Extract(_)
    ) {
        flexrun::backend::cpu::tune_allocator();
    }
    if let Some(t) = cli.threads {
        if let Err(e) = flexrun::limits::check_dim(
            "--threads",
            t,
            flexrun::limits::MAX_THREADS,
            "far beyond any machine",
        ) {
            flexrun::note!("error: {e}");
            std::process::exit(1);
        }
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(t.max(1))
            .build_global()
        {
            flexrun::note!("error: cannot set up {t} threads: {e}");
            std::process::exit(1);
        }
    }
    if let Err(e) = run(cli) {
        flexrun::note!("error: {e}");
        std::process::exit(1);
    }
}
