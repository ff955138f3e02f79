//! Run-time compilation of the CUDA C kernels with NVRTC, cached on disk.
//!
//! NVRTC is not part of the driver. It is found, in order: already loadable by name (e.g. on
//! `LD_LIBRARY_PATH`); in `$BITNET_NVRTC_DIR`; in a CUDA toolkit (`$CUDA_HOME`, `/usr/local/cuda`);
//! in a PyTorch / `nvidia-cuda-nvrtc` wheel (`site-packages/nvidia/cu13/lib`). A library found by
//! path is loaded by that path before cudarc asks for it by name: the dynamic loader then hands
//! cudarc the already loaded library (same soname), so no `LD_LIBRARY_PATH` is needed.
//!
//! Kernels are compiled straight to a cubin for the device's architecture (`sm_90` on H100/H200):
//! SASS needs no PTX JIT in the driver, so an NVRTC newer than the driver is fine (CUDA minor
//! version compatibility), whereas PTX of a newer ISA than the driver's is refused. Only if the
//! cubin cannot be made or loaded do we fall back to PTX, with its `.version` lowered to the
//! driver's ISA. Images are cached under `$BITNET_CUDA_CACHE` (default
//! `$XDG_CACHE_HOME/bitnet-cuda` or `~/.cache/bitnet-cuda`; `off` disables), keyed by a hash of
//! the source, the options, the NVRTC version and the architecture.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nvrtc::{result as nr, sys as ns};

use crate::error::{Error, Result};

/// The soname major of the NVRTC we look for (the bindings' CUDA major version).
#[cfg(feature = "cuda")]
const NVRTC_MAJOR: &str = "13";
#[cfg(not(feature = "cuda"))]
const NVRTC_MAJOR: &str = "12";

/// Directories that may hold `libnvrtc.so.<major>`.
fn candidate_dirs() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(d) = std::env::var_os("BITNET_NVRTC_DIR") {
        v.push(PathBuf::from(d));
    }
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(d) = std::env::var_os(var) {
            v.push(PathBuf::from(&d).join("lib64"));
            v.push(PathBuf::from(&d).join("lib"));
        }
    }
    v.push(PathBuf::from("/usr/local/cuda/lib64"));
    // Python wheels: nvidia/cu13/lib (CUDA 13 wheels, PyTorch cu13), nvidia/cuda_nvrtc/lib (12).
    let wheel_subdirs = ["nvidia/cu13/lib", "nvidia/cuda_nvrtc/lib"];
    let mut roots: Vec<PathBuf> = vec![
        "/usr/lib".into(),
        "/usr/local/lib".into(),
        "/usr/lib64".into(),
        "/opt/conda/lib".into(),
        "/root/.local/lib".into(),
    ];
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(d) = std::env::var_os(var) {
            roots.push(PathBuf::from(d).join("lib"));
        }
    }
    if let Some(h) = std::env::var_os("HOME") {
        roots.push(PathBuf::from(h).join(".local/lib"));
    }
    for root in roots {
        let Ok(rd) = std::fs::read_dir(&root) else {
            continue;
        };
        let mut pys: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("python3")))
            .collect();
        pys.sort();
        for py in pys.iter().rev() {
            for pk in ["site-packages", "dist-packages"] {
                for sub in wheel_subdirs {
                    v.push(py.join(pk).join(sub));
                }
            }
        }
    }
    v
}

fn find_in(dir: &Path) -> Option<(PathBuf, Vec<PathBuf>)> {
    let lib = dir.join(format!("libnvrtc.so.{NVRTC_MAJOR}"));
    if !lib.is_file() {
        return None;
    }
    let builtins: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("libnvrtc-builtins.so.{NVRTC_MAJOR}")))
        })
        .collect();
    Some((lib, builtins))
}

