//! `bitnet perplexity` (being built).

use anyhow::Result;
use clap::Args;

use crate::common::ModelArgs;

#[derive(Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
}

pub fn run(a: PerplexityArgs) -> Result<()> {
    anyhow::bail!("bitnet perplexity is not available in this build (model {})", a.model.model)
}
