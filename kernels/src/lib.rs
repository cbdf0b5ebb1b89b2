//! llmft-kernels: the CUDA C sources of llmft and their run-time compiler.
//!
//! Every `kernels/cuda/*.cu` file is embedded in the crate (prefixed with
//! `common.cuh`, which carries its own bf16/f16 helpers so no CUDA header is
//! required). [`Compiler`] turns a source into a cubin for one exact GPU
//! architecture with NVRTC and caches the result on disk, keyed by the source
//! hash, the architecture and the NVRTC version.
//!
//! ```no_run
//! use llmft_kernels::{Compiler, CompilerOptions, source};
//! let compiler = Compiler::new(CompilerOptions::default())?;
//! let cubin = compiler.compile(source("elementwise").unwrap(), (9, 0))?;
//! assert!(!cubin.is_empty());
//! # Ok::<(), llmft_kernels::Error>(())
//! ```

use std::ffi::{c_char, CString};
use std::path::{Path, PathBuf};

use cudarc::nvrtc::sys as nvrtc;
use sha2::{Digest, Sha256};

#[cfg(all(feature = "cuda-12", feature = "cuda-13"))]
compile_error!(
    "llmft is built for one CUDA version: both `cuda-12` and `cuda-13` are on. \
     For the CUDA 12 build pass `--no-default-features --features cuda-12` \
     (with `--workspace`: `--no-default-features --features llmft/cuda-12`)."
);

pub mod arch;
pub mod cuda_build;

/// One embedded kernel source file.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// File stem, e.g. `"rmsnorm"` for `cuda/rmsnorm.cu`.
    pub name: &'static str,
    /// Full text handed to NVRTC (`common.cuh` followed by the file).
    pub code: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/sources.rs"));

/// The embedded source named `name` (file stem), if any.
pub fn source(name: &str) -> Option<&'static KernelSource> {
    SOURCES.iter().find(|s| s.name == name)
}

/// Errors of the kernel compiler.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// libnvrtc could not be loaded.
    #[error(
        "NVRTC (libnvrtc.so) was not found: install the CUDA toolkit or the pip wheel \
         nvidia-cuda-nvrtc and put its lib folder on LD_LIBRARY_PATH"
    )]
    NvrtcMissing,
    /// NVRTC rejected a source; the log says why.
    #[error("kernel `{name}` failed to compile for sm_{arch}:\n{log}")]
    Compile {
        /// Source name.
        name: String,
        /// Architecture as `major*10+minor`.
        arch: u32,
        /// NVRTC's log.
        log: String,
    },
    /// An NVRTC call failed outside compilation.
    #[error("NVRTC call {call} failed: {code:?}")]
    Nvrtc {
        /// The function that failed.
        call: &'static str,
        /// Its result code.
        code: nvrtc::nvrtcResult,
    },
    /// `LLMFT_KERNEL_ARCH` names no usable kernel path.
    #[error("LLMFT_KERNEL_ARCH=`{value}`: {why}")]
    BadArchOverride {
        /// The variable's value.
        value: String,
        /// Why it cannot be used.
        why: String,
    },
    /// The loaded NVRTC cannot compile for the device.
    #[error(
        "NVRTC {nvrtc} cannot compile for sm_{arch} (CUDA 13 dropped Maxwell, Pascal and \
         Volta): use llmft's CUDA 12 build with CUDA 12's NVRTC (see the README, \"CUDA 12 or 13?\")"
    )]
    ArchTooOld {
        /// NVRTC major version.
        nvrtc: i32,
        /// Architecture as `major*10+minor`.
        arch: u32,
    },
    /// No kernel source with this name is embedded.
    #[error("no kernel source named `{0}`")]
    UnknownSource(String),
    /// The on-disk cache could not be written.
    #[error("kernel cache {path}: {source}")]
    Cache {
        /// The file at fault.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// How the compiler finds headers and where it caches cubins.
#[derive(Debug, Clone, Default)]
pub struct CompilerOptions {
    /// Extra include folders, searched before the discovered ones.
    pub include_dirs: Vec<PathBuf>,
    /// Cache folder; `None` means `$LLMFT_KERNEL_CACHE`, else
    /// `$XDG_CACHE_HOME/llmft/kernels`, else `~/.cache/llmft/kernels`.
    pub cache_dir: Option<PathBuf>,
    /// Skip the on-disk cache entirely (memory caching is the caller's).
    pub no_disk_cache: bool,
}

/// NVRTC front end: compiles embedded sources to cubins, with a disk cache.
#[derive(Debug, Clone)]
pub struct Compiler {
    include_dirs: Vec<PathBuf>,
    cache_dir: Option<PathBuf>,
    version: (i32, i32),
}

fn check(call: &'static str, code: nvrtc::nvrtcResult) -> Result<()> {
    if code == nvrtc::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(Error::Nvrtc { call, code })
    }
}