/// Makes NVRTC loadable by cudarc (see the module docs). Cached: the search runs once.
pub fn ensure_loaded() -> std::result::Result<(), String> {
    static R: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    R.get_or_init(|| {
        if unsafe { ns::is_culib_present() } {
            return Ok(());
        }
        let dirs = candidate_dirs();
        for d in &dirs {
            let Some((lib, builtins)) = find_in(d) else {
                continue;
            };
            // The builtins first: libnvrtc opens them by soname when it compiles.
            for b in builtins {
                if let Ok(l) = unsafe { libloading::Library::new(&b) } {
                    std::mem::forget(l);
                }
            }
            match unsafe { libloading::Library::new(&lib) } {
                Ok(l) => std::mem::forget(l),
                Err(e) => return Err(format!("{}: {e}", lib.display())),
            }
            if unsafe { ns::is_culib_present() } {
                return Ok(());
            }
            return Err(format!("{} was loaded but cudarc still cannot open NVRTC by name", lib.display()));
        }
        Err(format!(
            "NVRTC (libnvrtc.so.{NVRTC_MAJOR}) not found: set BITNET_NVRTC_DIR to the folder holding it \
             (a CUDA toolkit's lib64, or a PyTorch installation's site-packages/nvidia/cu13/lib), or \
             put that folder on LD_LIBRARY_PATH"
        ))
    })
    .clone()
}

/// NVRTC's version (major, minor).
pub fn version() -> Result<(i32, i32)> {
    ensure_loaded().map_err(Error::Unavailable)?;
    let (mut a, mut b) = (0, 0);
    unsafe { ns::nvrtcVersion(&mut a, &mut b) }.result().map_err(|e| Error::Nvrtc(format!("nvrtcVersion: {e:?}")))?;
    Ok((a, b))
}

/// FNV-1a, 64-bit: a stable hash for cache keys.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

fn cache_dir() -> Option<PathBuf> {
    match std::env::var("BITNET_CUDA_CACHE") {
        Ok(v) if v == "off" || v == "0" => return None,
        Ok(v) if !v.is_empty() => return Some(PathBuf::from(v)),
        _ => {}
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(x).join("bitnet-cuda"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        return Some(PathBuf::from(h).join(".cache/bitnet-cuda"));
    }
    Some(std::env::temp_dir().join("bitnet-cuda-cache"))
}

/// What [`compile`] produced.
#[derive(Debug, Clone)]
pub struct Image {
    /// A cubin, or a NUL-terminated PTX text.
    pub bytes: Vec<u8>,
    pub is_cubin: bool,
    /// Where it was cached (read or written), if anywhere.
    pub cache_path: Option<PathBuf>,
    /// Whether it came from the cache.
    pub cached: bool,
    /// NVRTC's log (warnings), empty when it came from the cache.
    pub log: String,
}

/// Options common to every compile (see the kernel source's header comment).
fn base_options() -> Vec<String> {
    vec!["--fmad=false".into(), "--std=c++17".into(), "-lineinfo".into()]
}

fn nvrtc_compile(src: &str, opts: &[String], cubin: bool) -> Result<(Vec<u8>, String)> {
    let csrc = CString::new(src).map_err(|_| Error::Internal("kernel source has a NUL".into()))?;
    let name = CString::new("bitnet_kernels.cu").unwrap();
    let prog =
        nr::create_program(&csrc, Some(&name)).map_err(|e| Error::Nvrtc(format!("nvrtcCreateProgram: {e:?}")))?;
    let r = unsafe { nr::compile_program(prog, opts) };
    let log = unsafe { nr::get_program_log(prog) }
        .map(|v| {
            let bytes: Vec<u8> = v.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
            String::from_utf8_lossy(&bytes).into_owned()
        })
        .unwrap_or_default();
    let out = match r {
        Err(e) => Err(Error::Nvrtc(format!("compiling the kernels failed ({e:?}) with options {opts:?}:\n{log}"))),
        Ok(()) if cubin => {
            let mut size = 0usize;
            unsafe { ns::nvrtcGetCUBINSize(prog, &mut size) }
                .result()
                .map_err(|e| Error::Nvrtc(format!("nvrtcGetCUBINSize: {e:?}")))
                .and_then(|()| {
                    if size == 0 {
                        return Err(Error::Nvrtc("NVRTC produced an empty cubin".into()));
                    }
                    let mut buf = vec![0u8; size];
                    unsafe { ns::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut _) }
                        .result()
                        .map_err(|e| Error::Nvrtc(format!("nvrtcGetCUBIN: {e:?}")))?;
                    Ok(buf)
                })
        }
        Ok(()) => unsafe { nr::get_ptx(prog) }
            .map(|v| {
                let mut b: Vec<u8> = v.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
                b.push(0);
                b
            })
            .map_err(|e| Error::Nvrtc(format!("nvrtcGetPTX: {e:?}"))),
    };
    unsafe {
        let _ = nr::destroy_program(prog);
    }
    out.map(|b| (b, log))
}

