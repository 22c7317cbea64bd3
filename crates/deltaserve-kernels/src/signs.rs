//! Packed sign matrices: the borrowed host view the kernels read, and the tensor-backed types the
//! model holds.
//!
//! ```text
//! signs: (N, words_per_row) u32, words_per_row = ceil(K / 32), row-major
//! bit b (LSB = 0) of word w of row n  =  sign of S[n, 32*w + b]:  1 -> +1,  0 -> -1
//! bits for columns >= K ("padding") are ignored by every kernel here, whatever their value
//! ```
//!
//! The layout is fixed by the delta file format (`deltaserve-format`'s `signs` module); this crate
//! only reads it.

use std::borrow::Cow;

use candle_core::{DType, Device, Storage, StorageRef, Tensor};

use crate::cpu;
use crate::error::KernelError;

/// Number of `u32` words holding one row of `k` sign bits: `ceil(k / 32)`.
pub fn words_per_row(k: usize) -> usize {
    k.div_ceil(32)
}

/// Checks that `len` words hold an `[n, k]` matrix.
pub(crate) fn check_words(len: usize, n: usize, k: usize) -> Result<(), KernelError> {
    if k == 0 {
        return Err(KernelError::EmptyInner { n });
    }
    let wpr = words_per_row(k);
    let expected = n.checked_mul(wpr);
    if expected != Some(len) {
        return Err(KernelError::WordCount {
            n,
            k,
            words_per_row: wpr,
            expected: expected.unwrap_or(usize::MAX),
            got: len,
        });
    }
    Ok(())
}

/// A borrowed `[n, k]` sign matrix in host memory, checked to have `n * ceil(k/32)` words.
#[derive(Debug, Clone, Copy)]
pub struct SignsView<'a> {
    words: &'a [u32],
    n: usize,
    k: usize,
}

impl<'a> SignsView<'a> {
    /// Wraps `words` as an `[n, k]` matrix (layout in the [crate docs](crate#layout)).
    pub fn new(words: &'a [u32], n: usize, k: usize) -> Result<Self, KernelError> {
        check_words(words.len(), n, k)?;
        Ok(Self { words, n, k })
    }

    /// All words, row-major.
    pub fn words(&self) -> &'a [u32] {
        self.words
    }

    /// Rows (output features, `N`).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Columns (input features, `K`).
    pub fn k(&self) -> usize {
        self.k
    }

    /// `ceil(k / 32)`.
    pub fn words_per_row(&self) -> usize {
        words_per_row(self.k)
    }

    /// The words of rows `rows.start..rows.end`.
    pub(crate) fn row_words(&self, rows: std::ops::Range<usize>) -> &'a [u32] {
        let wpr = self.words_per_row();
        &self.words[rows.start * wpr..rows.end * wpr]
    }
}

/// An `[n, k]` sign matrix `S` held as a `u32` tensor of shape `[n, ceil(k/32)]` (layout in the
/// [crate docs](crate#layout)). Cloning is cheap: the tensor is reference-counted.
///
/// The tensor lives on the device the kernels run on: the CPU, or a GPU with the `cuda` feature.
/// For serving on a CPU with AVX-512, [`SignBits::for_serving`] keeps the words in the
/// row-interleaved layout instead ([`SignLayout::Interleaved`]): the same bits, which the AVX-512
/// `x · Sᵀ` reads with plain loads, 1.4–1.8× faster at decode (BENCHMARKS.md, "CPU kernels"). It
/// replaces the row-major copy rather than adding to it, so a resident delta still costs one bit
/// per weight (plus at most 15 zero rows per matrix).
#[derive(Debug, Clone)]
pub struct SignBits {
    words: Tensor,
    n: usize,
    k: usize,
    layout: SignLayout,
}

/// The order of the words in a [`SignBits`] tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignLayout {
    /// `[n, ceil(k/32)]`, row-major: the delta file's layout, and the only one on a GPU.
    RowMajor,
    /// `[ceil(n/16) · 16, ceil(k/32)]` words in the order of [`crate::cpu::InterleavedSigns`]:
    /// rows in groups of 16, word `w` of a group's 16 rows contiguous. CPU only.
    Interleaved,
}

impl SignBits {
    /// Wraps a `u32` tensor of shape `[n, ceil(k/32)]` (made contiguous if it is not).
    pub fn new(words: Tensor, n: usize, k: usize) -> candle_core::Result<Self> {
        if k == 0 {
            return Err(KernelError::EmptyInner { n }.into());
        }
        let wpr = words_per_row(k);
        if words.dtype() != DType::U32 || words.dims() != [n, wpr] {
            return Err(KernelError::WordsTensor {
                dtype: format!("{:?}", words.dtype()),
                shape: words.dims().to_vec(),
                n,
                k,
                words_per_row: wpr,
            }
            .into());
        }
        Ok(Self {
            words: words.contiguous()?,
            n,
            k,
            layout: SignLayout::RowMajor,
        })
    }

    /// [`SignBits::from_words`] in the layout the serving kernels read fastest on `device`: the
    /// interleaved one on a CPU with AVX-512 (the words are reordered once, here), row-major
    /// elsewhere. Training and every other op accept either layout.
    pub fn for_serving(
        words: Vec<u32>,
        n: usize,
        k: usize,
        device: &Device,
    ) -> candle_core::Result<Self> {
        if !device.is_cpu() || cpu::SimdLevel::detect() != cpu::SimdLevel::Avx512 {
            return Self::from_words(words, n, k, device);
        }
        // `SignsView::new` checks the word count.
        let words = cpu::interleave(SignsView::new(&words, n, k)?);
        let rows = words.len() / words_per_row(k);
        Ok(Self {
            words: Tensor::from_vec(words, (rows, words_per_row(k)), device)?,
            n,
            k,
            layout: SignLayout::Interleaved,
        })
    }

