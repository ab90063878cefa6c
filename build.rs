//! Compiles kernels/*.cu to fatbins (SASS sm_80 + sm_90, PTX compute_90; `*_sm90.cu`: SASS sm_90a
//! only) with nvcc and generates
//! `$OUT_DIR/kernels.rs` (`KERNELS_BUILT` and one `include_bytes!` per module), included by
//! src/backend/cuda/mod.rs. nvcc is looked up in: $NVCC (authoritative when set), $CUDA_HOME/bin,
//! $CUDA_PATH/bin, PATH, then the project-local .cuda/toolkit/bin that tools/setup-cuda.sh
//! installs. No nvcc (or no host gcc): one cargo warning and a CPU-only build. A kernel that fails
//! to compile fails the build. No dependencies.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::{env, fs};

const ARCH_FLAGS: &[&str] = &[
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
];
/// Kernels named `*_sm90.cu` use Hopper-only instructions (wgmma, setmaxnreg): SASS for sm_90a
/// only; the wrappers load them on compute capability 9.0 devices only.
const SM90A_FLAGS: &[&str] = &["-gencode=arch=compute_90a,code=sm_90a"];

fn find_nvcc(root: &Path) -> Result<PathBuf, String> {
    if let Some(p) = env::var_os("NVCC") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("NVCC={} does not exist", p.display()))
        };
    }
    let mut cands: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(|v| env::var_os(v).map(|d| PathBuf::from(d).join("bin/nvcc")))
        .collect();
    if let Some(path) = env::var_os("PATH") {
        cands.extend(env::split_paths(&path).map(|d| d.join("nvcc")));
    }
    cands.push(root.join(".cuda/toolkit/bin/nvcc"));
    cands
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| "nvcc not found (run tools/setup-cuda.sh, or set NVCC)".to_string())
}

fn main() {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kdir = root.join("kernels");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for v in ["NVCC", "CUDA_HOME", "CUDA_PATH", "NVCC_CCBIN"] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    // Only watch the stamp when it exists: a missing path would rerun this script on every build.
    // tools/setup-cuda.sh touches build.rs after a fresh install instead.
    if root.join(".cuda/.installed").exists() {
        println!("cargo:rerun-if-changed=.cuda/.installed");
    }

    let mut sources: Vec<PathBuf> = fs::read_dir(&kdir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    sources.retain(|p| p.extension().is_some_and(|e| e == "cu"));
    sources.sort();

    let gen = out.join("kernels.rs");
    // nvcc preprocesses with the host `gcc` (or NVCC_CCBIN): without one no kernel can build.
    let on_path = |exe: &str| {
        env::var_os("PATH").is_some_and(|p| env::split_paths(&p).any(|d| d.join(exe).is_file()))
    };
    let nvcc = match find_nvcc(&root) {
        Ok(_) if env::var_os("NVCC_CCBIN").is_none() && !on_path("gcc") => {
            Err("nvcc found but no host compiler gcc (install g++, or set NVCC_CCBIN)".to_string())
        }
        other => other,
    };
    let nvcc = match nvcc {
        Ok(p) => p,
        Err(why) => {
            println!("cargo:warning=flexrun: {why}; building without CUDA kernels");
            fs::write(&gen, "pub const KERNELS_BUILT: bool = false;\npub const KERNEL_MODULES: &[(&str, &[u8])] = &[];\n")
                .unwrap();
            return;
        }
    };

    // Compile in parallel on a few threads; each nvcc is itself single-threaded.
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(sources.len())
        .max(1);
    let next = AtomicUsize::new(0);
    let failures: Vec<String> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut errs = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(src) = sources.get(i) else { break };
                        if let Err(e) = compile(&nvcc, &kdir, src, &out) {
                            errs.push(e);
                        }
                    }
                    errs
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    if !failures.is_empty() {
        panic!("nvcc ({}) failed:\n{}", nvcc.display(), failures.join("\n"));
    }

    let mut code = String::from(
        "pub const KERNELS_BUILT: bool = true;\npub const KERNEL_MODULES: &[(&str, &[u8])] = &[\n",
    );
    for src in &sources {
        let stem = src.file_stem().unwrap().to_str().unwrap();
        code += &format!(
            "    ({stem:?}, include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{stem}.fatbin\"))),\n"
        );
    }
    code += "];\n";
    fs::write(&gen, code).unwrap();
}

fn compile(nvcc: &Path, kdir: &Path, src: &Path, out: &Path) -> Result<(), String> {
    let stem = src.file_stem().unwrap().to_str().unwrap();
    let dst = out.join(format!("{stem}.fatbin"));
    let mut cmd = Command::new(nvcc);
    let arch = if stem.ends_with("_sm90") {
        SM90A_FLAGS
    } else {
        ARCH_FLAGS
    };
    cmd.args(["-fatbin", "-O3", "-std=c++17", "-lineinfo"])
        .args(arch)
        .arg("-I")
        .arg(kdir)
        .arg("-o")
        .arg(&dst)
        .arg(src);
    if let Some(cc) = env::var_os("NVCC_CCBIN") {
        cmd.arg("-ccbin").arg(cc);
    }
    let t0 = std::time::Instant::now();
    let o = cmd
        .output()
        .map_err(|e| format!("{}: cannot run nvcc: {e}", src.display()))?;
    if !o.status.success() {
        return Err(format!(
            "{}:\n{}{}",
            src.display(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    for line in String::from_utf8_lossy(&o.stderr)
        .lines()
        .filter(|l| !l.trim().is_empty())
    {
        println!("cargo:warning=nvcc {stem}.cu: {line}");
    }
    // Timing is visible with `cargo build -vv`.
    println!(
        "flexrun: nvcc {stem}.cu in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
