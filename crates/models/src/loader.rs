//! Loading Hugging Face checkpoints (single or sharded safetensors) tensor by
//! tensor into unit blobs, and random initialization without a file.
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use llmft_quant::{QuantConfig, QuantizedTensor};
use llmft_tensor::{ops, Ctx, DType, Tensor};
use safetensors::{Dtype as StDtype, SafeTensors};

use llmft_tensor::store::{BlobLayout, StoreBuilder, Unit};

use crate::store::{push_quantized, write_quantized, QuantIndex};
use crate::{Error, ModelConfig, Result};

/// Where each tensor of a checkpoint lives.
struct Index {
    dir: PathBuf,
    /// tensor name -> file name
    files: HashMap<String, String>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Index {
    fn open(dir: &Path) -> Result<Self> {
        let idx = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let mut files = HashMap::new();
        if idx.is_file() {
            let text = std::fs::read_to_string(&idx).map_err(io(&idx))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
                path: idx.clone(),
                msg: e.to_string(),
            })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::Config {
                    path: idx.clone(),
                    msg: "no `weight_map` object".into(),
                })?;
            for (k, f) in map {
                let f = f.as_str().ok_or_else(|| Error::Config {
                    path: idx.clone(),
                    msg: format!("weight_map[`{k}`] is not a file name"),
                })?;
                // Shards live beside the index: a path elsewhere (`../x`,
                // `/dev/zero`) is refused rather than opened.
                let plain = Path::new(f).file_name().is_some_and(|n| n == f);
                if !plain || f == ".." {
                    return Err(Error::Config {
                        path: idx.clone(),
                        msg: format!(
                            "weight_map[`{k}`] = `{f}` is not a file name in the model folder"
                        ),
                    });
                }
                files.insert(k.clone(), f.to_string());
            }
        } else if single.is_file() {
            let st = Shard::open(&single)?;
            for name in st.names()? {
                files.insert(name, "model.safetensors".into());
            }
        } else {
            return Err(Error::Io {
                path: single,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "neither model.safetensors nor model.safetensors.index.json exists",
                ),
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
        })
    }
}

/// Where a model load stands, reported after each unit (embedding, layer,
/// head) to the hook set with [`set_load_progress`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadStatus {
    /// Tensors loaded (and quantized) so far.
    pub tensors: usize,
    /// Tensors of the whole model.
    pub total_tensors: usize,
    /// Bytes of weights read (or, for random weights, drawn; when
    /// `writing`, written) so far.
    pub bytes: u64,
    /// Whether this is an export writing a (merged) model rather than a
    /// load.
    pub writing: bool,
}

/// A function told each [`LoadStatus`] of every model load in the process.
pub type LoadHook = Box<dyn Fn(LoadStatus) + Send + Sync>;

static LOAD_HOOK: std::sync::RwLock<Option<LoadHook>> = std::sync::RwLock::new(None);

/// Sets (or, with `None`, removes) the process's model-load progress hook
/// (the CLI prints progress lines with it).
pub fn set_load_progress(hook: Option<LoadHook>) {
    if let Ok(mut h) = LOAD_HOOK.write() {
        *h = hook;
    }
}

pub(crate) fn report_load(status: LoadStatus) {
    if let Ok(h) = LOAD_HOOK.read() {
        if let Some(f) = h.as_ref() {
            f(status);
        }
    }
}

pub(crate) fn total_tensors(config: &ModelConfig) -> usize {
    (0..config.num_units())
        .map(|u| config.unit_tensors(u).len())
        .sum()
}

/// One memory-mapped safetensors file.
struct Shard {
    path: PathBuf,
    map: memmap2::Mmap,
}

impl Shard {
    fn open(path: &Path) -> Result<Self> {
        let f = File::open(path).map_err(io(path))?;
        // SAFETY: the file is opened read-only; checkpoints are not modified
        // while llmft reads them (a truncation would be a user error that
        // surfaces as a parse error or SIGBUS, as with every mmap reader).
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(io(path))?;
        SafeTensors::deserialize(&map).map_err(|e| Error::Safetensors {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            map,
        })
    }

