//! With the `cuda` feature, compiles `src/cuda/*.cu` to PTX for sm_90 (`binary_wgmma.cu` for
//! sm_90a) with nvcc (found through `NVCC`, `CUDA_HOME`/`CUDA_PATH` or `PATH`); `src/cuda.rs`
//! includes the PTX and loads it at the first call. Without the feature this does nothing, so CPU
//! builds need no CUDA toolkit.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/cuda");
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=CUDA_HOME");
    println!("cargo::rerun-if-env-changed=DELTASERVE_CUDA_ARCH");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| {
            ["CUDA_HOME", "CUDA_PATH"]
                .iter()
                .filter_map(env::var_os)
                .map(|home| PathBuf::from(home).join("bin").join("nvcc"))
                .find(|p| p.exists())
        })
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    // sm_90 (H100/H200) by default; the kernels need sm_80 at least (bf16 mma.sync).
    let arch = env::var("DELTASERVE_CUDA_ARCH").unwrap_or_else(|_| "sm_90".to_string());
    // `binary_wgmma.cu` uses Hopper's warpgroup MMA, which only sm_90a PTX may hold, and sm_90a
    // PTX loads on compute capability 9.0 alone: it is a module of its own, built where the
    // target is sm_90, and `src/cuda.rs` loads it only on such a device. Other targets get an
    // empty module and never route to it.
    let wgmma = (arch == "sm_90" || arch == "sm_90a").then_some("sm_90a");
    for (name, arch) in [
        ("sign_matmul", Some(arch.as_str())),
        ("binary_wgmma", wgmma),
    ] {
        let src = format!("src/cuda/{name}.cu");
        let ptx = out_dir.join(format!("{name}.ptx"));
        let Some(arch) = arch else {
            std::fs::write(&ptx, "").expect("OUT_DIR is writable");
            continue;
        };
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", "-lineinfo"])
            .arg(format!("-arch={arch}"))
            .arg("-o")
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| panic!("could not run {} for {src}: {e}", nvcc.display()));
        assert!(
            status.success(),
            "{} failed on {src} ({status}); set NVCC or CUDA_HOME to a CUDA 12+ toolkit",
            nvcc.display()
        );
    }
}
