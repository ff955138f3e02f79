//! `bitnet`: generate, chat, logits, bench, serve, perplexity, inspect.

mod bench;
mod common;
mod generate;
mod inspect;
mod logits;
mod npy;
mod perplexity;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "bitnet", version, about = "Fast, exact BitNet b1.58 inference", propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text (or token ids) from a prompt, streamed.
    Generate(generate::GenerateArgs),
    /// Interactive chat with the model's chat template.
    Chat(generate::ChatArgs),
    /// One prefill pass; writes the logits of every position as float32 .npy [n_tokens, vocab].
    Logits(logits::LogitsArgs),
    /// Measure prefill and decode speed (tok/s, GB/s, peak RSS).
    Bench(bench::BenchArgs),
    /// Serve an OpenAI-compatible HTTP API with continuous batching.
    Serve(serve::ServeArgs),
    /// Perplexity of a text file, like llama-perplexity.
    Perplexity(perplexity::PerplexityArgs),
    /// Describe a model: format, sizes, tensors, tokenizer, memory.
    Inspect(inspect::InspectArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Generate(a) => generate::run_generate(a),
        Cmd::Chat(a) => generate::run_chat(a),
        Cmd::Logits(a) => logits::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Serve(a) => serve::run(a),
        Cmd::Perplexity(a) => perplexity::run(a),
        Cmd::Inspect(a) => inspect::run(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
