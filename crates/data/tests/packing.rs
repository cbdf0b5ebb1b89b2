//! Acceptance 2: packing and batching properties.
//! - no token attends across an example (checked on the boundaries the
//!   batches carry, and on the per-example shifted targets);
//! - every trained label survives packing, each example exactly once per epoch;
//! - rank shards are disjoint;
//! - resuming from a cursor yields exactly the remaining batches.

use std::collections::BTreeSet;

use llmft_data::{
    Batch, BatchConfig, EncodedExample, Loader, Shard, TokenizedDataset, IGNORE_INDEX,
};
use proptest::prelude::*;

/// Examples with token ids unique per (example, position) so that any mixing
/// up would show; `masks[i][t]` says whether token t of example i is trained.
fn dataset(lens: &[usize], masks: &[Vec<bool>]) -> TokenizedDataset {
    let mut d = TokenizedDataset::new(0);
    for (i, (&len, mask)) in lens.iter().zip(masks).enumerate() {
        let ids: Vec<u32> = (0..len).map(|t| 1 + (i * 1000 + t) as u32).collect();
        let labels = ids
            .iter()
            .zip(mask)
            .map(|(&id, &m)| if m { id as i32 } else { IGNORE_INDEX })
            .collect();
        d.push(&EncodedExample {
            input_ids: ids,
            labels,
            truncated: false,
        });
    }
    d
}

fn arb_dataset(max_len: usize) -> impl Strategy<Value = (Vec<usize>, Vec<Vec<bool>>)> {
    prop::collection::vec(1..=max_len, 1..60).prop_flat_map(|lens| {
        let masks = lens
            .iter()
            .map(|&l| prop::collection::vec(any::<bool>(), l))
            .collect::<Vec<_>>();
        (Just(lens), masks)
    })
}

fn cfg(packing: bool, seq_len: usize, batch_size: usize, window: usize, seed: u64) -> BatchConfig {
    BatchConfig {
        batch_size,
        packing,
        seq_len,
        pack_window: window,
        seed,
        ..BatchConfig::default()
    }
}

/// Check one batch's layout against the dataset; returns the (example,
/// position, label) triples it trains.
fn check_batch(b: &Batch, d: &TokenizedDataset) -> Vec<(u32, usize, i32)> {
    let mut trained = Vec::new();
    assert_eq!(b.input_ids.len(), b.rows * b.seq_len);
    assert_eq!(b.labels.len(), b.rows * b.seq_len);
    assert_eq!(b.position_ids.len(), b.rows * b.seq_len);
    for r in 0..b.rows {
        let bounds = &b.cu_seqlens[r];
        assert_eq!(bounds[0], 0);
        assert_eq!(bounds.len(), b.examples[r].len() + 1);
        assert!(*bounds.last().unwrap() as usize <= b.seq_len);
        let base = r * b.seq_len;
        // Owner of each position, computed from the examples' lengths.
        let mut owner = vec![None; b.seq_len];
        let mut pos = 0;
        for (k, &ex) in b.examples[r].iter().enumerate() {
            let len = d.example_len(ex as usize);
            assert_eq!(bounds[k + 1] as usize - bounds[k] as usize, len);
            let full = d.example(ex as usize);
            for t in 0..len {
                owner[pos + t] = Some(k);
                assert_eq!(b.input_ids[base + pos + t], full.input_ids[t]);
                assert_eq!(b.labels[base + pos + t], full.labels[t]);
                assert_eq!(b.position_ids[base + pos + t] as usize, t);
                if full.labels[t] != IGNORE_INDEX {
                    trained.push((ex, t, full.labels[t]));
                }
            }
            pos += len;
        }
        for t in pos..b.seq_len {
            assert_eq!(b.labels[base + t], IGNORE_INDEX, "padding is never trained");
        }
        // Attention: causal and only within the owner example.
        for q in 0..b.seq_len {
            for k in 0..b.seq_len {
                let allowed = k <= q && owner[q].is_some() && owner[q] == owner[k];
                assert_eq!(b.can_attend(r, q, k), allowed, "row {r} q {q} k {k}");
            }
        }
        // Shifted targets never cross an example boundary.
        let targets = b.targets();
        for t in 0..b.seq_len {
            let want = match (owner[t], owner.get(t + 1).copied().flatten()) {
                (Some(a), Some(c)) if a == c => b.labels[base + t + 1],
                _ => IGNORE_INDEX,
            };
            assert_eq!(targets[base + t], want);
        }
    }
    // Flattened boundaries cover every row and split at every boundary.
    let flat = b.flat_cu_seqlens();
    assert_eq!(*flat.last().unwrap() as usize, b.rows * b.seq_len);
    for (r, bounds) in b.cu_seqlens.iter().enumerate() {
        for &x in bounds {
            assert!(flat.contains(&((r * b.seq_len) as u32 + x)));
        }
    }
    trained
}

