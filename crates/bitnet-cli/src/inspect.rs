//! `bitnet inspect` (being built).

use anyhow::Result;
use clap::Args;

use crate::common::ModelArgs;

#[derive(Args)]
pub struct InspectArgs {
    #[command(flatten)]
    model: ModelArgs,
}

pub fn run(a: InspectArgs) -> Result<()> {
    anyhow::bail!("bitnet inspect is not available in this build (model {})", a.model.model)
}
