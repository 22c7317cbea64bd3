//! The kernels as candle operations.
//!
//! [`sign_matmul_t`] is a [`CustomOp1`] with a backward pass: the calibration trainer
//! backpropagates through many delta layers, and candle drops the gradient without an error at
//! any op that has none (`apply_op1_no_bwd`; see `shared/ANCHORS.md` §0.1). Its backward is
//! [`sign_matmul_n`], whose own backward is [`sign_matmul_t`], so second derivatives work too.
//! The scale is not fused there: the trainer multiplies by its scale tensor with ordinary candle
//! ops, and autograd gives `d/d scale`.
//!
//! [`tenant_delta_matmul`] is the serving path: forward only, scales fused, many tenants per batch.
//!
//! Each op implements `cpu_fwd`; a `cuda_fwd` goes beside it (the words tensor then lives on the
//! GPU). Inputs may be `f32`, `bf16` or `f16`: they are computed in `f32` and the output has the
//! input's dtype. Strided inputs are gathered first. [`sign_matmul_t`] and [`sign_matmul_n`] also
//! take `f64` (plain loops, no SIMD), so that gradient checks by finite differences can run a
//! whole model in double precision.

use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use half::{bf16, f16};

use crate::cpu;
use crate::error::KernelError;
use crate::signs::{HostWords, SignBits, SignDelta, SignsView};

/// `x · Sᵀ`: `x (.., K)` → `(.., N)`, differentiable with respect to `x`.
///
/// `x` is `f32`, `bf16` or `f16`; the result has its dtype. A delta linear layer is
/// `x.matmul(&w_base.t()?)? + sign_matmul_t(&x, &signs)?.broadcast_mul(&scale)?`.
pub fn sign_matmul_t(x: &Tensor, signs: &SignBits) -> candle_core::Result<Tensor> {
    check_last_dim(x, signs.k(), "sign_matmul_t")?;
    x.apply_op1(SignMatmul {
        signs: signs.clone(),
        transposed: false,
    })
}

/// `g · S`: `g (.., N)` → `(.., K)`; the gradient of [`sign_matmul_t`] with respect to its input.
pub fn sign_matmul_n(g: &Tensor, signs: &SignBits) -> candle_core::Result<Tensor> {
    check_last_dim(g, signs.n(), "sign_matmul_n")?;
    g.apply_op1(SignMatmul {
        signs: signs.clone(),
        transposed: true,
    })
}

/// Many tenants in one batch: row `i` of the `(M, N)` result is `s · (x_i · Sᵀ)` for the delta
/// `deltas[row_slot[i]]` (scale `s` and signs `S`), or zeros where `row_slot[i]` is `None`.
///
/// `x` is `(M, K)`. Forward only (serving). All deltas must have one shape; at least one is
/// needed to know `N`. Each delta's bits are read once per call, however many rows use it.
pub fn tenant_delta_matmul(
    x: &Tensor,
    row_slot: &[Option<u32>],
    deltas: &[&SignDelta],
) -> candle_core::Result<Tensor> {
    check_tenant_args("tenant_delta_matmul", x, row_slot, deltas)?;
    x.apply_op1_no_bwd(&TenantDeltaMatmul { row_slot, deltas })
}

/// Checks the arguments every multi-tenant op shares: at least one delta, `x` of shape
/// `(M, K)` with the deltas' `K`, one row slot per row. Returns the first delta and `M`.
pub(crate) fn check_tenant_args<'a>(
    op: &'static str,
    x: &Tensor,
    row_slot: &[Option<u32>],
    deltas: &[&'a SignDelta],
) -> candle_core::Result<(&'a SignDelta, usize)> {
    let first = *deltas.first().ok_or(KernelError::NoDeltas)?;
    let (m, k) = x.dims2()?;
    if k != first.k() {
        return Err(KernelError::InputLength {
            op,
            what: "x last dim",
            expected: first.k(),
            got: k,
        }
        .into());
    }
    if row_slot.len() != m {
        return Err(KernelError::RowSlotLength {
            m,
            got: row_slot.len(),
        }
        .into());
    }
    Ok((first, m))
}

