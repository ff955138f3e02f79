//! `bitnet serve` (being built).

use anyhow::Result;
use clap::Args;

use crate::common::ModelArgs;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
}

pub fn run(a: ServeArgs) -> Result<()> {
    anyhow::bail!(
        "bitnet serve is not available in this build (model {})",
        a.model.model
    )
}