    fn parsed(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.map).expect("validated in open")
    }

    fn names(&self) -> Result<Vec<String>> {
        Ok(self
            .parsed()
            .names()
            .into_iter()
            .map(|s| s.to_string())
            .collect())
    }

    /// Drops the pages of the mapping from this process's resident set.
    fn forget_pages(&self) {
        // SAFETY: DONTNEED on a read-only file mapping only discards clean
        // pages, which are re-read from the file on the next access.
        let _ = unsafe {
            self.map
                .unchecked_advise(memmap2::UncheckedAdvice::DontNeed)
        };
    }
}

fn file_dtype(path: &Path, name: &str, dt: StDtype) -> Result<DType> {
    Ok(match dt {
        StDtype::F32 => DType::F32,
        StDtype::BF16 => DType::BF16,
        StDtype::F16 => DType::F16,
        other => {
            return Err(Error::TensorDType {
                path: path.to_path_buf(),
                name: name.to_string(),
                dtype: format!("{other:?}"),
            })
        }
    })
}

/// Elements converted and copied per step, bounding host staging memory.
const CHUNK_ELEMS: usize = 8 << 20;

/// Streams one tensor from the mapped file into `dst`, converting dtype in
/// chunks and dropping file pages as it goes.
fn stream_tensor(
    ctx: &Ctx,
    shard: &Shard,
    src_dtype: DType,
    data: &[u8],
    dst: &mut Tensor,
) -> Result<()> {
    let n = dst.numel();
    let es = src_dtype.size();
    let cpu = Ctx::cpu();
    let mut start = 0;
    while start < n {
        let len = CHUNK_ELEMS.min(n - start);
        let bytes = &data[start * es..(start + len) * es];
        let mut part = dst.view(start, &[len])?;
        if src_dtype == dst.dtype() {
            part.copy_from_host_bytes(ctx, bytes)?;
        } else {
            let mut raw = Tensor::zeros(&cpu, src_dtype, &[len])?;
            raw.as_bytes_mut()?.copy_from_slice(bytes);
            let mut conv = Tensor::zeros(&cpu, dst.dtype(), &[len])?;
            ops::cast(&cpu, &raw, &mut conv)?;
            part.copy_from_host_bytes(ctx, conv.as_bytes()?)?;
        }
        shard.forget_pages();
        start += len;
    }
    Ok(())
}

/// Whether `name` is a decoder linear weight (what QLoRA-style loading quantizes).
pub fn is_quantizable(name: &str) -> bool {
    name.starts_with("model.layers.") && name.ends_with("_proj.weight")
}

/// One unit being loaded: its dense tensors (streamed straight into the
/// blob once it exists) and its quantized weights (staged on the compute
/// device until then).
struct Staged {
    unit: Unit,
    dense: Vec<(String, Vec<usize>)>,
    quantized: Vec<(String, QuantizedTensor)>,
}

impl Staged {
    fn layout(&self, dtype: DType) -> BlobLayout {
        let mut layout = BlobLayout::default();
        for (name, shape) in &self.dense {
            layout.push(name, dtype, shape);
        }
        for (name, q) in &self.quantized {
            push_quantized(&mut layout, name, q);
        }
        layout
    }

    /// Allocates the unit's blob in `builder`, fills it (`fill_dense` writes
    /// each dense tensor into its view), hands it to the store and records
    /// the quantized weights in `index`.
    fn commit(
        self,
        ctx: &Ctx,
        dtype: DType,
        builder: &mut dyn StoreBuilder,
        index: &mut QuantIndex,
        mut fill_dense: impl FnMut(&str, &mut Tensor) -> Result<()>,
    ) -> Result<()> {
        let blob = builder.alloc(self.unit, self.layout(dtype))?;
        for (name, _) in &self.dense {
            fill_dense(name, &mut blob.get(name)?)?;
        }
        for (name, q) in &self.quantized {
            write_quantized(ctx, &blob, name, q)?;
        }
        // The blob may be host memory the store copies from on another stream.
        ctx.synchronize()?;
        builder.add(self.unit, blob)?;
        let u = self.unit.index(index.num_units());
        for (name, q) in &self.quantized {
            index.insert(u, name, q)?;
        }
        Ok(())
    }
}