fn all_trained(d: &TokenizedDataset) -> BTreeSet<(u32, usize, i32)> {
    let mut s = BTreeSet::new();
    for i in 0..d.len() {
        for (t, &l) in d.example(i).labels.iter().enumerate() {
            if l != IGNORE_INDEX {
                s.insert((i as u32, t, l));
            }
        }
    }
    s
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn packing_keeps_examples_apart_and_every_label(
        (lens, masks) in arb_dataset(24),
        extra in 0usize..40,
        batch_size in 1usize..4,
        window in 1usize..6,
        seed in any::<u64>(),
        epoch in 0u64..3,
    ) {
        let d = dataset(&lens, &masks);
        let mut loader = Loader::with_batch_config(&d, cfg(true, 24 + extra, batch_size, window, seed), Shard::single()).unwrap();
        let n = loader.batches_in_epoch(epoch);
        let mut seen_examples = Vec::new();
        let mut trained = BTreeSet::new();
        for i in 0..n {
            let b = loader.batch_at(epoch, i).unwrap();
            for (ex, t, l) in check_batch(&b, &d) {
                prop_assert!(trained.insert((ex, t, l)), "label trained twice");
            }
            seen_examples.extend(b.examples.iter().flatten().copied());
        }
        seen_examples.sort_unstable();
        prop_assert_eq!(seen_examples, (0..d.len() as u32).collect::<Vec<_>>());
        prop_assert_eq!(trained, all_trained(&d));
    }

    #[test]
    fn padding_keeps_every_label(
        (lens, masks) in arb_dataset(30),
        batch_size in 1usize..5,
        group in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let d = dataset(&lens, &masks);
        let c = BatchConfig { group_by_length: group, ..cfg(false, 0, batch_size, 1, seed) };
        let mut loader = Loader::with_batch_config(&d, c, Shard::single()).unwrap();
        let mut trained = BTreeSet::new();
        for i in 0..loader.batches_in_epoch(0) {
            let b = loader.batch_at(0, i).unwrap();
            prop_assert_eq!(b.seq_len % 8, 0);
            prop_assert!(b.examples.iter().all(|r| r.len() == 1));
            trained.extend(check_batch(&b, &d));
        }
        prop_assert_eq!(trained, all_trained(&d));
    }

    #[test]
    fn rank_shards_are_disjoint_and_equal_in_length(
        (lens, masks) in arb_dataset(16),
        world in 1usize..5,
        packing in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let d = dataset(&lens, &masks);
        let mut seen = BTreeSet::new();
        let mut counts = Vec::new();
        for rank in 0..world {
            let mut loader = Loader::with_batch_config(&d, cfg(packing, 32, 2, 4, seed), Shard::new(rank, world).unwrap()).unwrap();
            let n = loader.batches_in_epoch(1);
            counts.push(n);
            for i in 0..n {
                for &ex in loader.batch_at(1, i).unwrap().examples.iter().flatten() {
                    prop_assert!(seen.insert(ex), "example {} on two ranks", ex);
                }
            }
        }
        prop_assert!(counts.iter().all(|&c| c == counts[0]));
    }

    #[test]
    fn resume_from_a_cursor_yields_exactly_the_remaining_batches(
        (lens, masks) in arb_dataset(20),
        packing in any::<bool>(),
        stop in 0usize..40,
        seed in any::<u64>(),
        world in 1usize..3,
    ) {
        let d = dataset(&lens, &masks);
        let c = cfg(packing, 40, 2, 3, seed);
        let shard = Shard::new(world - 1, world).unwrap();
        let mut first = Loader::with_batch_config(&d, c.clone(), shard).unwrap();
        if first.batches_in_epoch(0) == 0 {
            return Ok(());
        }
        for _ in 0..stop {
            first.next_batch().unwrap();
        }
        let cursor = first.cursor();
        let mut resumed = Loader::with_batch_config(&d, c, shard).unwrap();
        resumed.seek(cursor);
        // Through the end of this epoch and into the next ones.
        for _ in 0..30 {
            prop_assert_eq!(first.cursor(), resumed.cursor());
            prop_assert_eq!(first.next_batch(), resumed.next_batch());
        }
    }
}

#[test]
fn epochs_are_shuffled_differently_and_reproducibly() {
    let lens: Vec<usize> = (1..=40).collect();
    let masks: Vec<Vec<bool>> = lens.iter().map(|&l| vec![true; l]).collect();
    let d = dataset(&lens, &masks);
    let order = |epoch: u64, seed: u64| {
        let mut l =
            Loader::with_batch_config(&d, cfg(true, 64, 1, 4, seed), Shard::single()).unwrap();
        (0..l.batches_in_epoch(epoch))
            .flat_map(|i| l.batch_at(epoch, i).unwrap().examples.concat())
            .collect::<Vec<_>>()
    };
    assert_eq!(order(0, 1), order(0, 1));
    assert_ne!(order(0, 1), order(1, 1));
    assert_ne!(order(0, 1), order(0, 2));
}

#[test]
fn cursor_moves_to_the_next_epoch_after_the_last_batch() {
    let lens = vec![10; 6];
    let masks: Vec<Vec<bool>> = lens.iter().map(|&l| vec![true; l]).collect();
    let d = dataset(&lens, &masks);
    let mut l = Loader::with_batch_config(&d, cfg(true, 20, 1, 1, 0), Shard::single()).unwrap();
    assert_eq!(l.batches_in_epoch(0), 3);
    l.next_batch();
    l.next_batch();
    assert_eq!(l.cursor(), llmft_data::Cursor { epoch: 0, index: 2 });
    l.next_batch();
    assert_eq!(l.cursor(), llmft_data::Cursor { epoch: 1, index: 0 });
}
