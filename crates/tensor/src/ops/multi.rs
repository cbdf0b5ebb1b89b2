//! Multi-tensor launches: one kernel over a list of tensors, through a
//! device table of pointers and element counts plus the prefix sums of each
//! tensor's chunk count, so that a block maps chunk `c` to (tensor, offset).
use crate::{Ctx, DType, Error, Result, Tensor};

/// Elements per chunk of a multi-tensor kernel (a multiple of 8, so chunks
/// keep a tensor's 16-byte alignment for vector loads).
pub(crate) const CHUNK: usize = 4096;

/// A device copy of a multi-tensor table kept between calls: a call whose
/// table (pointers, element counts) equals the cached one uploads nothing.
/// Keep one per call site (a cache alternating between two different tables
/// uploads every time); passing none uploads a fresh table per call. The
/// table is a small host→device copy on the compute stream, in stream order.
#[derive(Default)]
pub struct TableCache {
    host: Vec<u64>,
    dev: Option<Tensor>,
    uploads: u64,
}

impl TableCache {
    /// A cache holding nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Tables uploaded through this cache so far (misses).
    pub fn uploads(&self) -> u64 {
        self.uploads
    }
}

impl std::fmt::Debug for TableCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableCache")
            .field("words", &self.host.len())
            .field("uploads", &self.uploads)
            .finish()
    }
}

/// The host table of `cols` (each one u64 per tensor, e.g. pointers) and
/// the tensors' element counts `lens`, laid out as `cols…, lens, chunk
/// offsets (T+1)`; with the total number of chunks.
pub(crate) fn build(cols: &[Vec<u64>], lens: &[usize]) -> (Vec<u64>, u64) {
    let t = lens.len();
    let mut host = Vec::with_capacity((cols.len() + 2) * t + 1);
    for c in cols {
        debug_assert_eq!(c.len(), t);
        host.extend_from_slice(c);
    }
    host.extend(lens.iter().map(|&n| n as u64));
    let mut acc = 0u64;
    host.push(0);
    for &n in lens {
        acc += n.div_ceil(CHUNK) as u64;
        host.push(acc);
    }
    (host, acc)
}

/// The table `host` on `ctx`'s device: the cached copy when equal, else a
/// fresh upload (remembered in `cache` when given).
pub(crate) fn upload(ctx: &Ctx, host: Vec<u64>, cache: Option<&mut TableCache>) -> Result<Tensor> {
    if let Some(c) = &cache {
        if let Some(d) = &c.dev {
            if c.host == host && d.device() == ctx.device() {
                return Ok(d.clone());
            }
        }
    }
    let words: &[i32] = bytemuck::cast_slice(&host);
    let mut h = Tensor::zeros(&Ctx::cpu(), DType::I32, &[words.len()])?;
    h.as_mut_slice::<i32>()?.copy_from_slice(words);
    let mut d = Tensor::empty(ctx, DType::I32, &[words.len()])?;
    d.copy_from(ctx, &h)?;
    if let Some(c) = cache {
        c.host = host;
        c.dev = Some(d.clone());
        c.uploads += 1;
    }
    Ok(d)
}

/// Checks that the per-tensor lists of a multi-tensor op have one length.
pub(crate) fn same_len(op: &'static str, lens: &[(&str, usize)]) -> Result<usize> {
    let n = lens.first().map_or(0, |l| l.1);
    if let Some((what, l)) = lens.iter().find(|l| l.1 != n) {
        return Err(Error::Invalid {
            op,
            msg: format!("{what} lists {l} tensors, {} lists {n}", lens[0].0),
        });
    }
    if n > i32::MAX as usize {
        return Err(Error::Invalid {
            op,
            msg: format!("{n} tensors in one call"),
        });
    }
    Ok(n)
}

/// Blocks of a multi-tensor launch over `chunks` chunks, at most `cap`.
pub(crate) fn grid(chunks: u64, cap: usize) -> usize {
    (chunks as usize).clamp(1, cap.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_layout_and_chunk_offsets() {
        let (h, chunks) = build(&[vec![10, 20, 30]], &[0, CHUNK + 1, CHUNK]);
        assert_eq!(chunks, 3);
        assert_eq!(
            h,
            vec![10, 20, 30, 0, CHUNK as u64 + 1, CHUNK as u64, 0, 0, 2, 3]
        );
        assert_eq!(build(&[vec![]], &[]), (vec![0], 0));
    }

    #[test]
    fn cache_reuses_equal_tables() {
        let ctx = Ctx::cpu();
        let mut c = TableCache::new();
        upload(&ctx, vec![1, 2], Some(&mut c)).unwrap();
        let d = upload(&ctx, vec![1, 2], Some(&mut c)).unwrap();
        assert_eq!(c.uploads(), 1);
        assert_eq!(d.to_vec::<i32>().unwrap(), vec![1, 0, 2, 0]);
        upload(&ctx, vec![1, 3], Some(&mut c)).unwrap();
        assert_eq!(c.uploads(), 2);
    }
}
