//! Sign bits: how a `[rows, cols]` sign matrix is packed into `u32` words.
//!
//! BitDelta (arXiv 2402.10193, eq. 1) approximates a weight delta `D = W_ft - W_base` by
//! `scale * sign(D)`. The signs are stored one bit each:
//!
//! ```text
//! signs: (rows, words_per_row) u32, words_per_row = ceil(cols / 32), little-endian words
//! bit b (LSB = bit 0) of word w of row r  =  sign of D[r, 32*w + b]
//!     1 -> D >= 0  (reconstructs as +scale; zero counts as +, as BitDelta's `mask[diff < 0] = 0`)
//!     0 -> D < 0   (reconstructs as -scale)
//! bits for columns >= cols ("padding") are 0; readers ignore them
//! ```
//!
//! Rows are packed independently, so a row always starts on a word boundary and a kernel can
//! walk one output feature's bits without knowing the others.

use rayon::prelude::*;

/// Below this many values a matrix is packed on the calling thread: rayon's fork-join costs
/// more than the work.
const PARALLEL_MIN_VALUES: usize = 1 << 16;

/// Number of `u32` words holding one row of `cols` sign bits: `ceil(cols / 32)`.
pub fn words_per_row(cols: usize) -> usize {
    cols.div_ceil(32)
}

/// Packs the signs of a row-major `[rows, cols]` matrix of `f32` into words (layout in the
/// [module docs](self)). A value `>= 0.0` (zero and -0.0 included, as in BitDelta's reference) becomes bit 1; negative values and NaN become 0.
///
/// # Panics
/// If `values.len() != rows * cols`; that is a caller bug, not bad data.
pub fn pack_signs(values: &[f32], rows: usize, cols: usize) -> Vec<u32> {
    pack_signs_generic(values, rows, cols)
}

/// [`pack_signs`] for `f64` values.
///
/// # Panics
/// If `values.len() != rows * cols`.
pub fn pack_signs_f64(values: &[f64], rows: usize, cols: usize) -> Vec<u32> {
    pack_signs_generic(values, rows, cols)
}

/// [`pack_signs`] for any ordered type with a zero `Default` (`f32`, `f64`, `half::bf16`,
/// `half::f16`, integers): bit 1 where `value >= T::default()`. Rows are packed in parallel.
///
/// # Panics
/// If `values.len() != rows * cols`.
pub fn pack_signs_generic<T>(values: &[T], rows: usize, cols: usize) -> Vec<u32>
where
    T: Copy + PartialOrd + Default + Sync,
{
    assert_eq!(
        Some(values.len()),
        rows.checked_mul(cols),
        "pack_signs: {} values for a [{rows}, {cols}] matrix",
        values.len()
    );
    let wpr = words_per_row(cols);
    let mut words = vec![0u32; rows * wpr];
    if wpr == 0 {
        return words;
    }
    let pack_row = |(out, row): (&mut [u32], &[T])| pack_row(row, out);
    if values.len() >= PARALLEL_MIN_VALUES {
        let min_rows = (PARALLEL_MIN_VALUES / cols).max(1);
        words
            .par_chunks_mut(wpr)
            .zip(values.par_chunks(cols))
            .with_min_len(min_rows)
            .for_each(pack_row);
    } else {
        words
            .chunks_mut(wpr)
            .zip(values.chunks(cols))
            .for_each(pack_row);
    }
    words
}

/// Packs one row; `out` has exactly `words_per_row(row.len())` words.
fn pack_row<T: Copy + PartialOrd + Default>(row: &[T], out: &mut [u32]) {
    let zero = T::default();
    for (word, chunk) in out.iter_mut().zip(row.chunks(32)) {
        let mut bits = 0u32;
        for (b, &v) in chunk.iter().enumerate() {
            bits |= u32::from(v >= zero) << b;
        }
        *word = bits;
    }
}

/// Unpacks words made by [`pack_signs`] into a row-major `[rows, cols]` matrix of `+1.0`
/// (bit 1) and `-1.0` (bit 0). Padding bits are ignored.
///
/// # Panics
/// If `words.len() != rows * words_per_row(cols)`.
pub fn unpack_signs(words: &[u32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * cols];
    unpack_signs_into(words, rows, cols, &mut out);
    out
}

/// [`unpack_signs`] into a caller's buffer of `rows * cols` values.
///
/// # Panics
/// If `words.len() != rows * words_per_row(cols)` or `out.len() != rows * cols`.
pub fn unpack_signs_into(words: &[u32], rows: usize, cols: usize, out: &mut [f32]) {
    let wpr = words_per_row(cols);
    assert_eq!(
        words.len(),
        rows * wpr,
        "unpack_signs: {} words for a [{rows}, {cols}] matrix",
        words.len()
    );
    assert_eq!(out.len(), rows * cols, "unpack_signs: output length");
    if cols == 0 {
        return;
    }
    for (row_out, row_words) in out.chunks_mut(cols).zip(words.chunks(wpr)) {
        for (chunk, &word) in row_out.chunks_mut(32).zip(row_words) {
            for (b, v) in chunk.iter_mut().enumerate() {
                *v = if (word >> b) & 1 == 1 { 1.0 } else { -1.0 };
            }
        }
    }
}

/// The mask of the bits in a row's last word that hold columns (the rest are padding).
fn last_word_mask(cols: usize) -> u32 {
    match cols % 32 {
        0 => u32::MAX,
        used => (1u32 << used) - 1,
    }
}

