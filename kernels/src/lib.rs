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

    /// Include folders passed to NVRTC.
    pub fn include_dirs(&self) -> &[PathBuf] {
        &self.include_dirs
    }

    fn options(&self, arch: u32) -> Vec<String> {
        let mut o = vec![
            format!("--gpu-architecture=sm_{arch}"),
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
        let arch = arch.0 * 10 + arch.1;
        let mut h = Sha256::new();
        h.update(src.code.as_bytes());
        // Include folders do not enter the key: our sources include no headers.
        let digest = h.finalize();
        let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "{}-{hex}-sm_{arch}-nvrtc{}.{}",
            src.name, self.version.0, self.version.1
        )
    }

    /// Compiles `src` to a cubin for compute capability `arch` (e.g. `(9, 0)`),
    /// returning the cached file when one exists.
    pub fn compile(&self, src: &KernelSource, arch: (u32, u32)) -> Result<Vec<u8>> {
        let path = self
            .cache_dir
            .as_ref()
            .map(|d| d.join(format!("{}.cubin", self.cache_key(src, arch))));
        if let Some(p) = &path {
            if let Ok(bytes) = std::fs::read(p) {
                if !bytes.is_empty() {
                    return Ok(bytes);
                }
            }
        }
        let cubin = self.compile_uncached(src, arch)?;
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
        let arch_n = arch.0 * 10 + arch.1;
        let code = CString::new(src.code).expect("kernel sources contain no NUL byte");
        let name = CString::new(format!("{}.cu", src.name)).expect("no NUL in name");
        let opts: Vec<CString> = self
            .options(arch_n)
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

    /// Compiles every kernel for sm_80 and sm_90. Needs libnvrtc (CI installs
    /// the pip wheel); where it is absent the test says so and returns.
    #[test]
    fn every_kernel_compiles_for_sm80_and_sm90() {
        let compiler = match Compiler::new(CompilerOptions {
            no_disk_cache: true,
            ..Default::default()
        }) {
            Ok(c) => c,
            Err(Error::NvrtcMissing) if std::env::var_os("LLMFT_REQUIRE_NVRTC").is_none() => {
                eprintln!("skipping: NVRTC not found (set LLMFT_REQUIRE_NVRTC=1 to fail instead)");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        for s in SOURCES {
            for arch in [(8, 0), (9, 0)] {
                let cubin = compiler
                    .compile_uncached(s, arch)
                    .unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(
                    &cubin[..4],
                    b"\x7fELF",
                    "{} sm_{}{}",
                    s.name,
                    arch.0,
                    arch.1
                );
            }
        }
    }
}
