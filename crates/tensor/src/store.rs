//! Where a model's frozen weights live: the store seam.
//!
//! A model is a sequence of named [`Unit`]s (embedding, decoder layers,
//! head). A unit's frozen weights are ONE contiguous byte blob with a table of
//! `(name, dtype, shape, offset)` entries ([`BlobLayout`]); dense tensors and
//! the parts of quantized ones (packed data, statistics) alike are entries. A
//! store only moves those bytes: it never knows what a weight is, so it can
//! copy, pin or shard a unit whole.
//!
//! [`WeightStore::fetch`] hands out a [`UnitGuard`] (views ready for compute
//! on the compute stream) that releases the unit on drop. The model declares
//! the order of a pass once ([`WeightStore::schedule`]); a store that moves
//! bytes (offloaded, sharded) prefetches the next units of that order on its
//! own stream while the current one computes. [`Resident`] keeps every unit
//! on the compute device.
//!
//! ```
//! use llmft_tensor::store::{BlobLayout, Resident, StoreBuilder, Unit, WeightStore};
//! use llmft_tensor::{Ctx, DType, Tensor};
//! let ctx = Ctx::cpu();
//! // A model without decoder layers: the embedding and the head.
//! let mut b = Resident::builder(&ctx, 2);
//! for unit in Unit::all(0) {
//!     let mut layout = BlobLayout::default();
//!     layout.push("w", DType::F32, &[2]);
//!     let blob = b.alloc(unit, layout)?;
//!     blob.get("w")?.copy_from(&ctx, &Tensor::from_slice(&ctx, &[1f32, 2.0], &[2])?)?;
//!     b.add(unit, blob)?;
//! }
//! let store = b.finish()?;
//! let u = store.fetch(Unit::Head)?;
//! assert_eq!(u.get("w")?.to_vec::<f32>()?, vec![1.0, 2.0]);
//! # Ok::<(), llmft_tensor::Error>(())
//! ```
use std::collections::HashMap;
use std::sync::Arc;

use crate::{numel, Ctx, DType, Device, Error, Result, StreamKind, Tensor};

/// Byte alignment of each entry inside a blob.
pub const ALIGN: usize = 256;

/// A unit of a model: what one fetch brings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Unit {
    /// The token embedding.
    Embed,
    /// Decoder layer `i` (0-based).
    Layer(usize),
    /// Final norm and LM head.
    Head,
}

impl Unit {
    /// Position of the unit among `num_units` (embedding 0, layers, head last).
    pub fn index(self, num_units: usize) -> usize {
        match self {
            Unit::Embed => 0,
            Unit::Layer(i) => i + 1,
            Unit::Head => num_units - 1,
        }
    }

    /// The unit at position `i` of `num_units`.
    pub fn from_index(i: usize, num_units: usize) -> Self {
        match i {
            0 => Unit::Embed,
            i if i + 1 == num_units => Unit::Head,
            i => Unit::Layer(i - 1),
        }
    }

    /// Every unit of a model with `num_layers` decoder layers, in forward order.
    pub fn all(num_layers: usize) -> impl Iterator<Item = Unit> {
        std::iter::once(Unit::Embed)
            .chain((0..num_layers).map(Unit::Layer))
            .chain(std::iter::once(Unit::Head))
    }
}

impl std::fmt::Display for Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unit::Embed => f.write_str("embedding"),
            Unit::Layer(i) => write!(f, "layer {i}"),
            Unit::Head => f.write_str("head"),
        }
    }
}

/// One tensor's place in a unit blob.
#[derive(Debug, Clone, PartialEq)]
pub struct BlobEntry {
    /// Tensor name (Hugging Face names; quantized parts as `name#part`).
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// Byte offset in the blob.
    pub offset: usize,
}

impl BlobEntry {
    /// Bytes of the entry.
    pub fn bytes(&self) -> usize {
        numel(&self.shape) * self.dtype.size()
    }
}

/// The table of a unit blob.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BlobLayout {
    /// Entries in blob order.
    pub entries: Vec<BlobEntry>,
    /// Total bytes.
    pub bytes: usize,
    index: HashMap<String, usize>,
}

impl BlobLayout {
    /// Appends a tensor, aligned to [`ALIGN`] bytes. A name pushed twice
    /// keeps its first entry's place in lookups.
    pub fn push(&mut self, name: &str, dtype: DType, shape: &[usize]) {
        let offset = self.bytes.next_multiple_of(ALIGN);
        self.bytes = offset + numel(shape) * dtype.size();
        self.index
            .entry(name.to_string())
            .or_insert(self.entries.len());
        self.entries.push(BlobEntry {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
            offset,
        });
    }

    /// The entry `name`.
    pub fn entry(&self, name: &str) -> Option<&BlobEntry> {
        self.index.get(name).map(|&i| &self.entries[i])
    }

    /// Whether the blob holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Bytes of the blob as stores allocate it (at least 1).
    pub fn alloc_bytes(&self) -> usize {
        self.bytes.max(1)
    }
}

