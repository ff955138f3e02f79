//! Compiles every kernel with NVRTC for sm_90 (both KV types) without a device. Runs wherever
//! NVRTC can be found (BITNET_NVRTC_DIR, LD_LIBRARY_PATH, a CUDA toolkit or a PyTorch wheel);
//! prints "skipped: ..." elsewhere.

#[cfg(not(feature = "_cuda"))]
#[test]
fn nvrtc_compiles_the_kernels() {
    println!("skipped: no CUDA device (built without the cuda feature)");
}

#[cfg(feature = "_cuda")]
#[test]
fn nvrtc_compiles_the_kernels() {
    if let Err(why) = bitnet_cuda::nvrtc_available() {
        println!("skipped: NVRTC not found ({why})");
        return;
    }
    let v = bitnet_cuda::nvrtc::version().unwrap();
    println!("NVRTC {}.{}", v.0, v.1);
    for kv_f16 in [false, true] {
        for ptx in [false, true] {
            let img = bitnet_cuda::gpu::compile_only((9, 0), kv_f16, ptx)
                .unwrap_or_else(|e| panic!("kv_f16={kv_f16} ptx={ptx}: {e}"));
            assert!(!img.bytes.is_empty());
            if !img.log.trim().is_empty() {
                println!("NVRTC log (kv_f16={kv_f16}, ptx={ptx}):\n{}", img.log);
            }
            if ptx {
                let text = String::from_utf8_lossy(&img.bytes);
                for name in bitnet_cuda::gpu::KERNEL_NAMES {
                    assert!(text.contains(&format!(".entry {name}(")), "kernel {name} missing from the PTX");
                }
            }
            println!(
                "kv_f16={kv_f16} {}: {} bytes{}",
                if ptx { "ptx" } else { "cubin" },
                img.bytes.len(),
                if img.cached { " (cached)" } else { "" }
            );
        }
    }
}
