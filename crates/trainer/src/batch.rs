//! From a data-pipeline batch to the model's batch.
use llmft_data::Batch;
use llmft_models::ModelBatch;
use llmft_tensor::Ctx;

use crate::Result;

/// The model batch of a data batch on `ctx`: ids, next-token targets shifted
/// within each packed example, per-example positions, and (for packed rows)
/// segment ids so that attention stays inside each example; a row's padding
/// tail is a segment of its own. Dropout seeds are set by [`crate::Trainer`].
pub fn model_batch(ctx: &Ctx, batch: &Batch) -> Result<ModelBatch> {
    let ids: Vec<i32> = batch.input_ids.iter().map(|&t| t as i32).collect();
    let positions: Vec<i32> = batch.position_ids.iter().map(|&p| p as i32).collect();
    let targets = batch.targets();
    let packed = batch.cu_seqlens.iter().any(|b| b.len() > 2);
    let segments = packed.then(|| {
        let mut seg = vec![0i32; batch.rows * batch.seq_len];
        for (r, bounds) in batch.cu_seqlens.iter().enumerate() {
            let row = &mut seg[r * batch.seq_len..(r + 1) * batch.seq_len];
            let mut k = 0usize;
            for (t, s) in row.iter_mut().enumerate() {
                while k + 1 < bounds.len() && t >= bounds[k + 1] as usize {
                    k += 1;
                }
                *s = k as i32;
            }
        }
        seg
    });
    Ok(ModelBatch::from_host(
        ctx,
        batch.rows,
        batch.seq_len,
        &ids,
        Some(&targets),
        Some(&positions),
        segments.as_deref(),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_rows_get_segments_and_shifted_targets() {
        let ctx = Ctx::cpu();
        // One row of 8: example [5 6 7] (prompt 5), example [8 9], padding.
        let b = Batch {
            rows: 1,
            seq_len: 8,
            input_ids: vec![5, 6, 7, 8, 9, 0, 0, 0],
            labels: vec![-100, 6, 7, 8, 9, -100, -100, -100],
            position_ids: vec![0, 1, 2, 0, 1, 0, 0, 0],
            cu_seqlens: vec![vec![0, 3, 5]],
            examples: vec![vec![0, 1]],
        };
        let m = model_batch(&ctx, &b).unwrap();
        assert_eq!(m.ids.to_vec::<i32>().unwrap(), [5, 6, 7, 8, 9, 0, 0, 0]);
        assert_eq!(
            m.targets.to_vec::<i32>().unwrap(),
            [6, 7, -100, 9, -100, -100, -100, -100]
        );
        assert_eq!(
            m.positions.to_vec::<i32>().unwrap(),
            [0, 1, 2, 0, 1, 0, 0, 0]
        );
        let seg = m.segments.unwrap().to_vec::<i32>().unwrap();
        assert_eq!(seg, [0, 0, 0, 1, 1, 2, 2, 2]);

        let single = Batch {
            cu_seqlens: vec![vec![0, 5]],
            ..b
        };
        assert!(model_batch(&ctx, &single).unwrap().segments.is_none());
    }
}