/// Writes `f` (which fills a tensor on `ctx`) into `dst`, staging on `ctx`
/// when `dst` lives elsewhere (a host blob of an offloaded store).
fn fill_via(ctx: &Ctx, dst: &mut Tensor, f: impl FnOnce(&mut Tensor) -> Result<()>) -> Result<()> {
    if dst.device() == ctx.device() {
        return f(dst);
    }
    let mut t = Tensor::zeros(ctx, dst.dtype(), dst.shape())?;
    f(&mut t)?;
    // Ordered on the compute stream; `Staged::commit` waits before handing
    // the blob over.
    Ok(dst.copy_from(ctx, &t)?)
}

/// Loads the frozen weights of every unit from a Hugging Face folder into
/// `builder`'s store, converting to `dtype`. Tensors stream from the mapped
/// files in chunks of 8M elements and file pages are released after each
/// chunk, so host memory stays far below one tensor, let alone the model.
///
/// With `quant`, the decoder's linear weights are quantized on `ctx`'s device
/// as they arrive (one tensor at a time), so the model never exists whole in
/// `dtype`; one unit's quantized weights are staged on the device until the
/// store takes the unit. Weights the checkpoint already holds in
/// bitsandbytes or hqq format load as they are.
pub fn load_into(
    dir: &Path,
    config: &ModelConfig,
    ctx: &Ctx,
    dtype: DType,
    quant: Option<&QuantConfig>,
    builder: &mut dyn StoreBuilder,
) -> Result<QuantIndex> {
    let index = Index::open(dir)?;
    let mut shards: BTreeMap<String, Shard> = BTreeMap::new();
    let mut qindex = QuantIndex::new(config.num_units());
    let mut status = LoadStatus {
        tensors: 0,
        total_tensors: total_tensors(config),
        bytes: 0,
        writing: false,
    };
    for unit in Unit::all(config.num_layers) {
        let wanted = config.unit_tensors(unit.index(config.num_units()));
        let mut staged = Staged {
            unit,
            dense: Vec::new(),
            quantized: Vec::new(),
        };
        // Where each dense tensor comes from: (file, source dtype).
        let mut sources: HashMap<String, (String, DType)> = HashMap::new();
        for (name, shape) in &wanted {
            // An hqq module has no `.weight`; its file is the one of `.W_q`.
            let hqq_key = llmft_quant::io::hqq_module_key(name, "W_q");
            let file = index.files.get(name).or_else(|| index.files.get(&hqq_key));
            let file = file.ok_or_else(|| Error::MissingTensor {
                dir: index.dir.clone(),
                name: name.clone(),
            })?;
            if !shards.contains_key(file) {
                let p = index.dir.join(file);
                shards.insert(file.clone(), Shard::open(&p)?);
            }
            let shard = &shards[file];
            let st = shard.parsed();
            let pre = if llmft_quant::io::is_bnb_quantized(&st, name) {
                Some(llmft_quant::io::load_bnb(ctx, &st, name)?)
            } else if llmft_quant::io::is_hqq_quantized(&st, name) {
                Some(llmft_quant::io::load_hqq(ctx, &st, name)?)
            } else {
                None
            };
            if let Some(q) = pre {
                if &q.shape != shape {
                    return Err(Error::TensorShape {
                        path: shard.path.clone(),
                        name: name.clone(),
                        got: q.shape.clone(),
                        expected: shape.clone(),
                    });
                }
                staged.quantized.push((name.clone(), q));
                continue;
            }
            let view = st.tensor(name).map_err(|_| Error::MissingTensor {
                dir: shard.path.clone(),
                name: name.clone(),
            })?;
            if view.shape() != shape.as_slice() {
                return Err(Error::TensorShape {
                    path: shard.path.clone(),
                    name: name.clone(),
                    got: view.shape().to_vec(),
                    expected: shape.clone(),
                });
            }
            let src_dtype = file_dtype(&shard.path, name, view.dtype())?;
            status.bytes += view.data().len() as u64;
            match quant.filter(|_| is_quantizable(name)) {
                Some(cfg) => {
                    let mut dense = Tensor::zeros(ctx, dtype, shape)?;
                    stream_tensor(ctx, shard, src_dtype, view.data(), &mut dense)?;
                    let q = QuantizedTensor::quantize(ctx, &dense, cfg)?;
                    staged.quantized.push((name.clone(), q));
                }
                None => {
                    sources.insert(name.clone(), (file.clone(), src_dtype));
                    staged.dense.push((name.clone(), shape.clone()));
                }
            }
        }
        staged.commit(ctx, dtype, builder, &mut qindex, |name, dst| {
            let (file, src_dtype) = &sources[name];
            let shard = &shards[file];
            let st = shard.parsed();
            let view = st.tensor(name).map_err(|_| Error::MissingTensor {
                dir: shard.path.clone(),
                name: name.to_string(),
            })?;
            stream_tensor(ctx, shard, *src_dtype, view.data(), dst)
        })?;
        status.tensors += wanted.len();
        report_load(status);
    }
    Ok(qindex)
}