fn no_entry(unit: Option<Unit>, name: &str) -> Error {
    Error::Invalid {
        op: "store",
        msg: match unit {
            Some(u) => format!("{u} has no tensor `{name}`"),
            None => format!("the unit has no tensor `{name}`"),
        },
    }
}

/// A unit's bytes (a `u8` tensor) and its table.
#[derive(Debug, Clone)]
pub struct UnitBlob {
    /// The bytes.
    pub bytes: Tensor,
    /// The table.
    pub layout: Arc<BlobLayout>,
}

impl UnitBlob {
    /// A zeroed blob of `layout` on `ctx`'s device.
    pub fn zeros(ctx: &Ctx, layout: BlobLayout) -> Result<Self> {
        Ok(Self {
            bytes: Tensor::zeros(ctx, DType::U8, &[layout.alloc_bytes()])?,
            layout: Arc::new(layout),
        })
    }

    /// A zeroed blob of `layout` in page-locked host memory of `ctx`'s GPU
    /// (ordinary host memory on a CPU context).
    pub fn zeros_pinned(ctx: &Ctx, layout: BlobLayout) -> Result<Self> {
        Ok(Self {
            bytes: Tensor::zeros_pinned(ctx, DType::U8, &[layout.alloc_bytes()])?,
            layout: Arc::new(layout),
        })
    }

    /// A view of the entry `name`.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        let e = self
            .layout
            .entry(name)
            .ok_or_else(|| no_entry(None, name))?;
        entry_view(&self.bytes, e)
    }
}

/// A view of entry `e` in `bytes`.
pub fn entry_view(bytes: &Tensor, e: &BlobEntry) -> Result<Tensor> {
    bytes
        .view(e.offset, &[e.bytes()])?
        .reinterpret(e.dtype, &e.shape)
}

/// A fetched unit: views of its blob on the compute device, valid until the
/// guard is dropped (then the store may reuse the memory; views taken from
/// the guard must not be used after it).
pub struct UnitGuard {
    unit: Unit,
    blob: Tensor,
    layout: Arc<BlobLayout>,
    release: Option<Box<dyn FnOnce() + Send>>,
}

impl UnitGuard {
    /// A guard over `blob`; `release` runs when it is dropped.
    pub fn new(
        unit: Unit,
        blob: Tensor,
        layout: Arc<BlobLayout>,
        release: Option<Box<dyn FnOnce() + Send>>,
    ) -> Self {
        Self {
            unit,
            blob,
            layout,
            release,
        }
    }

    /// Which unit.
    pub fn unit(&self) -> Unit {
        self.unit
    }

    /// A view of the entry `name`.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        let e = self
            .layout
            .entry(name)
            .ok_or_else(|| no_entry(Some(self.unit), name))?;
        entry_view(&self.blob, e)
    }

    /// Whether the unit holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.layout.contains(name)
    }

    /// The table.
    pub fn layout(&self) -> &Arc<BlobLayout> {
        &self.layout
    }

    /// The whole blob.
    pub fn blob(&self) -> &Tensor {
        &self.blob
    }
}

impl Drop for UnitGuard {
    fn drop(&mut self) {
        if let Some(r) = self.release.take() {
            r();
        }
    }
}

impl std::fmt::Debug for UnitGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UnitGuard({}, {} bytes)", self.unit, self.layout.bytes)
    }
}

/// Bytes a store holds, by where.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreBytes {
    /// Bytes of the units' home copies on the compute device.
    pub device: usize,
    /// Bytes of the units' home copies in host memory.
    pub host: usize,
    /// Bytes of reusable device buffers units are fetched into.
    pub buffers: usize,
}

/// Hands out the frozen weights of a model's units. See the module docs.
pub trait WeightStore: Send + Sync {
    /// Number of units (layers + 2).
    fn num_units(&self) -> usize;

    /// The table of `unit`.
    fn layout(&self, unit: Unit) -> Result<Arc<BlobLayout>>;

    /// Declares the order in which the next pass fetches units; fetches that
    /// follow it are prefetched ahead. A fetch outside the order is served
    /// synchronously.
    fn schedule(&self, order: &[Unit]) -> Result<()>;

    /// Views of `unit` on the compute device, ordered before the compute
    /// stream's next work.
    fn fetch(&self, unit: Unit) -> Result<UnitGuard>;

    /// Overwrites the entry `name` of `unit` with `src` (any device) where
    /// the unit lives, so later fetches see it. No guard of `unit` may be
    /// alive.
    fn write(&self, unit: Unit, name: &str, src: &Tensor) -> Result<()>;

    /// A copy of the entry `name` of `unit` in host memory (for exports and
    /// checkpoints that must not hold the device).
    fn read_host(&self, unit: Unit, name: &str) -> Result<Tensor>;

    /// A view of entry `name` of `unit` that lives permanently on the
    /// compute device, where the store keeps it there (the resident store):
    /// an optimizer may then update it in place. `None` elsewhere.
    fn device_view(&self, _unit: Unit, _name: &str) -> Option<Tensor> {
        None
    }