    /// The order of the words.
    pub fn layout(&self) -> SignLayout {
        self.layout
    }

    /// Takes ownership of packed `words` (as `deltaserve-format` reads them) and puts them on
    /// `device`.
    pub fn from_words(
        words: Vec<u32>,
        n: usize,
        k: usize,
        device: &Device,
    ) -> candle_core::Result<Self> {
        check_words(words.len(), n, k)?;
        let words = Tensor::from_vec(words, (n, words_per_row(k)), device)?;
        Self::new(words, n, k)
    }

    /// The `u32` words tensor, in [`SignBits::layout`]: `[n, ceil(k/32)]` when row-major.
    pub fn words(&self) -> &Tensor {
        &self.words
    }

    /// Rows (output features, `N`).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Columns (input features, `K`).
    pub fn k(&self) -> usize {
        self.k
    }

    /// A copy of the words in host memory, row-major whatever the layout (for references, merges
    /// and tests; kernels borrow instead).
    pub fn to_host_words(&self) -> candle_core::Result<Vec<u32>> {
        let words = self.words.flatten_all()?.to_vec1::<u32>()?;
        match self.layout {
            SignLayout::RowMajor => Ok(words),
            SignLayout::Interleaved => {
                Ok(cpu::InterleavedView::new(&words, self.n, self.k)?.to_row_major())
            }
        }
    }

    /// Borrows the words in CPU memory (read-locked, not copied). Fails where they live elsewhere.
    pub(crate) fn host_words(&self, op: &'static str) -> candle_core::Result<HostWords<'_>> {
        let (storage, layout) = self.words.storage_and_layout();
        if !matches!(&*storage, Storage::Cpu(_)) {
            return Err(KernelError::UnsupportedDevice {
                op,
                what: "sign words",
                device: format!("{:?}", self.words.device().location()),
            }
            .into());
        }
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::msg(format!("{op}: sign words not contiguous. This is a bug."))
        })?;
        Ok(HostWords {
            storage,
            start,
            end,
            n: self.n,
            k: self.k,
            layout: self.layout,
        })
    }
}

/// The words of a [`SignBits`] in CPU memory, read-locked for as long as this lives.
pub(crate) struct HostWords<'a> {
    storage: StorageRef<'a>,
    start: usize,
    end: usize,
    n: usize,
    k: usize,
    layout: SignLayout,
}

impl HostWords<'_> {
    fn slice(&self) -> candle_core::Result<&[u32]> {
        match &*self.storage {
            Storage::Cpu(cpu) => Ok(&cpu.as_slice::<u32>()?[self.start..self.end]),
            _ => candle_core::bail!("sign words left the CPU while locked. This is a bug."),
        }
    }

    /// The checked words, in their layout, as the `x · Sᵀ` kernels take them.
    pub(crate) fn words(&self) -> candle_core::Result<cpu::Words<'_>> {
        let all = self.slice()?;
        Ok(match self.layout {
            SignLayout::RowMajor => cpu::Words::RowMajor(SignsView::new(all, self.n, self.k)?),
            SignLayout::Interleaved => {
                cpu::Words::Interleaved(cpu::InterleavedView::new(all, self.n, self.k)?)
            }
        })
    }

    /// The words row-major, for the kernels that only read that layout (`g · S`, `f64`):
    /// borrowed, or reordered into a copy when they are interleaved.
    pub(crate) fn row_major(&self) -> candle_core::Result<Cow<'_, [u32]>> {
        let all = self.slice()?;
        Ok(match self.layout {
            SignLayout::RowMajor => Cow::Borrowed(all),
            SignLayout::Interleaved => {
                Cow::Owned(cpu::InterleavedView::new(all, self.n, self.k)?.to_row_major())
            }
        })
    }

    /// Rows and columns of the matrix.
    pub(crate) fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }
}

/// One tenant's BitDelta for one linear layer: `W_ft ≈ W_base + scale · S` (BitDelta,
/// arXiv 2402.10193, eq. 1), with `S` packed as [`SignBits`].
///
/// The scale is a plain `f32` for the fused serving path ([`crate::tenant_delta_matmul`]); a
/// trainer that learns the scale keeps its own tensor and multiplies the output of
/// [`crate::sign_matmul_t`] by it, so autograd gives `d/d scale`.
#[derive(Debug, Clone)]
pub struct SignDelta {
    signs: SignBits,
    scale: f32,
}

impl SignDelta {
    /// Pairs signs with their scale.
    pub fn new(signs: SignBits, scale: f32) -> Self {
        Self { signs, scale }
    }

    /// Builds the delta from packed `words` of an `[n, k]` matrix, placed on `device`.
    pub fn from_words(
        words: Vec<u32>,
        n: usize,
        k: usize,
        scale: f32,
        device: &Device,
    ) -> candle_core::Result<Self> {
        Ok(Self::new(SignBits::from_words(words, n, k, device)?, scale))
    }

    /// The packed signs.
    pub fn signs(&self) -> &SignBits {
        &self.signs
    }

    /// The scale `s`.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// Returns the same signs with another scale (after calibration).
    pub fn with_scale(&self, scale: f32) -> Self {
        Self {
            signs: self.signs.clone(),
            scale,
        }
    }

    /// Rows (output features, `N`).
    pub fn n(&self) -> usize {
        self.signs.n
    }

    /// Columns (input features, `K`).
    pub fn k(&self) -> usize {
        self.signs.k
    }
}
