//! What a unit's bytes mean. A store ([`llmft_tensor::store`]) moves each
//! unit's blob without knowing what it holds; [`UnitWeights`] reads a fetched
//! blob back as the model's tensors: dense entries as views, quantized linear
//! weights as [`QuantizedTensor`]s whose parts are views of the blob (entries
//! named `{weight}#{part}`).
use std::collections::{BTreeMap, HashMap};

use llmft_quant::QuantizedTensor;
use llmft_tensor::store::{BlobLayout, UnitBlob, UnitGuard};
use llmft_tensor::{Ctx, DType, Tensor};

use crate::{Error, Result};

/// The blob entry of part `part` of quantized weight `name`.
pub fn part_key(name: &str, part: &str) -> String {
    format!("{name}#{part}")
}

/// Appends every part of `q` (quantized weight `name`) to `layout`.
pub(crate) fn push_quantized(layout: &mut BlobLayout, name: &str, q: &QuantizedTensor) {
    for (part, t) in q.parts() {
        layout.push(&part_key(name, &part), t.dtype(), t.shape());
    }
}

/// Copies the parts of `q` into their entries of `blob`.
pub(crate) fn write_quantized(
    ctx: &llmft_tensor::Ctx,
    blob: &UnitBlob,
    name: &str,
    q: &QuantizedTensor,
) -> Result<()> {
    for (part, t) in q.parts() {
        blob.get(&part_key(name, &part))?.copy_from(ctx, &t)?;
    }
    Ok(())
}

/// The quantized weights of each unit, as templates: their format and
/// shapes. A template's parts are views of one zeroed host placeholder
/// (never read, never computed on): the index holds no unit's bytes, so a
/// store whose home is only part of a unit (a shard) keeps just that part.
#[derive(Debug, Clone, Default)]
pub struct QuantIndex {
    units: Vec<BTreeMap<String, QuantizedTensor>>,
    placeholder: Option<Tensor>,
}

impl QuantIndex {
    /// An index of `num_units` units without quantized weights.
    pub fn new(num_units: usize) -> Self {
        Self {
            units: vec![BTreeMap::new(); num_units],
            placeholder: None,
        }
    }

    /// Records the format of quantized weight `name` of unit index `unit`.
    pub(crate) fn insert(&mut self, unit: usize, name: &str, q: &QuantizedTensor) -> Result<()> {
        let largest = q.parts().iter().map(|(_, t)| t.bytes()).max().unwrap_or(0);
        let ph = match &self.placeholder {
            Some(p) if p.bytes() >= largest => p.clone(),
            _ => {
                // Zeroed pages that are never touched cost no resident memory.
                let p = Tensor::zeros(&Ctx::cpu(), DType::U8, &[largest.max(1)])?;
                self.placeholder = Some(p.clone());
                p
            }
        };
        let t = q.map_parts(&mut |_, t| {
            Ok(ph
                .view(0, &[t.bytes()])?
                .reinterpret(t.dtype(), t.shape())?)
        })?;
        self.units[unit].insert(name.to_string(), t);
        Ok(())
    }

    /// Number of units indexed.
    pub fn num_units(&self) -> usize {
        self.units.len()
    }

    pub(crate) fn unit(&self, unit: usize) -> Option<&BTreeMap<String, QuantizedTensor>> {
        self.units.get(unit)
    }
}

/// A fetched unit read as the model's tensors. Holds the store's guard:
/// the unit stays on the device while this lives.
#[derive(Debug)]
pub struct UnitWeights {
    guard: UnitGuard,
    quantized: HashMap<String, QuantizedTensor>,
}

impl UnitWeights {
    /// Reads `guard` with the quantized templates of its unit.
    pub(crate) fn new(
        guard: UnitGuard,
        templates: Option<&BTreeMap<String, QuantizedTensor>>,
    ) -> Result<Self> {
        let mut quantized = HashMap::new();
        for (name, q) in templates.into_iter().flatten() {
            let view = q.map_parts(&mut |part, _| Ok(guard.get(&part_key(name, part))?))?;
            quantized.insert(name.clone(), view);
        }
        Ok(Self { guard, quantized })
    }

    /// The quantized weight `name`, if this unit stores it quantized.
    pub fn quantized(&self, name: &str) -> Option<&QuantizedTensor> {
        self.quantized.get(name)
    }

    /// Bytes of the unit's blob.
    pub fn bytes(&self) -> usize {
        self.guard.layout().bytes
    }

    /// A view of the dense tensor `name`.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        if self.quantized.contains_key(name) {
            return Err(Error::Invalid(format!(
                "`{name}` is quantized; read it with `quantized`"
            )));
        }
        Ok(self.guard.get(name)?)
    }

    /// Whether the unit holds `name` (dense or quantized).
    pub fn contains(&self, name: &str) -> bool {
        self.quantized.contains_key(name) || self.guard.contains(name)
    }

    /// The blob's table (dense entries and quantized parts).
    pub fn layout(&self) -> &BlobLayout {
        self.guard.layout()
    }

    /// The blob itself.
    pub fn blob(&self) -> &Tensor {
        self.guard.blob()
    }
}