/// `base + tenant_delta_matmul(x, row_slot, deltas)`: a whole delta linear layer once the
/// caller has the base product `base = x · W_baseᵀ` (`(M, N)`, `x`'s dtype).
///
/// On CUDA with bf16 inputs the add is fused into the delta kernel's store (one kernel instead of
/// two, and `y` is written once), which matters at decode, where the delta part is a few
/// microseconds; base-only rows get `base` itself. Elsewhere it is the plain sum. Forward only.
pub fn tenant_delta_matmul_add(
    base: &Tensor,
    x: &Tensor,
    row_slot: &[Option<u32>],
    deltas: &[&SignDelta],
) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && x.dtype() == DType::BF16 {
        return tenant_delta_matmul_add_path(base, x, row_slot, deltas, Default::default());
    }
    let y = tenant_delta_matmul(x, row_slot, deltas)?;
    check_base(base, &y)?;
    base.add(&y)
}

/// A whole delta linear layer: `x · W_baseᵀ + tenant_delta_matmul(x, row_slot, deltas)`, with
/// `x (M, K)` and `w_base (N, K)`.
///
/// On CUDA, for a decode batch of at most [`FUSED_MAX_ROWS`] rows that all use one tenant (or
/// the base), bf16, `K % 8 == 0` and `ceil(K/32) % 4 == 0`, one kernel streams the base weight
/// and the tenant's bits and multiplies `x` by `W_base + scale · S`, formed in registers and
/// rounded once to bf16 as a merged checkpoint is: [`crate::cuda::delta_linear_fused`]. That
/// kernel takes up to 8 tenants, but on the H100 it beat the unfused step only for one tenant
/// (BENCHMARKS.md, fourth and fifth passes), so other batches take candle's matmul and the delta
/// product: for decode batches of at most 32 rows and 16 tenants side by side on two CUDA
/// streams, then added (`cuda::delta_linear_overlapped`, BENCHMARKS.md, sixth pass; not where it
/// measured slower: more than 16 rows of at most 2 rows per tenant at K >= 8192, and 8 or more
/// tenants of 3-8 rows each with K and N below 8192, session 8), otherwise one after the other
/// with the add in the delta kernel's store ([`tenant_delta_matmul_add`]).
/// Forward only.
pub fn delta_linear(
    x: &Tensor,
    w_base: &Tensor,
    row_slot: &[Option<u32>],
    deltas: &[&SignDelta],
) -> candle_core::Result<Tensor> {
    let first = deltas.first().ok_or(KernelError::NoDeltas)?;
    let (m, k) = x.dims2()?;
    if w_base.dims() != [first.n(), k] || k != first.k() {
        return Err(KernelError::BaseShape {
            got: format!("x {:?}, w_base {:?}", x.dims(), w_base.dims()),
            want: format!(
                "x [{m}, {}], w_base [{}, {}] (the deltas' shape)",
                first.k(),
                first.n(),
                first.k()
            ),
        }
        .into());
    }
    if row_slot.len() != m {
        return Err(KernelError::RowSlotLength {
            m,
            got: row_slot.len(),
        }
        .into());
    }
    #[cfg(feature = "cuda")]
    {
        let mut tenants: Vec<u32> = row_slot.iter().flatten().copied().collect();
        tenants.sort_unstable();
        tenants.dedup();
        // Measured on the H100 (sixth pass), one tenant: the fused kernel wins at 1, 8, 16 and
        // 32 rows on every 7B shape (at 32 rows 18.5 / 43.7 / 46.0 us against 27.9 / 60.9 /
        // 62.2 unfused for 4096x4096 / 11008x4096 / 4096x11008).
        if m <= FUSED_MAX_ROWS
            && tenants.len() <= 1
            && crate::cuda::fused_ok(x, w_base, row_slot, deltas)
        {
            return delta_linear_fused_op(x, w_base, row_slot, deltas);
        }
        // Other decode batches (several tenants): the base product and the delta product run
        // side by side on two streams (`cuda::delta_linear_overlapped`). Measured on the H100
        // (sixth pass): 8 rows of 8 tenants 24.8 / 59.1 / 58.5 us against 28.9 / 63.3 / 65.5
        // one after the other (4096x4096 / 11008x4096 / 4096x11008).
        // Except batches of more than 16 rows whose tenants all have at most 2 rows with
        // K >= 8192: there the two streams lost with the int8 kernel on the side stream
        // (4096x11008, 32 rows of 16 tenants: 99.2-99.5 us against 94.8-95.2 one after the
        // other, six processes; at 4096x4096 and 11008x4096 the overlap won or tied:
        // BENCHMARKS.md, session 6, lead). Since session 7 that batch takes the binary kernel
        // (`cuda::takes_b1`), whose overlapped step there is unmeasured; the rule is kept as
        // measured.
        let (slot_rows, tenant_rows) = max_rows_per_slot(row_slot);
        let two_row_wide = m > 16 && k >= 8192 && slot_rows <= 2;
        // And batches of 8 or more tenants with 3-8 rows each on 4096x4096: their delta product
        // takes the binary kernel since session 8 (`cuda::takes_b1`), and the two streams lost
        // to the plain order in every call that measured both (32 rows of 8 tenants: 28.6-29.6
        // us against 28.1-28.5, five calls; on 11008x4096 and 4096x11008 the overlap won, 58.0
        // against 63.7 and 61.0 against 64.1: BENCHMARKS.md, session 8). Re-measured in
        // session 9 with the warpgroup binary kernel on the H100: plain order 25.9-26.2 us,
        // the two streams 28.4 (three processes each).
        let multi_row_small =
            tenants.len() >= 8 && k < 8192 && first.n() < 8192 && (3..=8).contains(&tenant_rows);
        if m <= crate::cuda::OVERLAP_MAX_ROWS
            && tenants.len() <= crate::cuda::OVERLAP_MAX_TENANTS
            && !two_row_wide
            && !multi_row_small
            && x.device().is_cuda()
            && x.dtype() == DType::BF16
            && w_base.dtype() == DType::BF16
        {
            return crate::cuda::delta_linear_overlapped(x, w_base, row_slot, deltas);
        }
    }
    let base = x.matmul(&w_base.t()?)?;
    tenant_delta_matmul_add(&base, x, row_slot, deltas)
}