/// Compiles `src` for compute capability `arch`: a cubin (`ptx == false`) or PTX.
/// `extra` options are appended (and part of the cache key).
pub fn compile(src: &str, arch: (i32, i32), ptx: bool, extra: &[String]) -> Result<Image> {
    ensure_loaded().map_err(Error::Unavailable)?;
    let (vmaj, vmin) = version()?;
    let mut opts = base_options();
    let target = if ptx {
        format!("--gpu-architecture=compute_{}{}", arch.0, arch.1)
    } else {
        format!("--gpu-architecture=sm_{}{}", arch.0, arch.1)
    };
    opts.push(target);
    opts.extend(extra.iter().cloned());
    let key = fnv1a(&[src.as_bytes(), opts.join(" ").as_bytes(), format!("nvrtc {vmaj}.{vmin}").as_bytes()]);
    let ext = if ptx { "ptx" } else { "cubin" };
    let file = format!("kernels-{key:016x}-sm_{}{}.{ext}", arch.0, arch.1);
    let dir = cache_dir();
    if let Some(d) = &dir {
        let p = d.join(&file);
        if let Ok(bytes) = std::fs::read(&p) {
            if !bytes.is_empty() && (!ptx || bytes.last() == Some(&0)) {
                return Ok(Image { bytes, is_cubin: !ptx, cache_path: Some(p), cached: true, log: String::new() });
            }
        }
    }
    let (bytes, log) = nvrtc_compile(src, &opts, !ptx)?;
    let mut cache_path = None;
    if let Some(d) = dir {
        // Write to a temporary name, then rename: concurrent processes never see half a file.
        let p = d.join(&file);
        let tmp = d.join(format!("{file}.{}.tmp", std::process::id()));
        if std::fs::create_dir_all(&d).is_ok()
            && std::fs::write(&tmp, &bytes).is_ok()
            && std::fs::rename(&tmp, &p).is_ok()
        {
            cache_path = Some(p);
        } else {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok(Image { bytes, is_cubin: !ptx, cache_path, cached: false, log })
}

/// The highest PTX ISA a driver of `cuDriverGetVersion` value `v` (e.g. 13000) accepts.
pub fn driver_ptx_isa(v: i32) -> Option<(u32, u32)> {
    let (maj, min) = (v / 1000, (v % 1000) / 10);
    Some(match (maj, min) {
        (12, 0) => (8, 0),
        (12, 1) => (8, 1),
        (12, 2) => (8, 2),
        (12, 3) => (8, 3),
        (12, 4) => (8, 4),
        (12, 5) | (12, 6) => (8, 5),
        (12, 7) | (12, 8) => (8, 7),
        (12, 9) => (8, 8),
        (13, m) => (9, m as u32),
        _ => return None,
    })
}

/// Lowers the `.version X.Y` line of a PTX text to `isa` when it is newer (our kernels use no
/// instruction newer than PTX 7.x).
pub fn lower_ptx_version(ptx: &[u8], isa: (u32, u32)) -> Vec<u8> {
    let text = String::from_utf8_lossy(ptx.strip_suffix(&[0]).unwrap_or(ptx)).into_owned();
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix(".version ") {
            let mut it = rest.trim().split('.');
            let a = it.next().and_then(|s| s.parse::<u32>().ok());
            let b = it.next().and_then(|s| s.parse::<u32>().ok());
            if let (Some(a), Some(b)) = (a, b) {
                if (a, b) > isa {
                    out.push_str(&format!(".version {}.{}\n", isa.0, isa.1));
                    continue;
                }
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    let mut v = out.into_bytes();
    v.push(0);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptx_version_is_lowered_only_when_newer() {
        let ptx = b"//\n.version 9.1\n.target sm_90\n\0";
        let out = lower_ptx_version(ptx, (9, 0));
        assert_eq!(out, b"//\n.version 9.0\n.target sm_90\n\0");
        let out = lower_ptx_version(b".version 8.0\n", (9, 0));
        assert_eq!(out, b".version 8.0\n\0");
        assert_eq!(driver_ptx_isa(13000), Some((9, 0)));
        assert_eq!(driver_ptx_isa(12080), Some((8, 7)));
    }

    #[test]
    fn cache_keys_are_stable() {
        assert_eq!(fnv1a(&[b"a", b"b"]), fnv1a(&[b"a", b"b"]));
        assert_ne!(fnv1a(&[b"ab"]), fnv1a(&[b"a", b"b"]));
    }
}