/// Whether libnvrtc can be loaded on this machine (never panics).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library by its known names.
    unsafe { nvrtc::is_culib_present() }
}

/// NVRTC's version, or [`Error::NvrtcMissing`].
pub fn nvrtc_version() -> Result<(i32, i32)> {
    if !nvrtc_available() {
        return Err(Error::NvrtcMissing);
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked above); both pointers are valid.
    check("nvrtcVersion", unsafe {
        nvrtc::nvrtcVersion(&mut major, &mut minor)
    })?;
    Ok((major, minor))
}

/// The oldest architecture (`major*10+minor`) NVRTC of major version
/// `nvrtc_major` compiles for.
pub fn nvrtc_min_arch(nvrtc_major: i32) -> u32 {
    if nvrtc_major >= 13 {
        75
    } else {
        50
    }
}

/// CUDA include folders found on this machine, most specific first:
/// `$CUDA_HOME/include`, `$CUDA_PATH/include`, `/usr/local/cuda/include`,
/// `/usr/local/cuda-*/targets/*/include`, and pip's `nvidia/cu*/include`
/// (beside a libnvrtc found on `LD_LIBRARY_PATH`, or in `$LLMFT_CUDA_INCLUDE`).
/// Only folders holding `cuda_bf16.h` are returned.
pub fn find_cuda_include_dirs() -> Vec<PathBuf> {
    let mut cands: Vec<PathBuf> = Vec::new();
    if let Ok(p) = std::env::var("LLMFT_CUDA_INCLUDE") {
        cands.extend(std::env::split_paths(&p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(p) = std::env::var(var) {
            cands.push(Path::new(&p).join("include"));
            cands.push(Path::new(&p).join("targets/x86_64-linux/include"));
        }
    }
    if let Ok(p) = std::env::var("LD_LIBRARY_PATH") {
        for dir in std::env::split_paths(&p) {
            // pip wheels: .../nvidia/cu13/lib next to .../nvidia/cu13/include
            if let Some(parent) = dir.parent() {
                cands.push(parent.join("include"));
            }
        }
    }
    cands.push(PathBuf::from("/usr/local/cuda/include"));
    for pattern_root in ["/usr/local", "/opt"] {
        if let Ok(rd) = std::fs::read_dir(pattern_root) {
            let mut cuda_dirs: Vec<PathBuf> = rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("cuda"))
                })
                .collect();
            cuda_dirs.sort();
            cuda_dirs.reverse();
            for d in cuda_dirs {
                cands.push(d.join("include"));
                if let Ok(targets) = std::fs::read_dir(d.join("targets")) {
                    for t in targets.flatten() {
                        cands.push(t.path().join("include"));
                    }
                }
            }
        }
    }
    let mut out: Vec<PathBuf> = Vec::new();
    for c in cands {
        if c.join("cuda_bf16.h").is_file() && !out.contains(&c) {
            out.push(c);
        }
    }
    out
}

fn default_cache_dir() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("LLMFT_KERNEL_CACHE") {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("llmft").join("kernels"))
}

impl Compiler {
    /// Loads NVRTC and discovers include folders. Fails with
    /// [`Error::NvrtcMissing`] (never a panic) where NVRTC is absent.
    pub fn new(opts: CompilerOptions) -> Result<Self> {
        let version = nvrtc_version()?;
        let mut include_dirs = opts.include_dirs;
        for d in find_cuda_include_dirs() {
            if !include_dirs.contains(&d) {
                include_dirs.push(d);
            }
        }
        let cache_dir = if opts.no_disk_cache {
            None
        } else {
            opts.cache_dir.or_else(default_cache_dir)
        };
        Ok(Self {
            include_dirs,
            cache_dir,
            version,
        })
    }

