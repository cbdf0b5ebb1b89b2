//! Which CUDA version this binary is built for, and whether a machine's
//! driver and libraries fit it.
//!
//! llmft is built for one CUDA major version, chosen by a cargo feature:
//! `cuda-13` (the default, cudarc's CUDA 13.0 bindings) or `cuda-12` (CUDA
//! 12.8 bindings). A CUDA 13 binary needs a driver of CUDA 13 or newer (driver
//! release 580+); a CUDA 12 binary runs on any CUDA 12.x driver (525+) and on
//! newer ones. [`driver_verdict`] is the pure decision `llmft env` prints.

/// The CUDA major version a binary is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CudaBuild {
    /// Built with `--features cuda-12` (cudarc `cuda-12080`).
    Cuda12,
    /// Built with the default `cuda-13` feature (cudarc `cuda-13000`).
    Cuda13,
}

/// The build of this binary.
#[cfg(feature = "cuda-12")]
pub const BUILD: CudaBuild = CudaBuild::Cuda12;
/// The build of this binary.
#[cfg(not(feature = "cuda-12"))]
pub const BUILD: CudaBuild = CudaBuild::Cuda13;

impl CudaBuild {
    /// CUDA major version of the bindings.
    pub fn major(self) -> i32 {
        match self {
            CudaBuild::Cuda12 => 12,
            CudaBuild::Cuda13 => 13,
        }
    }

    /// The binding version, e.g. `"12.8"`.
    pub fn bindings(self) -> &'static str {
        match self {
            CudaBuild::Cuda12 => "12.8",
            CudaBuild::Cuda13 => "13.0",
        }
    }

    /// The cargo feature that selects this build.
    pub fn feature(self) -> &'static str {
        match self {
            CudaBuild::Cuda12 => "cuda-12",
            CudaBuild::Cuda13 => "cuda-13",
        }
    }

    /// The oldest driver this build runs on, as `cuDriverGetVersion` reports
    /// it (`major*1000 + minor*10`).
    pub fn min_driver(self) -> i32 {
        self.major() * 1000
    }

    /// The oldest NVIDIA driver release of [`CudaBuild::min_driver`].
    pub fn min_driver_release(self) -> u32 {
        match self {
            CudaBuild::Cuda12 => 525,
            CudaBuild::Cuda13 => 580,
        }
    }

    /// The compute capabilities (`major*10+minor`) this build's NVRTC
    /// compiles llmft's kernels for, from the list llmft supports.
    pub fn archs(self) -> &'static [u32] {
        match self {
            CudaBuild::Cuda12 => &[61, 70, 75, 80, 86, 89, 90],
            CudaBuild::Cuda13 => &[75, 80, 86, 89, 90],
        }
    }

    /// How to build this flavour from source.
    pub fn build_command(self) -> &'static str {
        match self {
            CudaBuild::Cuda12 => {
                "cargo build --release -p llmft --no-default-features --features cuda-12"
            }
            CudaBuild::Cuda13 => "cargo build --release -p llmft",
        }
    }

    /// One line for `llmft env`: `"CUDA 13 build (cudarc bindings 13.0; needs driver 580+)"`.
    pub fn describe(self) -> String {
        format!(
            "CUDA {} build (feature `{}`, cudarc bindings {}; needs a CUDA {}.x driver, release {}+)",
            self.major(),
            self.feature(),
            self.bindings(),
            self.major(),
            self.min_driver_release()
        )
    }
}

/// A driver version as `cuDriverGetVersion` reports it, as `"12.4"`.
pub fn driver_string(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// Whether a driver fits a build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverVerdict {
    /// The driver is new enough.
    Fits,
    /// The driver is older than the build needs; `use_instead` is the build
    /// that runs on it, if any.
    TooOld {
        /// `cuDriverGetVersion` of the machine.
        found: i32,
        /// The build this driver can run, or `None` (older than CUDA 12).
        use_instead: Option<CudaBuild>,
    },
}

/// The pure decision: does driver `found` (`cuDriverGetVersion`) run `build`?
pub fn driver_verdict(build: CudaBuild, found: i32) -> DriverVerdict {
    if found >= build.min_driver() {
        return DriverVerdict::Fits;
    }
    let use_instead = [CudaBuild::Cuda13, CudaBuild::Cuda12]
        .into_iter()
        .find(|b| found >= b.min_driver());
    DriverVerdict::TooOld { found, use_instead }
}

