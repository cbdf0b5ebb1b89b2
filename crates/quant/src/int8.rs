//! bitsandbytes' vector-wise int8 (LLM.int8) on the CPU: one absmax per row
//! (`SCB`), `q = round_half_even(x * (127 · (1/absmax)))`.
//!
//! The optional outlier threshold of LLM.int8: values with `|x| >= threshold`
//! are left out of the row's absmax and stored as 0, and the columns holding
//! them are reported so a caller can keep those columns in 16 bits (the
//! sparse decomposition). bnb additionally zeroes the whole outlier columns
//! when a matrix has more than one row; so does this crate. With threshold 0
//! (the default) nothing is held back.

/// `(q, scb, outlier_cols)` of a `[rows, cols]` matrix given as f32.
pub fn quantize(
    x: &[f32],
    rows: usize,
    cols: usize,
    threshold: f32,
) -> (Vec<i8>, Vec<f32>, Vec<i32>) {
    let sparse = threshold > 0.0;
    let mut q = vec![0i8; rows * cols];
    let mut scb = vec![0f32; rows];
    let mut outlier = vec![false; cols];
    for r in 0..rows {
        let row = &x[r * cols..(r + 1) * cols];
        // bnb starts its max at -FLT_MIN (a tiny negative), so an empty or
        // all-zero row gives 0 after fmaxf with |x|.
        let mut m = -f32::MIN_POSITIVE;
        for (c, &v) in row.iter().enumerate() {
            let a = v.abs();
            if sparse && a >= threshold {
                outlier[c] = true;
            } else {
                m = m.max(a);
            }
        }
        scb[r] = m;
        // bnb.s __fdividef is 127 times the approximate reciprocal.
        let scale = 127.0f32 * crate::bnb::rcp_approx(m);
        for (c, &v) in row.iter().enumerate() {
            q[r * cols + c] = if sparse && v.abs() >= threshold {
                0
            } else {
                round_to_i8(v * scale)
            };
        }
    }
    let cols_out: Vec<i32> = (0..cols as i32).filter(|&c| outlier[c as usize]).collect();
    if rows > 1 {
        for r in 0..rows {
            for &c in &cols_out {
                q[r * cols + c as usize] = 0;
            }
        }
    }
    (q, scb, cols_out)
}

/// `__float2int_rn` then the int8 store: NaN gives 0.
fn round_to_i8(v: f32) -> i8 {
    if v.is_nan() {
        0
    } else {
        v.round_ties_even() as i32 as i8
    }
}

/// bnb's `int8_vectorwise_dequant`: `(q * scb[row]) * (1/127)` in f32.
pub fn dequantize(q: &[i8], scb: &[f32], cols: usize, out: &mut [f32]) {
    const INV127: f32 = 7.874_016e-3;
    for (i, o) in out.iter_mut().enumerate() {
        *o = (q[i] as f32 * scb[i / cols]) * INV127;
    }
}
