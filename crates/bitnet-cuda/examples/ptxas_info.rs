//! Prints ptxas' register and spill report of every kernel, compiled by NVRTC for an
//! architecture (default sm_90) without a device:
//! `BITNET_NVRTC_DIR=... cargo run -p bitnet-cuda --features cuda --example ptxas_info -- 90 [f16]`

fn main() {
    let mut args = std::env::args().skip(1);
    let arch = args.next().unwrap_or_else(|| "90".into());
    let kv_f16 = args.next().is_some_and(|a| a == "f16");
    let a: i32 = arch.parse().expect("architecture like 90");
    let src = bitnet_cuda::gpu::kernel_source(kv_f16);
    let opts = ["--ptxas-options=-v".to_string()];
    match bitnet_cuda::nvrtc::compile(&src, (a / 10, a % 10), false, &opts) {
        Ok(img) => println!("{}", img.log),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}
