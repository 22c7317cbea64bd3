//! The crate's one error type.

use crate::cpu::SimdLevel;

/// Everything a kernel call can reject. Messages name the argument and the sizes involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KernelError {
    // === Shapes ===
    /// A sign matrix with no columns: there is nothing to multiply and `M` cannot be inferred.
    #[error("sign matrix [{n}, 0]: K must be at least 1")]
    EmptyInner {
        /// Rows (output features) of the matrix.
        n: usize,
    },
    /// The packed words do not hold an `[n, k]` matrix.
    #[error(
        "sign words: {got} u32 words, an [{n}, {k}] matrix needs {n} x {words_per_row} = {expected}"
    )]
    WordCount {
        /// Rows of the matrix.
        n: usize,
        /// Columns of the matrix.
        k: usize,
        /// `ceil(k / 32)`.
        words_per_row: usize,
        /// `n * words_per_row`.
        expected: usize,
        /// Words given.
        got: usize,
    },
    /// The words tensor has the wrong dtype or shape.
    #[error("sign words tensor: {dtype} {shape:?}, an [{n}, {k}] matrix needs u32 [{n}, {words_per_row}]")]
    WordsTensor {
        /// Its dtype, as candle prints it.
        dtype: String,
        /// Its shape.
        shape: Vec<usize>,
        /// Rows of the matrix.
        n: usize,
        /// Columns of the matrix.
        k: usize,
        /// `ceil(k / 32)`.
        words_per_row: usize,
    },
    /// The input's length (or last dimension) does not fit the matrix.
    #[error("{op}: input {what} has {got} values, not a multiple of (or equal to) {expected}")]
    InputLength {
        /// The operation (`sign_matmul_t`, ...).
        op: &'static str,
        /// Which input (`x`, `g`, `x last dim`).
        what: &'static str,
        /// The size expected.
        expected: usize,
        /// The size given.
        got: usize,
    },

    // === Tenants ===
    /// `row_slot` and `x` disagree on the number of rows.
    #[error("tenant_delta_matmul: row_slot has {got} entries, x has {m} rows")]
    RowSlotLength {
        /// Rows of `x`.
        m: usize,
        /// Entries of `row_slot`.
        got: usize,
    },
    /// A row names a slot that is not in `deltas`.
    #[error(
        "tenant_delta_matmul: row {row} uses slot {slot}, but only {num_deltas} deltas were given"
    )]
    SlotOutOfRange {
        /// The batch row.
        row: usize,
        /// Its slot.
        slot: u32,
        /// `deltas.len()`.
        num_deltas: usize,
    },
    /// Two deltas of one call have different shapes.
    #[error("tenant_delta_matmul: delta {index} is [{n}, {k}] but delta 0 is [{n0}, {k0}]")]
    DeltaShapeMismatch {
        /// Index of the odd delta in `deltas`.
        index: usize,
        /// Its rows.
        n: usize,
        /// Its columns.
        k: usize,
        /// Rows of delta 0.
        n0: usize,
        /// Columns of delta 0.
        k0: usize,
    },
    /// No deltas: the output width `N` is unknown.
    #[error("tenant_delta_matmul: no deltas given, so the output width N is unknown")]
    NoDeltas,
    /// `tenant_delta_matmul_add`: the base output does not match `(M, N)` and `x`'s dtype.
    #[error("tenant_delta_matmul_add: base is {got} but must be {want} (x · W_baseᵀ for the same rows, x's dtype)")]
    BaseShape {
        /// What the base is (shape and dtype).
        got: String,
        /// What it must be.
        want: String,
    },

    // === Dispatch ===
    /// A SIMD level was forced that this CPU lacks.
    #[error("SIMD level {level:?} is not available on this CPU")]
    SimdUnavailable {
        /// The level asked for.
        level: SimdLevel,
    },
    /// The input dtype is not one the kernels take.
    #[error("{op}: dtype {dtype} is not supported (f32, bf16 and f16 are)")]
    UnsupportedDType {
        /// The operation.
        op: &'static str,
        /// The dtype given, as candle prints it.
        dtype: String,
    },
    /// The tensors are not where the kernel runs.
    #[error(
        "{op}: {what} is on {device}, where this op's kernel for the input's device cannot read it"
    )]
    UnsupportedDevice {
        /// The operation.
        op: &'static str,
        /// Which tensor.
        what: &'static str,
        /// Where it is.
        device: String,
    },
}

impl From<KernelError> for candle_core::Error {
    fn from(e: KernelError) -> Self {
        candle_core::Error::wrap(e)
    }
}