/// The most rows that share one slot (a tenant, or the base-only rows), and the most rows of one
/// tenant, from one count.
#[cfg(feature = "cuda")]
fn max_rows_per_slot(row_slot: &[Option<u32>]) -> (usize, usize) {
    let mut counts = std::collections::HashMap::new();
    for slot in row_slot {
        *counts.entry(*slot).or_insert(0usize) += 1;
    }
    let tenant_rows = counts
        .iter()
        .filter(|(s, _)| s.is_some())
        .map(|(_, &c)| c)
        .max();
    (
        counts.values().copied().max().unwrap_or(0),
        tenant_rows.unwrap_or(0),
    )
}

/// [`delta_linear`] takes the one-kernel CUDA path for one-tenant batches of at most this many rows
/// (the fused kernel's limit).
pub const FUSED_MAX_ROWS: usize = 32;

/// Applies the fused op (the caller checked `cuda::fused_ok` and the shapes).
#[cfg(feature = "cuda")]
pub(crate) fn delta_linear_fused_op(
    x: &Tensor,
    w_base: &Tensor,
    row_slot: &[Option<u32>],
    deltas: &[&SignDelta],
) -> candle_core::Result<Tensor> {
    x.apply_op2_no_bwd(w_base, &DeltaLinear { row_slot, deltas })
}

/// The fused decode layer; see [`delta_linear`].
#[cfg(feature = "cuda")]
struct DeltaLinear<'a> {
    row_slot: &'a [Option<u32>],
    deltas: &'a [&'a SignDelta],
}

#[cfg(feature = "cuda")]
impl candle_core::CustomOp2 for DeltaLinear<'_> {
    fn name(&self) -> &'static str {
        "delta_linear"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("delta_linear: CPU inputs take the unfused path. This is a bug.")
    }

    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_layout: &Layout,
        w: &candle_core::CudaStorage,
        w_layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::delta_linear_fwd(x, x_layout, w, w_layout, self.row_slot, self.deltas)
    }
}

fn check_base(base: &Tensor, like: &Tensor) -> candle_core::Result<()> {
    if base.dims() != like.dims() || base.dtype() != like.dtype() {
        return Err(KernelError::BaseShape {
            got: format!("{:?} {:?}", base.dtype(), base.dims()),
            want: format!("{:?} {:?}", like.dtype(), like.dims()),
        }
        .into());
    }
    Ok(())
}

/// The fused CUDA form of [`tenant_delta_matmul_add`] with a chosen tensor-core kernel.
#[cfg(feature = "cuda")]
pub(crate) fn tenant_delta_matmul_add_path(
    base: &Tensor,
    x: &Tensor,
    row_slot: &[Option<u32>],
    deltas: &[&SignDelta],
    path: crate::cuda::Bf16Path,
) -> candle_core::Result<Tensor> {
    let (first, m) = check_tenant_args("tenant_delta_matmul_add", x, row_slot, deltas)?;
    if base.dims() != [m, first.n()]
        || base.dtype() != x.dtype()
        || !base.device().same_device(x.device())
    {
        return Err(KernelError::BaseShape {
            got: format!(
                "{:?} {:?} on {:?}",
                base.dtype(),
                base.dims(),
                base.device().location()
            ),
            want: format!(
                "{:?} [{m}, {}] on {:?}",
                x.dtype(),
                first.n(),
                x.device().location()
            ),
        }
        .into());
    }
    x.apply_op2_no_bwd(
        base,
        &TenantDeltaMatmulAdd {
            row_slot,
            deltas,
            path,
        },
    )
}

