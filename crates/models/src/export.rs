//! Exporting a model with its adapters merged, as Hugging Face safetensors
//! shards that transformers loads: streamed unit by unit, written into a
//! temporary folder that is renamed into place only when complete.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use llmft_quant::io::{write_safetensors, RawTensor};
use llmft_tensor::store::Unit;
use llmft_tensor::{ops, Ctx, DType, Tensor};
use safetensors::Dtype as StDtype;

use crate::{Error, Model, Result};

fn st_dtype(d: DType) -> Result<StDtype> {
    Ok(match d {
        DType::F32 => StDtype::F32,
        DType::BF16 => StDtype::BF16,
        DType::F16 => StDtype::F16,
        other => return Err(Error::Invalid(format!("cannot export weights as {other}"))),
    })
}

fn torch_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::F16 => "float16",
        _ => "bfloat16",
    }
}

struct ShardWriter {
    /// `None`: weights are visited, nothing is written.
    dir: Option<PathBuf>,
    limit: usize,
    current: Vec<(String, RawTensor)>,
    bytes: usize,
    files: Vec<Vec<String>>,
}

impl ShardWriter {
    fn push(&mut self, name: String, t: RawTensor) -> Result<()> {
        let b = t.data.len();
        if self.bytes > 0 && self.bytes + b > self.limit {
            self.flush()?;
        }
        self.bytes += b;
        self.current.push((name, t));
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.current.is_empty() {
            return Ok(());
        }
        let Some(dir) = &self.dir else {
            self.current.clear();
            return Ok(());
        };
        let i = self.files.len();
        let path = dir.join(format!("part-{i:05}.safetensors"));
        write_safetensors(&path, &self.current)?;
        self.files
            .push(self.current.drain(..).map(|(n, _)| n).collect());
        self.bytes = 0;
        Ok(())
    }

    /// Renames the parts to `model-0000i-of-0000N.safetensors` (or
    /// `model.safetensors` when there is one) and writes the index.
    fn finish(mut self) -> Result<()> {
        self.flush()?;
        let Some(dir) = self.dir.clone() else {
            return Ok(());
        };
        let n = self.files.len();
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        if n == 1 {
            let from = dir.join("part-00000.safetensors");
            let to = dir.join("model.safetensors");
            return std::fs::rename(&from, &to).map_err(io(&to));
        }
        let mut map = BTreeMap::new();
        for (i, names) in self.files.iter().enumerate() {
            let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
            let from = dir.join(format!("part-{i:05}.safetensors"));
            std::fs::rename(&from, dir.join(&file)).map_err(io(&from))?;
            for name in names {
                map.insert(name.clone(), file.clone());
            }
        }
        let index = serde_json::json!({"metadata": {}, "weight_map": map});
        let p = dir.join("model.safetensors.index.json");
        std::fs::write(&p, index.to_string()).map_err(io(&p))
    }
}

impl Model {
    /// Writes the model, with the attached adapters merged into their base
    /// weights (quantized bases dequantized first), to `dir` as Hugging Face
    /// safetensors in `dtype`, sharded at about `shard_bytes`, plus
    /// `config.json`. Weights stream one tensor at a time through host
    /// memory; the folder appears only when complete (`dir` must not exist).
    pub fn export_merged(&self, dir: &Path, dtype: DType, shard_bytes: usize) -> Result<()> {
        self.export_merged_to(Some(dir), dtype, shard_bytes)
    }

    /// [`Model::export_merged`] to `Some(dir)`; with `None` every weight is
    /// fetched, merged and converted the same way but nothing is written: a
    /// data-parallel rank other than the writer joins the collective fetches
    /// of a sharded store this way.
    pub fn export_merged_to(
        &self,
        dir: Option<&Path>,
        dtype: DType,
        shard_bytes: usize,
    ) -> Result<()> {
        let Some(dir) = dir else {
            return self.write_export(None, dtype, shard_bytes.max(1));
        };
        if dir.exists() {
            return Err(Error::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "the export folder already exists",
                ),
            });
        }
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|source| Error::Io {
            path: tmp.clone(),
            source,
        })?;
        let result = self.write_export(Some(&tmp), dtype, shard_bytes.max(1));
        match result {
            Ok(()) => std::fs::rename(&tmp, dir).map_err(|source| Error::Io {
                path: dir.to_path_buf(),
                source,
            }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                Err(e)
            }
        }
    }

    fn write_export(&self, dir: Option<&Path>, dtype: DType, shard_bytes: usize) -> Result<()> {
        let ctx = self.ctx();
        let cpu = Ctx::cpu();
        let st = st_dtype(dtype)?;
        let mut w = ShardWriter {
            dir: dir.map(Path::to_path_buf),
            limit: shard_bytes,
            current: Vec::new(),
            bytes: 0,
            files: Vec::new(),
        };
        let mut status = crate::LoadStatus {
            tensors: 0,
            total_tensors: crate::loader::total_tensors(&self.config),
            bytes: 0,
            writing: true,
        };
        for unit in 0..self.config.num_units() {
            if unit > 0 && w.dir.is_some() {
                crate::loader::report_load(status);
            }
            let u = self.unit(Unit::from_index(unit, self.config.num_units()))?;
            for (name, shape) in self.config.unit_tensors(unit) {
                status.tensors += 1;
                let mut t = if crate::is_quantizable(&name) {
                    // Memory of its own: merging must not touch the frozen base.
                    self.dense_weight(&name)?
                } else {
                    u.get(&name)?
                };
                let module = name.trim_end_matches(".weight");
                if let Some(lora) = self.adapter().and_then(|a| a.layers.get(module)) {
                    lora.merge_into(ctx, &mut t)?;
                }
                if w.dir.is_none() {
                    continue;
                }
                let mut out = Tensor::empty(ctx, dtype, &shape)?;
                ops::cast(ctx, &t, &mut out)?;
                let host = out.to_ctx(&cpu)?;
                status.bytes += host.as_bytes()?.len() as u64;
                w.push(
                    name,
                    RawTensor {
                        dtype: st,
                        shape: shape.clone(),
                        data: host.as_bytes()?.to_vec(),
                    },
                )?;
            }
        }
        let Some(dir) = dir else {
            return Ok(());
        };
        w.finish()?;
        crate::loader::report_load(status);
        let cfg = self.hf_config_json(dtype);
        let p = dir.join("config.json");
        std::fs::write(&p, serde_json::to_string_pretty(&cfg).expect("json"))
            .map_err(|source| Error::Io { path: p, source })
    }

    /// The model's config.json as exported: the original file's keys where
    /// the model was loaded from one, the dtype updated and any quantization
    /// config dropped (merged weights are dense).
    pub fn hf_config_json(&self, dtype: DType) -> serde_json::Value {
        let mut v = self
            .source_config()
            .cloned()
            .unwrap_or_else(|| self.config.to_hf_json());
        if let Some(o) = v.as_object_mut() {
            o.remove("quantization_config");
            o.insert("torch_dtype".into(), torch_name(dtype).into());
            if o.contains_key("dtype") {
                o.insert("dtype".into(), torch_name(dtype).into());
            }
        }
        v
    }
}