/// The first row whose padding bits are not all zero, or `None` if the padding is clean.
///
/// # Panics
/// If `words.len() != rows * words_per_row(cols)`.
pub fn first_row_with_padding_set(words: &[u32], rows: usize, cols: usize) -> Option<usize> {
    let wpr = words_per_row(cols);
    assert_eq!(words.len(), rows * wpr, "padding check: word count");
    if wpr == 0 {
        return None;
    }
    let padding = !last_word_mask(cols);
    (0..rows).find(|&r| words[r * wpr + wpr - 1] & padding != 0)
}

/// Reads little-endian `u32` words from bytes (as stored in a safetensors `U32` tensor).
/// Trailing bytes that do not fill a word are ignored.
pub fn words_from_le_bytes(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Writes words as little-endian bytes (as stored in a safetensors `U32` tensor).
pub fn words_to_le_bytes(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn matrix() -> impl Strategy<Value = (usize, usize, Vec<f32>)> {
        (1usize..10, 1usize..100).prop_flat_map(|(rows, cols)| {
            let value = prop_oneof![
                Just(0.0f32),
                Just(-0.0f32),
                Just(f32::MIN_POSITIVE),
                Just(-f32::MIN_POSITIVE),
                -1e3f32..1e3f32,
            ];
            (
                Just(rows),
                Just(cols),
                proptest::collection::vec(value, rows * cols),
            )
        })
    }

    proptest! {
        #[test]
        fn unpack_of_pack_is_sign_mapping_on_odd_shapes((rows, cols, values) in matrix()) {
            let words = pack_signs(&values, rows, cols);
            prop_assert_eq!(words.len(), rows * words_per_row(cols));
            let back = unpack_signs(&words, rows, cols);
            for (i, (&v, &s)) in values.iter().zip(&back).enumerate() {
                let expected = if v >= 0.0 { 1.0 } else { -1.0 };
                prop_assert_eq!(s, expected, "index {} value {}", i, v);
            }
        }

        #[test]
        fn padding_bits_are_zero((rows, cols, values) in matrix()) {
            let words = pack_signs(&values, rows, cols);
            prop_assert_eq!(first_row_with_padding_set(&words, rows, cols), None);
        }

        #[test]
        fn f64_and_f32_pack_alike((rows, cols, values) in matrix()) {
            let wide: Vec<f64> = values.iter().map(|&v| f64::from(v)).collect();
            prop_assert_eq!(pack_signs_f64(&wide, rows, cols), pack_signs(&values, rows, cols));
        }
    }

    #[test]
    fn bit_order_is_lsb_first_per_row() {
        // Row 0: only column 0 positive; row 1: only column 33 positive (word 1, bit 1).
        let cols = 35;
        let mut values = vec![-1.0f32; 2 * cols];
        values[0] = 2.0;
        values[cols + 33] = 0.5;
        let words = pack_signs(&values, 2, cols);
        assert_eq!(words, vec![0b1, 0, 0, 0b10]);
    }

    #[test]
    fn format_md_worked_example() {
        // docs/FORMAT.md "Sign bits": row 0 positive at columns 0, 1, 33; row 1 all positive.
        let cols = 35;
        let mut values = vec![-1.0f32; 2 * cols];
        for c in [0, 1, 33] {
            values[c] = 1.0;
        }
        values[cols..].fill(0.25);
        let words = pack_signs(&values, 2, cols);
        assert_eq!(
            words,
            vec![0x0000_0003, 0x0000_0002, 0xFFFF_FFFF, 0x0000_0007]
        );
        assert_eq!(
            words_to_le_bytes(&words),
            [3, 0, 0, 0, 2, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 7, 0, 0, 0]
        );
    }

    #[test]
    fn parallel_path_matches_serial_path() {
        let (rows, cols) = (300, 333); // > PARALLEL_MIN_VALUES values, cols not a multiple of 32
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 13) as f32 - 6.0)
            .collect();
        let mut serial = vec![0u32; rows * words_per_row(cols)];
        for (out, row) in serial
            .chunks_mut(words_per_row(cols))
            .zip(values.chunks(cols))
        {
            pack_row(row, out);
        }
        assert_eq!(pack_signs(&values, rows, cols), serial);
    }

    #[test]
    fn bf16_packs_like_f32() {
        let values = [1.5f32, -2.0, 0.0, 3.0, -0.0];
        let halves: Vec<half::bf16> = values.iter().map(|&v| half::bf16::from_f32(v)).collect();
        assert_eq!(pack_signs_generic(&halves, 1, 5), pack_signs(&values, 1, 5));
    }

    #[test]
    fn padding_garbage_is_found() {
        let mut words = pack_signs(&[1.0; 70], 2, 35);
        assert_eq!(first_row_with_padding_set(&words, 2, 35), None);
        words[3] |= 1 << 5;
        assert_eq!(first_row_with_padding_set(&words, 2, 35), Some(1));
    }

    #[test]
    fn le_bytes_round_trip() {
        let words = vec![0x0403_0201, 0xdead_beef];
        let bytes = words_to_le_bytes(&words);
        assert_eq!(&bytes[..4], &[1, 2, 3, 4]);
        assert_eq!(words_from_le_bytes(&bytes), words);
    }
}
