//! The adapters of a whole model, and PEFT's on-disk format:
//! `adapter_config.json` + `adapter_model.safetensors` with keys
//! `base_model.model.<module>.lora_A.weight` `[r, in]`,
//! `base_model.model.<module>.lora_B.weight` `[out, r]` and, for DoRA,
//! `base_model.model.<module>.lora_magnitude_vector` `[out]`.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use llmft_tensor::{bf16, f16, Ctx, DType, Tensor};
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};

use crate::config::{InitLoraWeights, LoraConfig};
use crate::linear::{mix64, LinearShape, LoraLinear};
use crate::{Error, Result};

/// File name of the adapter config in an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// File name of the adapter weights in an adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The prefix PEFT puts before module names (`PeftModel.base_model.model`).
pub const KEY_PREFIX: &str = "base_model.model.";

/// The tensors of one adapted module, by PEFT's key suffix.
const PART_A: &str = "lora_A.weight";
const PART_B: &str = "lora_B.weight";
const PART_M: &str = "lora_magnitude_vector";

/// PEFT's key of `part` (`lora_A.weight`, `lora_B.weight`,
/// `lora_magnitude_vector`) of `module` (`model.layers.0.self_attn.q_proj`).
pub fn peft_key(module: &str, part: &str) -> String {
    format!("{KEY_PREFIX}{module}.{part}")
}

/// FNV-1a of a module name: the per-layer part of init and dropout seeds.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The seed of module `name` under run seed `seed`: independent of which
/// other modules exist.
pub fn layer_seed(seed: u64, name: &str) -> u64 {
    mix64(seed ^ name_hash(name))
}

/// All adapters of a model: the config and one [`LoraLinear`] per targeted
/// module, by full module name.
#[derive(Debug)]
pub struct Adapter {
    /// The configuration (written as `adapter_config.json`).
    pub config: LoraConfig,
    /// The adapted modules.
    pub layers: BTreeMap<String, LoraLinear>,
}

impl Adapter {
    /// New adapters on `ctx` for every module of `shapes` (the model's linear
    /// layers by full name) that `config` targets, initialized from `seed`.
    /// DoRA layers still need [`Adapter::init_magnitude`] with their base
    /// weights (see [`Adapter::pending_magnitudes`]).
    pub fn new(
        ctx: &Ctx,
        shapes: &BTreeMap<String, LinearShape>,
        config: LoraConfig,
        seed: u64,
    ) -> Result<Self> {
        config.validate()?;
        let mut layers = BTreeMap::new();
        for (name, shape) in shapes {
            if let Some(spec) = config.target(name)? {
                let l = LoraLinear::new(ctx, *shape, &spec, layer_seed(seed, name))?;
                layers.insert(name.clone(), l);
            }
        }
        if layers.is_empty() {
            return Err(Error::NoTargets {
                count: shapes.len(),
                targets: config
                    .target_modules
                    .as_ref()
                    .map(|t| t.to_string())
                    .unwrap_or_default(),
            });
        }
        Ok(Self { config, layers })
    }

    /// DoRA modules whose magnitude is not set yet.
    pub fn pending_magnitudes(&self) -> Vec<&str> {
        self.layers
            .iter()
            .filter(|(_, l)| l.use_dora() && l.magnitude.is_none())
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// Sets the DoRA magnitude of `module` from its dense base weight.
    pub fn init_magnitude(&mut self, ctx: &Ctx, module: &str, base_w: &Tensor) -> Result<()> {
        self.layers
            .get_mut(module)
            .ok_or_else(|| Error::Config(format!("no adapter on module {module}")))?
            .init_magnitude(ctx, base_w)
    }

    /// Number of trainable scalars.
    pub fn num_parameters(&self) -> usize {
        self.layers.values().map(LoraLinear::num_parameters).sum()
    }

    /// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors`
    /// (tensors in `dtype`: f32, bf16 or f16), each to a temporary name first
    /// and renamed, so no half-written file ever carries the final name.
    pub fn save(&self, dir: &Path, dtype: DType) -> Result<()> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        for (name, bytes) in self.encode_files(dir, dtype)? {
            write_atomic(&dir.join(name), &bytes)?;
        }
        Ok(())
    }

    /// The bytes of the files [`Adapter::save`] writes, as (file name,
    /// bytes): `adapter_model.safetensors` (tensors in `dtype`: f32, bf16 or
    /// f16), then `adapter_config.json`. `dir` is the folder they are meant
    /// for, named in errors; nothing is written. For callers that write the
    /// files themselves (a training checkpoint's own writer).
    pub fn encode_files(&self, dir: &Path, dtype: DType) -> Result<[(&'static str, Vec<u8>); 2]> {
        if !dtype.is_float() {
            return Err(Error::DType {
                what: "saved adapter".into(),
                got: dtype,
                expected: "f32, bf16 or f16".into(),
            });
        }
        if let Some(m) = self.pending_magnitudes().first() {
            return Err(Error::MagnitudeNotInitialized {
                module: m.to_string(),
            });
        }
        let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, l) in &self.layers {
            let mut parts = vec![(PART_A, &l.a), (PART_B, &l.b)];
            if let Some(m) = &l.magnitude {
                parts.push((PART_M, m));
            }
            for (part, t) in parts {
                let v = t.to_f32_vec()?;
                owned.push((peft_key(name, part), t.shape().to_vec(), encode(&v, dtype)));
            }
        }
        let st_dtype = match dtype {
            DType::F32 => StDtype::F32,
            DType::BF16 => StDtype::BF16,
            _ => StDtype::F16,
        };
        let weights_path = dir.join(WEIGHTS_FILE);
        let st_err = |msg: String| Error::Safetensors {
            path: weights_path.clone(),
            msg,
        };
        let mut views = Vec::with_capacity(owned.len());
        for (k, s, b) in &owned {
            let v = TensorView::new(st_dtype, s.clone(), b).map_err(|e| st_err(e.to_string()))?;
            views.push((k.clone(), v));
        }
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| st_err(e.to_string()))?;

