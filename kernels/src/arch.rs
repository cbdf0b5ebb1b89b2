//! Which code path the kernels take on a device.
//!
//! The kernels test `LLMFT_PATH_ARCH` (see `cuda/common.cuh`) for their fast
//! paths: cp.async, bf16 conversions and m16n8k16 MMA need sm_80, ldmatrix
//! and f16 m16n8k8 MMA sm_75, clusters sm_90. On older GPUs the fallbacks
//! take over (plain loads, MMA from warp shuffles, integer bf16 rounding).
//! The path is the device's compute capability unless `LLMFT_KERNEL_ARCH`
//! names an older one: the cubin is then still built for the real device,
//! with the older path's macro, so a newer GPU runs the fallbacks for real.

use crate::{Error, Result};

/// The compute capabilities llmft's kernels are written and checked for.
pub const SUPPORTED_ARCHS: &[u32] = &[61, 70, 75, 80, 86, 89, 90];

/// The environment variable that forces an older kernel path.
pub const ARCH_ENV: &str = "LLMFT_KERNEL_ARCH";

/// The code path of one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelPath {
    /// The device's compute capability as `major*10+minor` (what the
    /// cubin is compiled for).
    pub device: u32,
    /// The architecture whose code paths the kernels take (`<= device`).
    pub path: u32,
    /// Whether `LLMFT_KERNEL_ARCH` chose `path`.
    pub forced: bool,
}

/// `"70"`, `"sm_70"`, `"7.0"` or `"compute_70"` as `70`.
pub fn parse_arch(s: &str) -> Option<u32> {
    let t = s.trim();
    let t = t
        .strip_prefix("sm_")
        .or_else(|| t.strip_prefix("compute_"))
        .unwrap_or(t);
    if let Some((maj, min)) = t.split_once('.') {
        let (maj, min): (u32, u32) = (maj.parse().ok()?, min.parse().ok()?);
        return (min < 10).then_some(maj * 10 + min);
    }
    t.parse().ok().filter(|&v: &u32| (10..1000).contains(&v))
}

impl KernelPath {
    /// The path for a device of compute capability `device` (`(major,
    /// minor)`), given the value of `LLMFT_KERNEL_ARCH` if set. The override
    /// must name one of [`SUPPORTED_ARCHS`] no newer than the device.
    pub fn choose(device: (u32, u32), forced: Option<&str>) -> Result<Self> {
        let dev = device.0 * 10 + device.1;
        let Some(raw) = forced.filter(|s| !s.trim().is_empty()) else {
            return Ok(Self {
                device: dev,
                path: dev,
                forced: false,
            });
        };
        let bad = |why: String| Error::BadArchOverride {
            value: raw.to_string(),
            why,
        };
        let path = parse_arch(raw).ok_or_else(|| {
            bad("expected a compute capability such as 70, 7.5 or sm_80".to_string())
        })?;
        if !SUPPORTED_ARCHS.contains(&path) {
            return Err(bad(format!(
                "sm_{path} is not one of the kernel paths {}",
                list(SUPPORTED_ARCHS)
            )));
        }
        if path > dev {
            return Err(bad(format!(
                "the device is sm_{dev}; a path can only be older than the device"
            )));
        }
        Ok(Self {
            device: dev,
            path,
            forced: true,
        })
    }

    /// [`KernelPath::choose`] with `LLMFT_KERNEL_ARCH` from the environment.
    pub fn from_env(device: (u32, u32)) -> Result<Self> {
        Self::choose(device, std::env::var(ARCH_ENV).ok().as_deref())
    }

    /// Whether bf16 compute is available (sm_80+ path).
    pub fn has_bf16(&self) -> bool {
        self.path >= 80
    }

    /// The value of the `LLMFT_PATH_ARCH` macro (`__CUDA_ARCH__` style).
    pub fn macro_value(&self) -> u32 {
        self.path * 10
    }