    /// NVRTC version in use.
    pub fn version(&self) -> (i32, i32) {
        self.version
    }

    /// Whether this NVRTC compiles for `arch` (`major*10+minor`): NVRTC 13
    /// starts at sm_75, NVRTC 12 at sm_50.
    pub fn supports(&self, arch: u32) -> bool {
        arch >= nvrtc_min_arch(self.version.0)
    }

    /// The architectures of [`arch::SUPPORTED_ARCHS`] this NVRTC compiles for.
    pub fn archs(&self) -> Vec<u32> {
        arch::SUPPORTED_ARCHS
            .iter()
            .copied()
            .filter(|&a| self.supports(a))
            .collect()
    }

    /// Include folders passed to NVRTC.
    pub fn include_dirs(&self) -> &[PathBuf] {
        &self.include_dirs
    }

    fn options(&self, arch: u32, path: u32) -> Vec<String> {
        let mut o = vec![
            format!("--gpu-architecture=sm_{arch}"),
            format!("-DLLMFT_PATH_ARCH={}", path * 10),
            "--std=c++17".to_string(),
            "--device-as-default-execution-space".to_string(),
            "-lineinfo".to_string(),
        ];
        o.extend(
            self.include_dirs
                .iter()
                .map(|d| format!("-I{}", d.display())),
        );
        o
    }

    /// The cache key of `src` for `arch`: source hash, architecture, NVRTC version.
    pub fn cache_key(&self, src: &KernelSource, arch: (u32, u32)) -> String {
        self.cache_key_path(src, arch, arch.0 * 10 + arch.1)
    }

