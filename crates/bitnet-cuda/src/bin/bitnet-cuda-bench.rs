//! `bitnet-cuda-bench`: the CUDA benchmark table (see `bitnet_cuda::bench`), for machines that
//! have a GPU but no Rust toolchain (`tools/gpu-check.sh` runs it).
//!
//! Options: --preset NAME (2b-4t) --seed N --batches 1,8,32 --prompt N (64) --gen N (128)
//! --prefill N (512, 0 skips) --reps N (3) --no-graphs --no-pdl --profile (per-kernel times) --plan exact|fast --device N --json
//!
//! Exit status: 0 after printing the table, or after "skipped: no CUDA device" where none is;
//! 2 on an error.

use bitnet_core::precision::PrecisionPlan;
use bitnet_cuda::bench::{run, BenchOptions};

fn parse_args() -> Result<(BenchOptions, bool), String> {
    let mut o = BenchOptions::default();
    let mut json = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        let num = |s: String, name: &str| s.parse::<usize>().map_err(|_| format!("{name}: not a number: {s}"));
        match a.as_str() {
            "--preset" => o.preset = val("--preset")?,
            "--seed" => o.seed = num(val("--seed")?, "--seed")? as u64,
            "--batches" => {
                o.batches = val("--batches")?
                    .split(',')
                    .map(|s| num(s.trim().to_string(), "--batches"))
                    .collect::<Result<_, _>>()?
            }
            "--prompt" => o.prompt = num(val("--prompt")?, "--prompt")?,
            "--gen" => o.gen = num(val("--gen")?, "--gen")?,
            "--prefill" => o.prefill = num(val("--prefill")?, "--prefill")?,
            "--reps" => o.reps = num(val("--reps")?, "--reps")?,
            "--device" => o.device = num(val("--device")?, "--device")?,
            "--no-graphs" => o.graphs = false,
            "--no-pdl" => o.pdl = false,
            "--profile" => o.profile = true,
            "--plan" => o.plan = PrecisionPlan::from_name(&val("--plan")?).map_err(|e| e.to_string())?,
            "--json" => json = true,
            "-h" | "--help" => {
                println!(
                    "bitnet-cuda-bench [--preset 2b-4t] [--seed N] [--batches 1,8,32] [--prompt 64] \
                     [--gen 128] [--prefill 512] [--reps 3] [--no-graphs] [--no-pdl] [--profile] [--plan exact|fast] \
                     [--device 0] [--json]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok((o, json))
}

fn main() {
    let (o, json) = match parse_args() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    if let Err(why) = bitnet_cuda::cuda_available() {
        println!("skipped: no CUDA device ({why})");
        return;
    }
    match run(&o, &mut |s| eprintln!("{s}")) {
        Ok(r) => {
            println!("{r}");
            if json {
                let rows: Vec<String> = r
                    .rows
                    .iter()
                    .map(|x| {
                        format!(
                            "{{\"what\":\"{}\",\"tok_s\":{:.3},\"ms\":{:.4},\"gb_s\":{}}}",
                            x.what,
                            x.tok_s,
                            x.ms,
                            x.gb_s.map(|g| format!("{g:.3}")).unwrap_or("null".into())
                        )
                    })
                    .collect();
                println!(
                    "{{\"device\":\"{}\",\"copy_gb_s\":{:.3},\"bytes_per_token\":{},\"rows\":[{}]}}",
                    r.device.replace('"', "'"),
                    r.copy_gb_s,
                    r.bytes_per_token,
                    rows.join(",")
                );
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}