    /// The most dynamic shared memory one block may take on this path: the
    /// path architecture's opt-in limit, never more than `device_limit` (the
    /// device's own, from the driver).
    pub fn max_shared_per_block(&self, device_limit: usize) -> usize {
        let path_limit = match self.path {
            ..=69 => 48 * 1024,
            70..=74 => 96 * 1024,
            75..=79 => 64 * 1024,
            80 | 87 => 163 * 1024,
            81..=89 => 99 * 1024,
            _ => 227 * 1024,
        };
        if self.forced {
            path_limit.min(device_limit)
        } else {
            device_limit
        }
    }

    /// What the path drops, for the line printed once per process.
    pub fn fallbacks(&self) -> &'static str {
        match self.path {
            ..=69 => "no ldmatrix / MMA / cp.async / bf16: shared loads, shuffle MMA",
            70..=74 => "no cp.async / ldmatrix / MMA / bf16: shared loads, shuffle MMA",
            75..=79 => "no cp.async / bf16 MMA: f16 m16n8k8 MMA, bf16 by shuffles",
            80..=89 => "all fast paths but thread-block clusters",
            _ => "all fast paths",
        }
    }

    /// The line printed once, e.g. `kernels: sm_70 path on an sm_90 device
    /// (LLMFT_KERNEL_ARCH=70; no cp.async / ...); fp16 compute (no bf16)`.
    pub fn describe(&self) -> String {
        let on = if self.forced {
            format!(
                " on an sm_{} device ({ARCH_ENV}={})",
                self.device, self.path
            )
        } else {
            String::new()
        };
        let compute = if self.has_bf16() {
            "bf16 or fp16 compute"
        } else {
            "fp16 compute (no bf16 before sm_80)"
        };
        format!(
            "kernels: sm_{} path{on} ({}); {compute}",
            self.path,
            self.fallbacks()
        )
    }
}

fn list(archs: &[u32]) -> String {
    archs
        .iter()
        .map(|a| format!("sm_{a}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_spellings() {
        assert_eq!(parse_arch("70"), Some(70));
        assert_eq!(parse_arch(" sm_75 "), Some(75));
        assert_eq!(parse_arch("8.6"), Some(86));
        assert_eq!(parse_arch("compute_90"), Some(90));
        assert_eq!(parse_arch("seventy"), None);
        assert_eq!(parse_arch("7.10"), None);
        assert_eq!(parse_arch("7"), None);
    }

    #[test]
    fn path_is_the_device_unless_forced() {
        let p = KernelPath::choose((9, 0), None).unwrap();
        assert_eq!((p.device, p.path, p.forced), (90, 90, false));
        assert!(p.has_bf16());
        let p = KernelPath::choose((7, 0), Some("")).unwrap();
        assert_eq!((p.path, p.forced, p.has_bf16()), (70, false, false));
        let p = KernelPath::choose((9, 0), Some("70")).unwrap();
        assert_eq!((p.device, p.path, p.forced), (90, 70, true));
        assert_eq!(p.macro_value(), 700);
        assert!(p.describe().contains("sm_70 path on an sm_90 device"));
        assert!(p.describe().contains("fp16 compute"));
    }

    #[test]
    fn bad_overrides_are_refused_with_the_reason() {
        let e = KernelPath::choose((7, 5), Some("80"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("LLMFT_KERNEL_ARCH") && e.contains("sm_75"),
            "{e}"
        );
        let e = KernelPath::choose((9, 0), Some("72"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("sm_72 is not one of"), "{e}");
        let e = KernelPath::choose((9, 0), Some("fast"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`fast`"), "{e}");
    }

    #[test]
    fn forced_paths_take_the_older_shared_memory_limit() {
        let h200 = 227 * 1024;
        let p = KernelPath::choose((9, 0), Some("75")).unwrap();
        assert_eq!(p.max_shared_per_block(h200), 64 * 1024);
        let p = KernelPath::choose((9, 0), Some("70")).unwrap();
        assert_eq!(p.max_shared_per_block(h200), 96 * 1024);
        let p = KernelPath::choose((8, 6), None).unwrap();
        assert_eq!(p.max_shared_per_block(99 * 1024), 99 * 1024);
    }
}