    /// The cache key of `src` for `arch` taking the code paths of `path`
    /// (`major*10+minor`); a `-p{path}` tag marks an older path.
    pub fn cache_key_path(&self, src: &KernelSource, arch: (u32, u32), path: u32) -> String {
        let arch = arch.0 * 10 + arch.1;
        let tag = if path == arch {
            String::new()
        } else {
            format!("-p{path}")
        };
        let mut h = Sha256::new();
        h.update(src.code.as_bytes());
        // Include folders do not enter the key: our sources include no headers.
        let digest = h.finalize();
        let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "{}-{hex}-sm_{arch}{tag}-nvrtc{}.{}",
            src.name, self.version.0, self.version.1
        )
    }

    /// Compiles `src` to a cubin for compute capability `arch` (e.g. `(9, 0)`),
    /// returning the cached file when one exists.
    pub fn compile(&self, src: &KernelSource, arch: (u32, u32)) -> Result<Vec<u8>> {
        self.compile_path(src, arch, arch.0 * 10 + arch.1)
    }

    /// Compiles `src` for compute capability `arch` with the code paths of
    /// the older architecture `kernel_path` (`major*10+minor`, see
    /// [`arch::KernelPath`]), returning the cached file when one exists.
    pub fn compile_path(
        &self,
        src: &KernelSource,
        arch: (u32, u32),
        kernel_path: u32,
    ) -> Result<Vec<u8>> {
        let path = self.cache_dir.as_ref().map(|d| {
            d.join(format!(
                "{}.cubin",
                self.cache_key_path(src, arch, kernel_path)
            ))
        });
        if let Some(p) = &path {
            if let Ok(bytes) = std::fs::read(p) {
                if !bytes.is_empty() {
                    return Ok(bytes);
                }
            }
        }
        let cubin = self.compile_uncached_path(src, arch, kernel_path)?;
        if let (Some(p), Some(dir)) = (&path, &self.cache_dir) {
            // Write under a temporary name and rename, so a concurrent reader
            // never sees a half-written cubin. Failure to cache is not fatal.
            let _ = std::fs::create_dir_all(dir);
            let tmp = p.with_extension(format!("tmp{}", std::process::id()));
            if std::fs::write(&tmp, &cubin).is_ok() {
                let _ = std::fs::rename(&tmp, p);
            }
        }
        Ok(cubin)
    }

    /// Compiles without consulting the disk cache.
    pub fn compile_uncached(&self, src: &KernelSource, arch: (u32, u32)) -> Result<Vec<u8>> {
        self.compile_uncached_path(src, arch, arch.0 * 10 + arch.1)
    }

    /// [`Compiler::compile_path`] without the disk cache.
    pub fn compile_uncached_path(
        &self,
        src: &KernelSource,
        arch: (u32, u32),
        kernel_path: u32,
    ) -> Result<Vec<u8>> {
        let arch_n = arch.0 * 10 + arch.1;
        if !self.supports(arch_n) {
            return Err(Error::ArchTooOld {
                nvrtc: self.version.0,
                arch: arch_n,
            });
        }
        let code = CString::new(src.code).expect("kernel sources contain no NUL byte");
        let name = CString::new(format!("{}.cu", src.name)).expect("no NUL in name");
        let opts: Vec<CString> = self
            .options(arch_n, kernel_path.min(arch_n))
            .into_iter()
            .map(|o| CString::new(o).expect("no NUL in options"))
            .collect();
        let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
        let mut prog: nvrtc::nvrtcProgram = std::ptr::null_mut();
        // SAFETY: NVRTC is loaded (Compiler::new checked it); all strings are
        // NUL-terminated and outlive the calls; the program is destroyed below.
        unsafe {
            check(
                "nvrtcCreateProgram",
                nvrtc::nvrtcCreateProgram(
                    &mut prog,
                    code.as_ptr(),
                    name.as_ptr(),
                    0,
                    std::ptr::null(),
                    std::ptr::null(),
                ),
            )?;
            let res = nvrtc::nvrtcCompileProgram(prog, opt_ptrs.len() as i32, opt_ptrs.as_ptr());
            let out = if res != nvrtc::nvrtcResult::NVRTC_SUCCESS {
                let mut log_len = 0usize;
                nvrtc::nvrtcGetProgramLogSize(prog, &mut log_len);
                let mut log = vec![0u8; log_len.max(1)];
                nvrtc::nvrtcGetProgramLog(prog, log.as_mut_ptr() as *mut c_char);
                let log = String::from_utf8_lossy(&log)
                    .trim_end_matches('\0')
                    .to_string();
                Err(Error::Compile {
                    name: src.name.to_string(),
                    arch: arch_n,
                    log,
                })
            } else {
                let mut size = 0usize;
                check(
                    "nvrtcGetCUBINSize",
                    nvrtc::nvrtcGetCUBINSize(prog, &mut size),
                )
                .and_then(|_| {
                    let mut buf = vec![0u8; size];
                    check(
                        "nvrtcGetCUBIN",
                        nvrtc::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut c_char),
                    )?;
                    Ok(buf)
                })
            };
            nvrtc::nvrtcDestroyProgram(&mut prog);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_embedded_with_common_header() {
        assert!(!SOURCES.is_empty());
        for s in SOURCES {
            assert!(
                s.code.contains("bf16_to_f32"),
                "{} lacks common.cuh",
                s.name
            );
            assert!(
                s.code.contains("extern \"C\""),
                "{} exports no kernel",
                s.name
            );
        }
        assert!(source("no-such-kernel").is_none());
    }

    #[test]
    fn cache_key_changes_with_arch() {
        let c = Compiler {
            include_dirs: vec![],
            cache_dir: None,
            version: (13, 0),
        };
        let s = &SOURCES[0];
        assert_ne!(c.cache_key(s, (8, 0)), c.cache_key(s, (9, 0)));
        assert!(c.cache_key(s, (9, 0)).ends_with("sm_90-nvrtc13.0"));
    }

    /// Compiles every kernel for every architecture of
    /// [`arch::SUPPORTED_ARCHS`] the loaded NVRTC supports (NVRTC 13: sm_75
    /// to sm_90; NVRTC 12: sm_61 to sm_90), and for sm_90 with the kernel
    /// paths of the ones it cannot target (what `LLMFT_KERNEL_ARCH=61`/`70`
    /// runs on an H100/H200). Each
    /// kernel × architecture is named in the output and in the failures.
    /// Needs libnvrtc (CI installs pip's wheels); where it is absent the test
    /// says so and returns, unless `LLMFT_REQUIRE_NVRTC` is set (`1`: NVRTC
    /// must be present; `12`/`13`: and of that major version).
    #[test]
    fn every_kernel_compiles_for_every_supported_arch() {
        let require = std::env::var("LLMFT_REQUIRE_NVRTC").ok();
        let compiler = match Compiler::new(CompilerOptions {
            no_disk_cache: true,
            ..Default::default()
        }) {
            Ok(c) => c,
            Err(Error::NvrtcMissing) if require.is_none() => {
                eprintln!("skipping: NVRTC not found (set LLMFT_REQUIRE_NVRTC=1 to fail instead)");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let (major, minor) = compiler.version();
        if let Some(want) = require.as_deref().and_then(|r| r.parse::<i32>().ok()) {
            if want > 1 {
                assert_eq!(
                    major, want,
                    "LLMFT_REQUIRE_NVRTC={want} but NVRTC {major}.{minor} was loaded"
                );
            }
        }
        let mut jobs: Vec<(&KernelSource, u32, u32)> = Vec::new();
        let archs = compiler.archs();
        for s in SOURCES {
            for &a in &archs {
                jobs.push((s, a, a));
            }
            // The paths of the architectures this NVRTC cannot target (sm_61
            // and sm_70 under NVRTC 13), compiled for sm_90 as an H100/H200
            // runs them; the other paths are the native compiles above.
            for p in [61, 70].into_iter().filter(|&p| !compiler.supports(p)) {
                jobs.push((s, 90, p));
            }
        }
        let label = |(s, a, p): &(&KernelSource, u32, u32)| {
            if a == p {
                format!("{} sm_{a}", s.name)
            } else {
                format!("{} sm_{a} (sm_{p} path)", s.name)
            }
        };
        let next = std::sync::atomic::AtomicUsize::new(0);
        let failures = std::sync::Mutex::new(Vec::new());
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(8));
        let t0 = std::time::Instant::now();
        std::thread::scope(|sc| {
            for _ in 0..threads {
                sc.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    let (s, a, p) = *job;
                    let t = std::time::Instant::now();
                    let r = compiler.compile_uncached_path(s, (a / 10, a % 10), p);
                    let what = label(job);
                    match r {
                        Ok(c) if c.starts_with(b"\x7fELF") => {
                            eprintln!("ok   {what} ({:.1} s)", t.elapsed().as_secs_f64())
                        }
                        Ok(_) => failures
                            .lock()
                            .unwrap()
                            .push(format!("{what}: NVRTC returned no ELF cubin")),
                        Err(e) => failures.lock().unwrap().push(format!("{what}: {e}")),
                    }
                });
            }
        });
        let failures = failures.into_inner().unwrap();
        eprintln!(
            "NVRTC {major}.{minor}: {} kernel × architecture compiles in {:.0} s, {} failed",
            jobs.len(),
            t0.elapsed().as_secs_f64(),
            failures.len()
        );
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn nvrtc_13_starts_at_turing() {
        let c = |v| Compiler {
            include_dirs: vec![],
            cache_dir: None,
            version: (v, 0),
        };
        assert_eq!(c(13).archs(), vec![75, 80, 86, 89, 90]);
        assert_eq!(c(12).archs(), vec![61, 70, 75, 80, 86, 89, 90]);
        let e = c(13)
            .compile_uncached(source("rope").unwrap(), (7, 0))
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::ArchTooOld {
                    nvrtc: 13,
                    arch: 70
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("CUDA 12 build"));
    }

    #[test]
    fn an_older_path_has_its_own_cache_key() {
        let c = Compiler {
            include_dirs: vec![],
            cache_dir: None,
            version: (13, 0),
        };
        let s = &SOURCES[0];
        assert_eq!(c.cache_key(s, (9, 0)), c.cache_key_path(s, (9, 0), 90));
        let k = c.cache_key_path(s, (9, 0), 70);
        assert!(k.ends_with("sm_90-p70-nvrtc13.0"), "{k}");
    }
}