/// The fused multi-tenant forward with the base added; see [`tenant_delta_matmul_add`].
#[cfg(feature = "cuda")]
struct TenantDeltaMatmulAdd<'a> {
    row_slot: &'a [Option<u32>],
    deltas: &'a [&'a SignDelta],
    path: crate::cuda::Bf16Path,
}

#[cfg(feature = "cuda")]
impl candle_core::CustomOp2 for TenantDeltaMatmulAdd<'_> {
    fn name(&self) -> &'static str {
        "tenant_delta_matmul_add"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!(
            "tenant_delta_matmul_add: CPU inputs take the unfused sum. This is a bug."
        )
    }

    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_layout: &Layout,
        base: &candle_core::CudaStorage,
        base_layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::tenant_delta_matmul_add_fwd(
            x,
            x_layout,
            base,
            base_layout,
            self.row_slot,
            self.deltas,
            self.path,
        )
    }
}

fn check_last_dim(t: &Tensor, expected: usize, op: &'static str) -> candle_core::Result<()> {
    let got = t.dims().last().copied().unwrap_or(1);
    if t.rank() == 0 || got != expected {
        return Err(KernelError::InputLength {
            op,
            what: "last dim",
            expected,
            got,
        }
        .into());
    }
    Ok(())
}

/// `x · Sᵀ` ([`sign_matmul_t`], `transposed` false) or `g · S` ([`sign_matmul_n`], true) as a
/// candle op. Each is the other's backward.
struct SignMatmul {
    signs: SignBits,
    transposed: bool,
}

impl CustomOp1 for SignMatmul {
    fn name(&self) -> &'static str {
        if self.transposed {
            "sign_matmul_n"
        } else {
            "sign_matmul_t"
        }
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, k) = (self.signs.n(), self.signs.k());
        let out_dim = if self.transposed { k } else { n };
        let words = self.signs.host_words(self.name())?;
        if let CpuStorage::F64(x) = storage {
            let rows = words.row_major()?;
            let y = sign_matmul_f64(
                &take_contiguous(x, layout),
                view(&rows, &words)?,
                self.transposed,
            );
            return Ok((CpuStorage::F64(y), with_last_dim(layout, out_dim)));
        }
        let x = host_f32(storage, layout, self.name())?;
        let y = if self.transposed {
            // `g · S` reads the row-major layout only (interleaved words are reordered first).
            let rows = words.row_major()?;
            cpu::sign_matmul_n(&x, view(&rows, &words)?)?
        } else {
            cpu::sign_matmul_t_words(cpu::SimdLevel::detect(), &x, words.words()?)?
        };
        Ok((from_f32(y, storage.dtype()), with_last_dim(layout, out_dim)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        if self.transposed {
            crate::cuda::sign_matmul_n_fwd(storage, layout, &self.signs)
        } else {
            crate::cuda::sign_matmul_t_fwd(storage, layout, &self.signs, Default::default())
        }
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // d(x·Sᵀ)/dx contracted with grad_y is grad_y · S, and the other way round.
        Ok(Some(if self.transposed {
            sign_matmul_t(grad_y, &self.signs)?
        } else {
            sign_matmul_n(grad_y, &self.signs)?
        }))
    }
}

/// `rows` (the row-major words of `words`) as the checked view the row-major kernels take.
fn view<'a>(rows: &'a [u32], words: &HostWords<'_>) -> candle_core::Result<SignsView<'a>> {
    let (n, k) = words.shape();
    Ok(SignsView::new(rows, n, k)?)
}

/// The multi-tenant forward; see [`tenant_delta_matmul`].
struct TenantDeltaMatmul<'a> {
    row_slot: &'a [Option<u32>],
    deltas: &'a [&'a SignDelta],
}

