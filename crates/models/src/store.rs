//! Where a unit's frozen weights live. A unit's weights are one contiguous
//! blob with a table of (name, dtype, shape, offset); [`WeightStore`] hands
//! out device views of a unit. The model sees only the trait, so resident,
//! sharded and offloaded stores run the same code.
use std::collections::HashMap;
use std::sync::Arc;

use llmft_quant::QuantizedTensor;
use llmft_tensor::{numel, Ctx, DType, Tensor};

use crate::{Error, Result};

/// Byte alignment of each tensor inside a blob.
const ALIGN: usize = 256;

/// One tensor's place in a unit blob.
#[derive(Debug, Clone, PartialEq)]
pub struct BlobEntry {
    /// Hugging Face tensor name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// Byte offset in the blob.
    pub offset: usize,
}

/// The layout of a unit blob.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BlobLayout {
    /// Entries in blob order.
    pub entries: Vec<BlobEntry>,
    /// Total bytes.
    pub bytes: usize,
}

impl BlobLayout {
    /// Appends a tensor, aligned to 256 bytes.
    pub fn push(&mut self, name: &str, dtype: DType, shape: &[usize]) {
        let offset = self.bytes.next_multiple_of(ALIGN);
        self.bytes = offset + numel(shape) * dtype.size();
        self.entries.push(BlobEntry {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
            offset,
        });
    }
}

/// A unit's frozen weights: one blob and its table, plus the quantized
/// linear weights (packed data and statistics) by name.
#[derive(Debug, Clone)]
pub struct UnitWeights {
    blob: Tensor,
    index: HashMap<String, BlobEntry>,
    layout: BlobLayout,
    quantized: HashMap<String, QuantizedTensor>,
}

impl UnitWeights {
    /// A zeroed blob of `layout` on `ctx`'s device.
    pub fn zeros(ctx: &Ctx, layout: BlobLayout) -> Result<Self> {
        let blob = Tensor::zeros(ctx, DType::U8, &[layout.bytes.max(1)])?;
        let index = layout
            .entries
            .iter()
            .map(|e| (e.name.clone(), e.clone()))
            .collect();
        Ok(Self {
            blob,
            index,
            layout,
            quantized: HashMap::new(),
        })
    }

    /// Adds a quantized weight.
    pub fn insert_quantized(&mut self, name: &str, q: QuantizedTensor) {
        self.quantized.insert(name.to_string(), q);
    }

    /// The quantized weight `name`, if this unit stores it quantized.
    pub fn quantized(&self, name: &str) -> Option<&QuantizedTensor> {
        self.quantized.get(name)
    }

    /// Bytes held on the device (blob and quantized weights).
    pub fn bytes(&self) -> usize {
        self.blob.bytes() + self.quantized.values().map(|q| q.bytes()).sum::<usize>()
    }

    /// A view of the tensor `name`.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        let e = self
            .index
            .get(name)
            .ok_or_else(|| Error::Invalid(format!("unit has no tensor `{name}`")))?;
        let bytes = numel(&e.shape) * e.dtype.size();
        Ok(self
            .blob
            .view(e.offset, &[bytes])?
            .reinterpret(e.dtype, &e.shape)?)
    }

    /// Whether the unit holds `name` (dense or quantized).
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name) || self.quantized.contains_key(name)
    }

    /// The blob's table.
    pub fn layout(&self) -> &BlobLayout {
        &self.layout
    }

    /// The blob itself (for stores that move or shard it).
    pub fn blob(&self) -> &Tensor {
        &self.blob
    }
}

/// Hands out the frozen weights of units 0 (embedding), 1..=L (layers) and
/// L+1 (final norm + head).
pub trait WeightStore: Send + Sync {
    /// Device views of unit `unit`, ready for compute.
    fn fetch(&self, unit: usize) -> Result<Arc<UnitWeights>>;
    /// Starts bringing `unit` to the device (no-op for resident weights).
    fn prefetch(&self, _unit: usize) -> Result<()> {
        Ok(())
    }
    /// Says `unit` is no longer needed on the device for now.
    fn release(&self, _unit: usize) -> Result<()> {
        Ok(())
    }
    /// Number of units.
    fn num_units(&self) -> usize;
}

/// Every unit resident on the device.
pub struct Resident {
    units: Vec<Arc<UnitWeights>>,
}

impl Resident {
    /// A store over already-filled units.
    pub fn new(units: Vec<UnitWeights>) -> Self {
        Self {
            units: units.into_iter().map(Arc::new).collect(),
        }
    }
}

impl WeightStore for Resident {
    fn fetch(&self, unit: usize) -> Result<Arc<UnitWeights>> {
        self.units.get(unit).cloned().ok_or_else(|| {
            Error::Invalid(format!(
                "no unit {unit} (the model has {})",
                self.units.len()
            ))
        })
    }
    fn num_units(&self) -> usize {
        self.units.len()
    }
}