/// Randomly initialized units for `config` (normal(0, initializer_range) for
/// matrices, ones for norms, zeros for biases), seeded, into `builder`.
/// With `quant`, decoder linear weights are drawn dense and quantized one at a time.
pub fn random_into(
    config: &ModelConfig,
    ctx: &Ctx,
    dtype: DType,
    seed: u64,
    quant: Option<&QuantConfig>,
    builder: &mut dyn StoreBuilder,
) -> Result<QuantIndex> {
    let mut qindex = QuantIndex::new(config.num_units());
    let mut status = LoadStatus {
        tensors: 0,
        total_tensors: total_tensors(config),
        bytes: 0,
        writing: false,
    };
    for unit in Unit::all(config.num_layers) {
        let u = unit.index(config.num_units());
        let wanted = config.unit_tensors(u);
        status.bytes += wanted
            .iter()
            .map(|(_, shape)| (shape.iter().product::<usize>() * dtype.size()) as u64)
            .sum::<u64>();
        let seed_of = |k: usize| seed ^ ((u as u64) << 32) ^ k as u64;
        let mut staged = Staged {
            unit,
            dense: Vec::new(),
            quantized: Vec::new(),
        };
        let mut seeds = HashMap::new();
        for (k, (name, shape)) in wanted.iter().enumerate() {
            if let Some(cfg) = quant.filter(|_| is_quantizable(name)) {
                let mut dense = Tensor::zeros(ctx, dtype, shape)?;
                ops::fill_normal(ctx, &mut dense, seed_of(k), 0.0, config.initializer_range)?;
                let q = QuantizedTensor::quantize(ctx, &dense, cfg)?;
                staged.quantized.push((name.clone(), q));
            } else {
                seeds.insert(name.clone(), seed_of(k));
                staged.dense.push((name.clone(), shape.clone()));
            }
        }
        staged.commit(ctx, dtype, builder, &mut qindex, |name, dst| {
            fill_via(ctx, dst, |t| {
                if name.ends_with("norm.weight") {
                    ops::fill(ctx, t, 1.0)?;
                } else if !name.ends_with(".bias") {
                    ops::fill_normal(ctx, t, seeds[name], 0.0, config.initializer_range)?;
                }
                Ok(())
            })
        })?;
        status.tensors += wanted.len();
        report_load(status);
    }
    Ok(qindex)
}