impl CustomOp1 for TenantDeltaMatmul<'_> {
    fn name(&self) -> &'static str {
        "tenant_delta_matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = host_f32(storage, layout, self.name())?;
        // Hold every delta's read lock while the views borrow its words.
        let words = self
            .deltas
            .iter()
            .map(|d| d.signs().host_words(self.name()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut views = Vec::with_capacity(words.len());
        for (w, d) in words.iter().zip(self.deltas) {
            views.push((w.words()?, d.scale()));
        }
        let y = cpu::tenant_matmul(cpu::SimdLevel::detect(), &x, self.row_slot, &views)?;
        let n = self.deltas.first().map_or(0, |d| d.n());
        Ok((from_f32(y, storage.dtype()), with_last_dim(layout, n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::tenant_delta_matmul_fwd(
            storage,
            layout,
            self.row_slot,
            self.deltas,
            Default::default(),
        )
    }
}

/// The input as contiguous `f32` values: borrowed when it already is, else gathered/converted.
fn host_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &'static str,
) -> candle_core::Result<Cow<'a, [f32]>> {
    fn take<'a, T: Copy>(data: &'a [T], layout: &Layout) -> Cow<'a, [T]>
    where
        [T]: ToOwned<Owned = Vec<T>>,
    {
        match layout.contiguous_offsets() {
            Some((start, end)) => Cow::Borrowed(&data[start..end]),
            None => Cow::Owned(gather_strided(data, layout)),
        }
    }
    Ok(match storage {
        CpuStorage::F32(v) => take(v, layout),
        CpuStorage::BF16(v) => Cow::Owned(take(v, layout).iter().map(|v| v.to_f32()).collect()),
        CpuStorage::F16(v) => Cow::Owned(take(v, layout).iter().map(|v| v.to_f32()).collect()),
        other => {
            return Err(KernelError::UnsupportedDType {
                op,
                dtype: format!("{:?}", other.dtype()),
            }
            .into())
        }
    })
}

/// The input as contiguous values, borrowed when it already is.
fn take_contiguous<'a, T: Copy>(data: &'a [T], layout: &Layout) -> Cow<'a, [T]>
where
    [T]: ToOwned<Owned = Vec<T>>,
{
    match layout.contiguous_offsets() {
        Some((start, end)) => Cow::Borrowed(&data[start..end]),
        None => Cow::Owned(gather_strided(data, layout)),
    }
}

/// `x · Sᵀ` (or `g · S` when `transposed`) in `f64` with plain loops, for gradient checks; the
/// same sums as [`crate::reference`], without rounding to `f32`.
fn sign_matmul_f64(x: &[f64], signs: crate::SignsView<'_>, transposed: bool) -> Vec<f64> {
    let (n, k, wpr) = (signs.n(), signs.k(), signs.words_per_row());
    let words = signs.words();
    let sign = |row: usize, col: usize| -> f64 {
        if (words[row * wpr + col / 32] >> (col % 32)) & 1 == 1 {
            1.0
        } else {
            -1.0
        }
    };
    let (inner, outer) = if transposed { (n, k) } else { (k, n) };
    let m = x.len() / inner;
    let mut out = vec![0f64; m * outer];
    for i in 0..m {
        for o in 0..outer {
            let mut acc = 0f64;
            for c in 0..inner {
                let s = if transposed { sign(c, o) } else { sign(o, c) };
                acc += x[i * inner + c] * s;
            }
            out[i * outer + o] = acc;
        }
    }
    out
}

/// Copies a strided view into row-major order.
fn gather_strided<T: Copy>(data: &[T], layout: &Layout) -> Vec<T> {
    let dims = layout.dims();
    let strides = layout.stride();
    let count = layout.shape().elem_count();
    let mut out = Vec::with_capacity(count);
    if count == 0 {
        return out;
    }
    let mut index = vec![0usize; dims.len()];
    loop {
        let offset: usize =
            layout.start_offset() + index.iter().zip(strides).map(|(i, s)| i * s).sum::<usize>();
        out.push(data[offset]);
        // Odometer increment, last dimension fastest.
        let mut d = dims.len();
        loop {
            if d == 0 {
                return out;
            }
            d -= 1;
            index[d] += 1;
            if index[d] < dims[d] {
                break;
            }
            index[d] = 0;
        }
    }
}

/// `f32` results back in the input's dtype (only the dtypes [`host_f32`] accepts get here).
fn from_f32(y: Vec<f32>, dtype: DType) -> CpuStorage {
    match dtype {
        DType::BF16 => CpuStorage::BF16(y.into_iter().map(bf16::from_f32).collect()),
        DType::F16 => CpuStorage::F16(y.into_iter().map(f16::from_f32).collect()),
        _ => CpuStorage::F32(y),
    }
}

/// The input's shape with its last dimension replaced.
fn with_last_dim(layout: &Layout, last: usize) -> Shape {
    let mut dims = layout.dims().to_vec();
    if let Some(d) = dims.last_mut() {
        *d = last;
    }
    Shape::from(dims)
}