        let mut config = self.config.clone();
        config.inference_mode = true;
        let json = serde_json::to_vec_pretty(&config).map_err(|source| Error::Json {
            path: dir.join(CONFIG_FILE),
            source,
        })?;
        Ok([(WEIGHTS_FILE, bytes), (CONFIG_FILE, json)])
    }

    /// Reads a PEFT adapter directory for a model whose linear layers are
    /// `shapes` (full module name → shape), onto `ctx` as f32 parameters.
    /// Every targeted module must have its tensors with the shapes the config
    /// and the model imply, and every tensor of the file must belong to a
    /// targeted module; otherwise the error names the key and the file.
    pub fn load(ctx: &Ctx, dir: &Path, shapes: &BTreeMap<String, LinearShape>) -> Result<Self> {
        let config_path = dir.join(CONFIG_FILE);
        let text = std::fs::read(&config_path).map_err(|source| Error::Io {
            path: config_path.clone(),
            source,
        })?;
        let config: LoraConfig = serde_json::from_slice(&text).map_err(|source| Error::Json {
            path: config_path.clone(),
            source,
        })?;
        config
            .validate()
            .map_err(|e| Error::Config(format!("{}: {e}", config_path.display())))?;
        if let InitLoraWeights::Other(s) = &config.init_lora_weights {
            let s = s.to_ascii_lowercase();
            if ["pissa", "olora", "corda", "loftq"]
                .iter()
                .any(|p| s.starts_with(p))
            {
                return Err(Error::Config(format!(
                    "{}: init_lora_weights {s:?} changes the base weights; convert the adapter \
                     to plain LoRA with PEFT first",
                    config_path.display()
                )));
            }
        }

        let path = dir.join(WEIGHTS_FILE);
        let bytes = std::fs::read(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::Safetensors {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        let mut unused: BTreeSet<String> = st.names().into_iter().map(String::from).collect();

        let mut layers = BTreeMap::new();
        for (name, shape) in shapes {
            let Some(spec) = config.target(name)? else {
                continue;
            };
            let (i, o, r) = (shape.in_features, shape.out_features, spec.r);
            let mut read = |part: &str, expected: Vec<usize>, rank_dim: Option<usize>| {
                let key = peft_key(name, part);
                let t = read_tensor(ctx, &st, &path, &key, &expected, rank_dim, r)?;
                unused.remove(&key);
                Ok::<_, Error>(t)
            };
            let a = read(PART_A, vec![r, i], Some(0))?;
            let b = read(PART_B, vec![o, r], Some(1))?;
            let m = if spec.use_dora {
                Some(read(PART_M, vec![o], None)?)
            } else {
                None
            };
            let l = LoraLinear::from_parts(*shape, &spec, layer_seed(0, name), a, b, m)?;
            layers.insert(name.clone(), l);
        }
        if let Some(key) = unused.into_iter().next() {
            let why = if key.ends_with(PART_M) && !config.use_dora {
                "a DoRA magnitude, but adapter_config.json has use_dora = false".to_string()
            } else {
                "no linear layer of the model that the config targets has this name".to_string()
            };
            return Err(Error::UnexpectedKey { path, key, why });
        }
        if layers.is_empty() {
            return Err(Error::NoTargets {
                count: shapes.len(),
                targets: config
                    .target_modules
                    .as_ref()
                    .map(|t| t.to_string())
                    .unwrap_or_default(),
            });
        }
        Ok(Self { config, layers })
    }
}

fn encode(v: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::BF16 => v
            .iter()
            .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
            .collect(),
        _ => v
            .iter()
            .flat_map(|x| f16::from_f32(*x).to_le_bytes())
            .collect(),
    }
}

/// One tensor of the adapter file as f32 on `ctx`, its shape checked.
/// `rank_dim` is the dimension that holds the rank (a mismatch there alone is
/// reported as a rank mismatch).
fn read_tensor(
    ctx: &Ctx,
    st: &SafeTensors<'_>,
    path: &Path,
    key: &str,
    expected: &[usize],
    rank_dim: Option<usize>,
    r: usize,
) -> Result<Tensor> {
    let path_buf = || PathBuf::from(path);
    let view = st.tensor(key).map_err(|_| Error::MissingKey {
        path: path_buf(),
        key: key.into(),
    })?;
    let got = view.shape().to_vec();
    if got != expected {
        if let Some(d) = rank_dim {
            let others_fit = got.len() == expected.len()
                && got
                    .iter()
                    .zip(expected)
                    .enumerate()
                    .all(|(j, (g, e))| j == d || g == e);
            if others_fit {
                return Err(Error::RankMismatch {
                    path: path_buf(),
                    key: key.into(),
                    got: got[d],
                    expected: r,
                });
            }
        }
        return Err(Error::KeyShape {
            path: path_buf(),
            key: key.into(),
            got,
            expected: expected.to_vec(),
        });
    }
    let data = view.data();
    let v: Vec<f32> = match view.dtype() {
        StDtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        StDtype::BF16 => data
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        StDtype::F16 => data
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        d => {
            return Err(Error::KeyDType {
                path: path_buf(),
                key: key.into(),
                got: format!("{d:?}"),
            })
        }
    };
    Ok(Tensor::from_slice(ctx, &v, expected)?)
}

/// Writes `bytes` to `path` through a temporary file in the same directory,
/// synced and then renamed over `path`.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| Error::Io { path: p, source }
    };
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