/// The one sentence `llmft env` prints for a driver that is too old, or
/// `None` when it fits.
pub fn driver_advice(build: CudaBuild, found: i32) -> Option<String> {
    match driver_verdict(build, found) {
        DriverVerdict::Fits => None,
        DriverVerdict::TooOld {
            found,
            use_instead: Some(other),
        } => Some(format!(
            "The CUDA driver here is {} but this binary is the CUDA {} build, which needs \
             driver {}.0 or newer (release {}+): use llmft's CUDA {} build instead \
             (`{}`), or update the driver.",
            driver_string(found),
            build.major(),
            build.major(),
            build.min_driver_release(),
            other.major(),
            other.build_command()
        )),
        DriverVerdict::TooOld {
            found,
            use_instead: None,
        } => Some(format!(
            "The CUDA driver here is {} but this binary is the CUDA {} build, which needs \
             driver {}.0 or newer (release {}+), and no llmft build runs on drivers older \
             than CUDA 12.0 (release 525): update the driver.",
            driver_string(found),
            build.major(),
            build.major(),
            build.min_driver_release()
        )),
    }
}

/// The one sentence for an NVRTC of another major version than the build's,
/// or `None` when they match.
pub fn nvrtc_advice(build: CudaBuild, nvrtc_major: i32) -> Option<String> {
    if nvrtc_major == build.major() {
        return None;
    }
    Some(format!(
        "NVRTC {nvrtc_major} was loaded but this binary is the CUDA {} build: put CUDA {}'s \
         libnvrtc first on LD_LIBRARY_PATH (pip: {}), or use the CUDA {nvrtc_major} build.",
        build.major(),
        build.major(),
        match build {
            CudaBuild::Cuda12 => "nvidia-cuda-nvrtc-cu12",
            CudaBuild::Cuda13 => "nvidia-cuda-nvrtc==13.0.*",
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_feature_picks_the_build() {
        assert_eq!(BUILD == CudaBuild::Cuda12, cfg!(feature = "cuda-12"));
        assert_eq!(BUILD == CudaBuild::Cuda13, cfg!(feature = "cuda-13"));
    }

    #[test]
    fn cuda13_build_needs_a_cuda13_driver() {
        let b = CudaBuild::Cuda13;
        for v in [13000, 13010, 13020, 14000] {
            assert_eq!(driver_verdict(b, v), DriverVerdict::Fits, "{v}");
            assert!(driver_advice(b, v).is_none());
        }
        for v in [12000, 12020, 12080, 12090] {
            assert_eq!(
                driver_verdict(b, v),
                DriverVerdict::TooOld {
                    found: v,
                    use_instead: Some(CudaBuild::Cuda12)
                },
                "{v}"
            );
        }
        let s = driver_advice(b, 12040).unwrap();
        assert!(s.contains("12.4"), "{s}");
        assert!(s.contains("CUDA 12 build"), "{s}");
        assert!(s.contains("--features cuda-12"), "{s}");
        assert_eq!(s.matches(". ").count(), 0, "one sentence: {s}");
    }

    #[test]
    fn cuda12_build_runs_on_cuda12_and_newer_drivers() {
        let b = CudaBuild::Cuda12;
        for v in [12000, 12080, 12090, 13000, 13020] {
            assert_eq!(driver_verdict(b, v), DriverVerdict::Fits, "{v}");
        }
        assert_eq!(
            driver_verdict(b, 11080),
            DriverVerdict::TooOld {
                found: 11080,
                use_instead: None
            }
        );
        let s = driver_advice(b, 11080).unwrap();
        assert!(s.contains("11.8") && s.contains("update the driver"), "{s}");
        let s = driver_advice(CudaBuild::Cuda13, 11040).unwrap();
        assert!(s.contains("11.4") && !s.contains("use llmft's"), "{s}");
    }

    #[test]
    fn nvrtc_of_another_major_is_named() {
        assert!(nvrtc_advice(CudaBuild::Cuda13, 13).is_none());
        let s = nvrtc_advice(CudaBuild::Cuda13, 12).unwrap();
        assert!(s.contains("NVRTC 12") && s.contains("CUDA 13 build"), "{s}");
        assert!(nvrtc_advice(CudaBuild::Cuda12, 13).is_some());
    }

    #[test]
    fn arch_lists() {
        assert!(CudaBuild::Cuda12.archs().contains(&61));
        assert!(!CudaBuild::Cuda13.archs().contains(&70));
        assert_eq!(driver_string(12080), "12.8");
        assert_eq!(driver_string(13000), "13.0");
    }
}