    /// Bytes held, by where.
    fn bytes(&self) -> StoreBytes;
}

/// Builds a store unit by unit: [`StoreBuilder::alloc`] gives a zeroed blob
/// to fill (loading writes into it), [`StoreBuilder::add`] hands it back.
/// Loaders stream units through a builder, so no more than one unit exists
/// outside the store's home at a time.
pub trait StoreBuilder {
    /// A zeroed blob for `unit` of `layout`, where filling it is cheapest
    /// (for stores that keep units off the device: their home memory).
    fn alloc(&mut self, unit: Unit, layout: BlobLayout) -> Result<UnitBlob>;
    /// Takes the filled blob of `unit`; returns the blob as the store keeps
    /// it (a view of the home copy, for reading tables and statistics).
    fn add(&mut self, unit: Unit, blob: UnitBlob) -> Result<UnitBlob>;
    /// The store.
    fn finish(self: Box<Self>) -> Result<Box<dyn WeightStore>>;
}

/// Every unit resident on the compute device.
pub struct Resident {
    ctx: Ctx,
    units: Vec<Option<UnitBlob>>,
}

fn unit_slot<T>(slots: &[T], unit: Unit) -> Result<&T> {
    let n = slots.len();
    let i = unit.index(n);
    let in_range = match unit {
        Unit::Layer(l) => l + 2 < n,
        _ => n >= 2,
    };
    slots
        .get(i)
        .filter(|_| in_range)
        .ok_or_else(|| Error::Invalid {
            op: "store",
            msg: format!("no {unit} in a store of {n} units"),
        })
}

impl Resident {
    /// A builder of a resident store of `num_units` units on `ctx`.
    pub fn builder(ctx: &Ctx, num_units: usize) -> Box<dyn StoreBuilder> {
        Box::new(Resident {
            ctx: ctx.clone(),
            units: vec![None; num_units.max(2)],
        })
    }

    fn blob(&self, unit: Unit) -> Result<&UnitBlob> {
        unit_slot(&self.units, unit)?
            .as_ref()
            .ok_or_else(|| Error::Invalid {
                op: "store",
                msg: format!("{unit} was never added to the store"),
            })
    }
}

impl StoreBuilder for Resident {
    fn alloc(&mut self, _unit: Unit, layout: BlobLayout) -> Result<UnitBlob> {
        UnitBlob::zeros(&self.ctx, layout)
    }

    fn add(&mut self, unit: Unit, blob: UnitBlob) -> Result<UnitBlob> {
        let i = unit.index(self.units.len());
        unit_slot(&self.units, unit)?;
        if blob.bytes.device() != self.ctx.device() {
            return Err(Error::Device {
                op: "store",
                what: "unit blob",
                got: blob.bytes.device(),
                expected: self.ctx.device(),
            });
        }
        self.units[i] = Some(blob.clone());
        Ok(blob)
    }

    fn finish(self: Box<Self>) -> Result<Box<dyn WeightStore>> {
        for (i, u) in self.units.iter().enumerate() {
            if u.is_none() {
                return Err(Error::Invalid {
                    op: "store",
                    msg: format!(
                        "{} was never added to the store",
                        Unit::from_index(i, self.units.len())
                    ),
                });
            }
        }
        Ok(self)
    }
}

impl WeightStore for Resident {
    fn num_units(&self) -> usize {
        self.units.len()
    }

    fn layout(&self, unit: Unit) -> Result<Arc<BlobLayout>> {
        Ok(self.blob(unit)?.layout.clone())
    }

    fn schedule(&self, _order: &[Unit]) -> Result<()> {
        Ok(())
    }

    fn fetch(&self, unit: Unit) -> Result<UnitGuard> {
        let b = self.blob(unit)?;
        Ok(UnitGuard::new(
            unit,
            b.bytes.clone(),
            b.layout.clone(),
            None,
        ))
    }

    fn write(&self, unit: Unit, name: &str, src: &Tensor) -> Result<()> {
        let mut dst = self.blob(unit)?.get(name)?;
        dst.copy_from_on(&self.ctx, src, StreamKind::Compute)
    }

    fn read_host(&self, unit: Unit, name: &str) -> Result<Tensor> {
        self.blob(unit)?.get(name)?.to_ctx(&Ctx::cpu())
    }

    fn device_view(&self, unit: Unit, name: &str) -> Option<Tensor> {
        self.blob(unit).ok()?.get(name).ok()
    }

    fn bytes(&self) -> StoreBytes {
        let total = self
            .units
            .iter()
            .flatten()
            .map(|b| b.bytes.bytes())
            .sum::<usize>();
        match self.ctx.device() {
            Device::Cpu => StoreBytes {
                host: total,
                ..Default::default()
            },
            Device::Cuda(_) => StoreBytes {
                device: total,
                ..Default::default()
            },
        }
    }
}
