//! The CUDA paths of the candle ops (feature `cuda`): kernels in `src/cuda/sign_matmul.cu`,
//! compiled to PTX for sm_90 by `build.rs` and loaded into candle's device at the first call, and
//! in `src/cuda/binary_wgmma.cu` (sm_90a, its own module, loaded on compute capability 9.0 only);
//! device code both use is in `src/cuda/common.cuh`.
//!
//! - **bf16 inputs, forward** (decode and prefill): tensor cores. A prep kernel writes `x` scaled
//!   and permuted into mma fragment order (`xp`, plus one correction per row); then each warp
//!   turns 2 sign bits into a register of two bf16 values with one LOP3 and feeds `mma.sync`
//!   m16n8k16 with f32 accumulation. The trick and its error bound are explained at the top of
//!   the `.cu` file. Rows that share a delta are computed together (up to 32 per group), so a
//!   delta's bits are read once per call for up to 32 rows; more rows form more groups.
//! - **f32, f16 and f64 inputs, forward**: CUDA cores, exact in the accumulator (`f32`, or `f64`
//!   for `f64`). The tensor-core trick would round `x` to bf16.
//! - **backward** (`g · S`): CUDA cores, any of those dtypes.
//!
//! - **a whole decode layer** ([`crate::delta_linear`], [`delta_linear_fused`]): one kernel streams
//!   the base bf16 weight and the tenant's bits, forms `W_base + scale · S` in registers (rounded
//!   once to bf16, as a merged checkpoint is) and multiplies it by `x` on tensor cores;
//!   [`crate::tenant_delta_matmul_add`] instead adds a precomputed base product in the delta
//!   kernel's store.
//! - **bf16 decode with one row per delta** (many tenants, one row each; and up to 8 rows per
//!   delta with 8 or more tenants, 2-row groups only where K or N >= 8192): 1-bit tensor cores.
//!   x is written as 16 bit planes of a per-row fixed-point form, and `mma.sync` m16n8k256 b1
//!   AND + popc multiplies the sign words as stored, with no unpacking at all (explained at the
//!   binary path in the `.cu`). On an H100 or H200, groups of 3-8 rows take the warpgroup form
//!   (`wgmma` m64n64k256 b1, both operands read by the tensor cores from shared memory:
//!   `binary_wgmma.cu`).
//! - **bf16 decode with at most 2 rows per delta** otherwise: int8 tensor cores. x is written as
//!   3 signed base-256 digits of the same fixed-point form, one LOP3 makes four 0/2^p sign values,
//!   `mma.sync` m16n8k32 u8 x s8 sums exactly in s32; half the unpacking and mma instructions of
//!   the bf16 path (explained at the int8 path in the `.cu`).
//!
//! Routing reaches the kernels as a `GroupTable` passed by value as a kernel parameter (32
//! groups, 512 rows), so a decode step launches two kernels and copies nothing to the device.
//! The product kernel is launched as a programmatic dependent of its prep kernel (PDL): it starts
//! while the prep runs, issues its first sign-word loads, and only then waits for `x`'s prep.
//! A multi-tenant decode step through [`crate::delta_linear`] runs the delta product on a side
//! stream beside candle's base product (`delta_linear_overlapped`).
//! Base-only rows of a multi-tenant batch are a group with a null words pointer, whose blocks
//! write zeros. [`Bf16Path::Simple`] forces the CUDA-core kernel for bf16 too, for tests and
//! benchmarks.

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaSlice, CudaView, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::{CustomOp1, DType, Layout, Shape, Storage, Tensor};
use half::{bf16, f16};

use crate::error::KernelError;
use crate::signs::{words_per_row, SignBits, SignDelta};

/// The PTX of `src/cuda/sign_matmul.cu`.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/sign_matmul.ptx"));
/// The name candle caches the loaded module under.
const MODULE: &str = "deltaserve_sign_matmul";
/// The PTX of `src/cuda/binary_wgmma.cu` (sm_90a; empty where `build.rs` targeted another arch).
const PTX_WGMMA: &str = include_str!(concat!(env!("OUT_DIR"), "/binary_wgmma.ptx"));
/// Its module name; its kernels are the ones named `ds_wgb1_*`.
const MODULE_WGMMA: &str = "deltaserve_binary_wgmma";

/// Groups per launch (`DS_MAX_GROUPS` in the `.cu` file).
const MAX_GROUPS: usize = 32;
/// Row indices per launch (`DS_MAX_ROWS`).
const MAX_ROWS: usize = 512;
/// Rows of `x` per group (`DS_GROUP_ROWS`; 4 mma tiles of 8).
const GROUP_ROWS: usize = 32;
/// Columns of `x` per chunk of the tensor-core kernel (`xp` rows are padded to a multiple).
const TC_CHUNK: usize = 512;

/// Groups of at most this many rows take the int8 kernel (`ds_tci8_bf16_*`) on the default path;
/// it supports 8, but with more than 2 rows per group (more than one n-tile) it measured slower
/// than the bf16 kernel on the H100 (BENCHMARKS.md, third pass).
const INT8_MAX_GROUP_ROWS: usize = 2;
/// The int8 kernel's s32 sums are exact for K < 2^17 (`sign_matmul.cu`); beyond, bf16.
const INT8_MAX_K: usize = 1 << 16;

/// Which kernel computes a bf16 forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Bf16Path {
    /// Tensor cores (the default). With 16-byte aligned sign rows (`ceil(K/32) % 4 == 0`),
    /// batches whose groups (rows sharing a delta) all have one row take the binary kernel
    /// (`ds_tcb1_bf16_*`, also groups of up to 8 rows with 8 or more tenants: see `takes_b1`),
    /// the other batches with at most 2 rows per group the int8 kernel (`ds_tci8_bf16_*`: half
    /// the unpacking and mma instructions of the bf16 one); the rest the bf16 split-K kernel
    /// (`ds_tc_bf16_*`), with 8 warps splitting K where the grid has fewer than 2 blocks per SM,
    /// else 4.
    #[default]
    TensorCore,
    /// The bf16 split-K kernel with 4 warps everywhere: the second pass's default, kept so that
    /// tests and `bench kernels` can compare the two on the same batch.
    Bf16,
    /// The CUDA-core kernel that f32 inputs use.
    Simple,
    /// [`Bf16Path::TensorCore`] without the warpgroup binary kernel (`ds_wgb1_bf16_*`, compute
    /// capability 9.0 only), so that groups of 3-8 rows take `ds_tcb1_bf16_*` as on other GPUs:
    /// lets the tests cover that kernel on an H100.
    BinaryMma,
}

/// Groups (tenants, plus the base-only rows as one) the fused layer takes.
pub const FUSED_MAX_GROUPS: usize = 8;

/// Routing for one launch; mirrors `struct GroupTable` in the `.cu` file field for field.
#[repr(C)]
#[derive(Clone, Copy)]
struct GroupTable {
    /// Device address of each group's `(N, W)` words; 0: the group's rows get zeros.
    words: [u64; MAX_GROUPS],
    scale: [f32; MAX_GROUPS],
    /// Group `g` is `rows[row_begin[g]..row_begin[g + 1]]` (or those rows themselves if
    /// `identity`).
    row_begin: [u32; MAX_GROUPS + 1],
    rows: [u16; MAX_ROWS],
    n_groups: u32,
    identity: u32,
}

// SAFETY: plain `repr(C)` data with the layout of the CUDA struct, passed by value.
unsafe impl DeviceRepr for GroupTable {}

impl GroupTable {
    fn empty(identity: bool) -> Self {
        Self {
            words: [0; MAX_GROUPS],
            scale: [0.0; MAX_GROUPS],
            row_begin: [0; MAX_GROUPS + 1],
            rows: [0; MAX_ROWS],
            n_groups: 0,
            identity: u32::from(identity),
        }
    }

    /// The most rows any group with a delta has (base-only groups do no arithmetic).
    fn max_delta_group_rows(&self) -> usize {
        (0..self.n_groups as usize)
            .filter(|&g| self.words[g] != 0)
            .map(|g| (self.row_begin[g + 1] - self.row_begin[g]) as usize)
            .max()
            .unwrap_or(0)
    }

    /// The number of groups with a delta.
    fn delta_groups(&self) -> usize {
        (0..self.n_groups as usize)
            .filter(|&g| self.words[g] != 0)
            .count()
    }

    /// The most rows any group of this table has.
    fn max_group_rows(&self) -> usize {
        (0..self.n_groups as usize)
            .map(|g| (self.row_begin[g + 1] - self.row_begin[g]) as usize)
            .max()
            .unwrap_or(0)
    }
}

/// One delta's rows: `words` 0 means zeros.
struct Group {
    words: u64,
    scale: f32,
    rows: Vec<usize>,
}

/// Tables for `sign_matmul_t`: rows `0..m` in groups of 32, all with one delta.
fn identity_tables(m: usize, words: u64, scale: f32) -> candle_core::Result<Vec<GroupTable>> {
    let mut tables = Vec::new();
    let mut start = 0usize;
    while start < m {
        let mut t = GroupTable::empty(true);
        t.row_begin[0] = to_u32(start)?;
        while start < m && (t.n_groups as usize) < MAX_GROUPS {
            let end = (start + GROUP_ROWS).min(m);
            t.words[t.n_groups as usize] = words;
            t.scale[t.n_groups as usize] = scale;
            t.n_groups += 1;
            t.row_begin[t.n_groups as usize] = to_u32(end)?;
            start = end;
        }
        tables.push(t);
    }
    Ok(tables)
}

/// Tables for explicit row lists, each group split into pieces of at most 32 rows.
fn group_tables(groups: &[Group]) -> candle_core::Result<Vec<GroupTable>> {
    let mut tables = Vec::new();
    let mut t = GroupTable::empty(false);
    let mut used = 0usize;
    for group in groups {
        for piece in group.rows.chunks(GROUP_ROWS) {
            if t.n_groups as usize == MAX_GROUPS || used + piece.len() > MAX_ROWS {
                tables.push(t);
                t = GroupTable::empty(false);
                used = 0;
            }
            for &row in piece {
                t.rows[used] = u16::try_from(row).map_err(|_| {
                    candle_core::Error::msg(format!(
                        "tenant_delta_matmul on CUDA: row {row} past the 65536 rows a call takes"
                    ))
                })?;
                used += 1;
            }
            t.words[t.n_groups as usize] = group.words;
            t.scale[t.n_groups as usize] = group.scale;
            t.n_groups += 1;
            t.row_begin[t.n_groups as usize] = to_u32(used)?;
        }
    }
    if t.n_groups > 0 {
        tables.push(t);
    }
    Ok(tables)
}

fn to_u32(v: usize) -> candle_core::Result<u32> {
    u32::try_from(v).map_err(|_| candle_core::Error::msg(format!("{v} rows: too many for u32")))
}

fn to_i32(v: usize, what: &str) -> candle_core::Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::msg(format!("{what} = {v} exceeds i32")))
}

/// The sign words of `bits` as a device address on `dev` (read-locked while this lives).
struct DeviceWords<'a> {
    guard: candle_core::StorageRef<'a>,
    offset: usize,
}

impl<'a> DeviceWords<'a> {
    fn new(bits: &'a SignBits, dev: &CudaDevice, op: &'static str) -> candle_core::Result<Self> {
        let (guard, layout) = bits.words().storage_and_layout();
        let offset = layout.start_offset();
        match &*guard {
            Storage::Cuda(cs) if cs.device().same_device(dev) => {}
            _ => {
                return Err(KernelError::UnsupportedDevice {
                    op,
                    what: "sign words (x is on CUDA)",
                    device: format!("{:?}", bits.words().device().location()),
                }
                .into())
            }
        }
        Ok(Self { guard, offset })
    }

    fn address(&self, dev: &CudaDevice) -> candle_core::Result<u64> {
        let Storage::Cuda(cs) = &*self.guard else {
            candle_core::bail!("sign words left the GPU while locked. This is a bug.")
        };
        let slice = cs.as_cuda_slice::<u32>()?;
        let stream = dev.cuda_stream();
        let (ptr, _sync) = slice.device_ptr(&stream);
        Ok(ptr + 4 * self.offset as u64)
    }
}

/// The input as a contiguous device buffer: the storage itself when it already is, else a copy.
fn contiguous(
    storage: &CudaStorage,
    layout: &Layout,
) -> candle_core::Result<(Option<CudaStorage>, usize)> {
    if let Some((start, _)) = layout.contiguous_offsets() {
        return Ok((None, start));
    }
    let dev = storage.device();
    let count = layout.shape().elem_count();
    // SAFETY: the copy below writes all `count` elements.
    let mut dst = unsafe { dev.alloc_uninit(layout.shape(), storage.dtype()) }?;
    storage.copy_strided_src(&mut dst, 0, layout)?;
    debug_assert_eq!(dst.dtype(), storage.dtype(), "{count} elements copied");
    Ok((Some(dst), 0))
}

/// Where a launch goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum On {
    /// candle's stream.
    Main,
    /// The device's side stream ([`side_stream`]), beside the base product on candle's stream;
    /// the caller joins it with [`side_join`] before anything reads the results.
    Side,
}

/// Buffers a launch sequence reads and writes after the host call returns. On the side stream
/// they must outlive the join: candle frees memory in the order of its own stream, so a buffer
/// dropped before the join could be handed to the base product while the side stream still uses
/// it.
#[derive(Default)]
struct Scratch(Vec<Box<dyn std::any::Any>>);

impl Scratch {
    fn keep<T: 'static>(&mut self, buffer: T) {
        self.0.push(Box::new(buffer));
    }
}

/// Kernel parameters for [`launch`]: pointers to the values, which must outlive the launch call.
#[derive(Default)]
struct Args(Vec<*mut std::ffi::c_void>);

impl Args {
    fn arg<T>(&mut self, value: &T) -> &mut Self {
        self.0.push(value as *const T as *mut std::ffi::c_void);
        self
    }
}

/// The device address of a buffer (candle runs one stream, so there is nothing to synchronise).
fn slice_ptr<T>(slice: &CudaSlice<T>, dev: &CudaDevice) -> u64 {
    let stream = dev.cuda_stream();
    let (ptr, _sync) = slice.device_ptr(&stream);
    ptr
}

fn view_ptr<T>(view: &CudaView<'_, T>, dev: &CudaDevice) -> u64 {
    let stream = dev.cuda_stream();
    let (ptr, _sync) = view.device_ptr(&stream);
    ptr
}

/// Launches kernel `name` of the module on `on`; with `pdl`, as a programmatic dependent of the
/// stream's previous kernel (it may start before that one ends, and must execute
/// `griddepcontrol.wait` before reading what that kernel writes).
///
/// # Safety
/// `args` must match the kernel's parameters, and the kernel must stay within its buffers.
unsafe fn launch(
    dev: &CudaDevice,
    name: &str,
    cfg: LaunchConfig,
    args: &mut Args,
    on: On,
    pdl: bool,
) -> candle_core::Result<()> {
    let (module, ptx) = if name.starts_with("ds_wgb1_") {
        (MODULE_WGMMA, PTX_WGMMA)
    } else {
        (MODULE, PTX)
    };
    let f = dev
        .get_or_load_custom_func(name, module, ptx)?
        .into_cuda_function();
    if cfg.shared_mem_bytes as usize > 48 * 1024 {
        opt_in_smem(&f, cfg.shared_mem_bytes as usize)?;
    }
    let stream = match on {
        On::Main => dev.cuda_stream().cu_stream(),
        On::Side => side_stream(dev)?,
    };
    // SAFETY: a plain C union; the id selects the member set below.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream,
        attrs: &mut attr,
        numAttrs: u32::from(pdl),
    };
    dev.cuda_stream().context().bind_to_thread().w()?;
    // SAFETY: the caller's contract; `config` and `attr` live through the call.
    unsafe {
        sys::cuLaunchKernelEx(
            &config,
            f.cu_function(),
            args.0.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
    .result()
    .w()
}

/// A device's side stream (non-blocking, created on first use and kept for the process) with the
/// events that fork it from candle's stream and join it back.
struct Side {
    device: String,
    stream: sys::CUstream,
    fork: sys::CUevent,
    join: sys::CUevent,
}

// SAFETY: driver handles, only used under the `SIDES` lock.
unsafe impl Send for Side {}

static SIDES: std::sync::Mutex<Vec<Side>> = std::sync::Mutex::new(Vec::new());

/// The side stream of `dev`, made to wait for everything issued on candle's stream so far (so
/// that it sees `x` and the buffers just allocated there).
fn side_stream(dev: &CudaDevice) -> candle_core::Result<sys::CUstream> {
    use candle_core::cuda_backend::cudarc::driver::result;
    let key = format!("{:?}", dev.location());
    let main = dev.cuda_stream();
    main.context().bind_to_thread().w()?;
    let mut sides = SIDES.lock().unwrap_or_else(|e| e.into_inner());
    let side = match sides.iter().position(|s| s.device == key) {
        Some(i) => &sides[i],
        None => {
            let flags = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING;
            sides.push(Side {
                device: key,
                stream: result::stream::create(result::stream::StreamKind::NonBlocking).w()?,
                fork: result::event::create(flags).w()?,
                join: result::event::create(flags).w()?,
            });
            sides.last().expect("just pushed. This is a bug.")
        }
    };
    // SAFETY: live handles of this device's context.
    unsafe {
        result::event::record(side.fork, main.cu_stream()).w()?;
        result::stream::wait_event(
            side.stream,
            side.fork,
            sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
        )
        .w()?;
    }
    Ok(side.stream)
}

/// Makes candle's stream wait for everything issued on `dev`'s side stream so far.
fn side_join(dev: &CudaDevice) -> candle_core::Result<()> {
    use candle_core::cuda_backend::cudarc::driver::result;
    let key = format!("{:?}", dev.location());
    let main = dev.cuda_stream();
    main.context().bind_to_thread().w()?;
    let sides = SIDES.lock().unwrap_or_else(|e| e.into_inner());
    let Some(side) = sides.iter().find(|s| s.device == key) else {
        return Ok(()); // nothing was ever issued there
    };
    // SAFETY: live handles of this device's context.
    unsafe {
        result::event::record(side.join, side.stream).w()?;
        result::stream::wait_event(
            main.cu_stream(),
            side.join,
            sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
        )
        .w()?;
    }
    Ok(())
}

/// Runs the grouped forward `y[row] = scale · x[row] · Sᵀ` for every table; `x` is `(m, k)`
/// contiguous from element `x_start`, the result `(m, n)`.
/// The scratch buffers stay alive in the returned [`Scratch`] until the caller has joined `on`.
#[allow(clippy::too_many_arguments)]
fn forward<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    x_storage: &CudaStorage,
    x_start: usize,
    m: usize,
    n: usize,
    k: usize,
    tables: &[GroupTable],
    path: Bf16Path,
    base: u64,
    on: On,
) -> candle_core::Result<(CudaSlice<T>, Scratch)> {
    let mut scratch = Scratch::default();
    let x_all = x_storage.as_cuda_slice::<T>()?;
    let x = x_all.slice(x_start..x_start + m * k);
    // SAFETY: every row belongs to exactly one group and every group writes all its n outputs.
    let mut y = unsafe { dev.alloc::<T>(m * n) }?;
    if m == 0 || n == 0 {
        return Ok((y, scratch));
    }
    let w = words_per_row(k);
    let (n_i, k_i, w_i) = (to_i32(n, "N")?, to_i32(k, "K")?, to_i32(w, "ceil(K/32)")?);
    let dtype = x_storage.dtype();
    if base != 0 && (dtype != DType::BF16 || path == Bf16Path::Simple) {
        candle_core::bail!(
            "sign matmul (CUDA): a fused base needs bf16 on tensor cores. This is a bug."
        )
    }
    // BinaryMma routes as TensorCore but for the warpgroup kernel.
    let tc = matches!(path, Bf16Path::TensorCore | Bf16Path::BinaryMma);
    if dtype == DType::BF16 && path != Bf16Path::Simple {
        let xb = x_storage.as_cuda_slice::<bf16>()?;
        let xv = xb.slice(x_start..x_start + m * k);
        let sms = multiprocessors(dev);
        let aligned = |t: &GroupTable| {
            w.is_multiple_of(4)
                && t.words[..t.n_groups as usize]
                    .iter()
                    .all(|p| p.is_multiple_of(16))
        };
        if tc && tables.iter().all(|t| aligned(t) && takes_b1(t, n, k)) {
            let (xv_ptr, y_ptr) = (view_ptr(&xv, dev), slice_ptr(&y, dev));
            let wgmma = path == Bf16Path::TensorCore && warpgroup_mma(dev);
            scratch = forward_b1(dev, xv_ptr, m, n, k, tables, base, y_ptr, on, wgmma)?;
            return Ok((y, scratch));
        }
        if tc
            && k < INT8_MAX_K
            && tables
                .iter()
                .all(|t| aligned(t) && t.max_delta_group_rows() <= INT8_MAX_GROUP_ROWS)
        {
            let (xv_ptr, y_ptr) = (view_ptr(&xv, dev), slice_ptr(&y, dev));
            scratch = forward_int8(dev, xv_ptr, m, n, k, tables, base, y_ptr, on)?;
            return Ok((y, scratch));
        }
        let (xp, corr, kp) = prep(dev, view_ptr(&xv, dev), m, k, on)?;
        let (xp_ptr, corr_ptr, y_ptr) = (
            slice_ptr(&xp, dev),
            slice_ptr(&corr, dev),
            slice_ptr(&y, dev),
        );
        scratch.keep(xp);
        scratch.keep(corr);
        let kp_i = to_i32(kp, "padded K")?;
        for table in tables {
            let aligned = aligned(table);
            let rt: usize = match table.max_group_rows() {
                0..=8 => 1,
                9..=16 => 2,
                _ => 4,
            };
            let (mut tiles, mut blocks) = feature_tiles(table.n_groups as usize, n, rt, sms);
            // Measured on the H100 (BENCHMARKS.md, sixth pass): with one row tile per group,
            // K <= 4096 and N >= 8192 (11008x4096, 32 rows of 8 tenants), 2 feature tiles per
            // warp beat 4 (32.9 against 38.8 us); on the 4096-feature shapes 4 stay faster.
            if rt == 1 && tiles == 4 && k <= 4096 && n >= 8192 {
                tiles = 2;
                blocks = table.n_groups as usize * n.div_ceil(32);
            }
            // Beside cuBLAS on the side stream (`delta_linear_overlapped`), with one row tile per
            // group and fewer than 8192 features: 2 feature tiles in blocks of 2 warps
            // (`ds_tc_bf16_t2_r1_w2`, sign_matmul.cu says why). Measured on the H100 (BENCHMARKS.md,
            // seventh pass, 32 rows x 8 tenants, whole step): 4096x11008 70.6 against 73.7 us,
            // 4096x4096 30.8 against 30.4 (noise); on 11008x4096 it lost (69.5 against 66.6), so
            // that shape keeps the tile rule above.
            let side_w2 = matches!(on, On::Side)
                && rt == 1
                && aligned
                && tc
                && table.n_groups > 1
                && n < 8192;
            if side_w2 {
                tiles = 2;
            }

            // 8 warps splitting K where the grid leaves SMs short of warps (one tenant), on the
            // default path; the second pass's 4-warp kernel otherwise.
            let (suffix, threads) = if side_w2 {
                ("w2", 64)
            } else if !aligned {
                ("s", 128)
            } else if tc && blocks < 2 * sms {
                ("w8", 256)
            } else {
                ("v", 128)
            };
            let mut args = Args::default();
            args.arg(table)
                .arg(&xp_ptr)
                .arg(&corr_ptr)
                .arg(&base)
                .arg(&y_ptr)
                .arg(&n_i)
                .arg(&w_i)
                .arg(&kp_i);
            let cfg = LaunchConfig {
                grid_dim: (to_u32(n.div_ceil(16 * tiles))?, table.n_groups, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: arguments match the kernel; the table's rows are < m, its words [n, w]
            // (w % 4 == 0 and 16-byte aligned rows for the `v` and `w8` kernels); it waits for
            // the prep kernel before reading xp (`ds_wait_prerequisite`).
            unsafe {
                launch(
                    dev,
                    &format!("ds_tc_bf16_t{tiles}_r{rt}_{suffix}"),
                    cfg,
                    &mut args,
                    on,
                    true,
                )
            }?;
        }
    } else {
        if matches!(on, On::Side) {
            candle_core::bail!("sign matmul (CUDA): the side stream takes bf16 tensor-core work only. This is a bug.")
        }
        let name = format!("ds_fwd_simple_{}", dtype_suffix(dtype)?);
        let f = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        for table in tables {
            let mut b = f.builder();
            b.arg(table)
                .arg(&x)
                .arg(&mut y)
                .arg(&n_i)
                .arg(&k_i)
                .arg(&w_i);
            let cfg = LaunchConfig {
                grid_dim: (to_u32(n.div_ceil(64))?, table.n_groups, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: arguments match the kernel; the table's rows are < m, its words [n, w].
            unsafe { b.launch(cfg) }.w()?;
        }
    }
    Ok((y, scratch))
}

/// The widest feature tile (1, 2 or 4 tiles of 16 features per warp, with `rt * tiles <= 8` row
/// tiles x feature tiles of accumulators) that still gives every SM two blocks, and the grid's
/// block count.
fn feature_tiles(groups: usize, n: usize, rt: usize, sms: usize) -> (usize, usize) {
    let tiles = [4usize, 2]
        .into_iter()
        .find(|&t| rt * t <= 8 && groups * n.div_ceil(16 * t) >= 2 * sms)
        .unwrap_or(1);
    (tiles, groups * n.div_ceil(16 * tiles))
}

/// The int8 path (`ds_prepi8_bf16`, then `ds_tci8_bf16_*` per table; `sign_matmul.cu` explains
/// it): every group of `tables` with a delta has at most 8 rows, sign rows are 16-byte aligned,
/// `k < 2^17`. `x` and `y` are device addresses of (m, k) and (m, n) bf16; the digit planes and
/// row sums come back as scratch.
#[allow(clippy::too_many_arguments)]
fn forward_int8(
    dev: &CudaDevice,
    x: u64,
    m: usize,
    n: usize,
    k: usize,
    tables: &[GroupTable],
    base: u64,
    y: u64,
    on: On,
) -> candle_core::Result<Scratch> {
    let kp = k.div_ceil(TC_CHUNK) * TC_CHUNK;
    let mut scratch = Scratch::default();
    // Three digit planes of kp bytes per row, one block per row.
    let fx = FixedPointX::prep(
        dev,
        "ds_prepi8_bf16",
        x,
        m,
        k,
        kp,
        3 * kp / 4,
        1,
        on,
        &mut scratch,
    )?;
    let sms = multiprocessors(dev);
    for table in tables {
        // Two rows per n-tile (three digit columns and a zero one each).
        let rt2 = table
            .max_delta_group_rows()
            .div_ceil(2)
            .clamp(1, 4)
            .next_power_of_two();
        let (tiles, blocks) = feature_tiles(table.n_groups as usize, n, rt2, sms);
        // Few blocks: 8 warps split K. Otherwise 4, or, for one-row groups whose 512-column chunks
        // 4 warps would split unevenly (K = 11008: 22 chunks), 2 (`ds_tci8_bf16_t4_r1_w2`, the
        // eighth pass: 100.0 -> 91.5 us at 4096x11008, 32 rows x 32 tenants).
        let nw = if blocks < 2 * sms {
            8
        } else if tiles == 4 && rt2 == 1 && !(kp / TC_CHUNK).is_multiple_of(4) {
            2
        } else {
            4
        };
        // More than 16 groups on that 4-warp kernel (32 rows x 32 tenants): its 6-blocks-per-SM
        // form, `ds_tci8_bf16_t4_r1_w4_b6` (the ninth pass: 4096x4096 36.4 -> 35.4 us). 8 groups
        // (8 rows x 8 tenants) keep 5 blocks per SM, where K9 measured 6 slower, and so do 16,
        // which `delta_linear` runs beside cuBLAS: there the 6-block form made the whole step
        // slower (session 6, lead, three processes each: 4096x4096 32 rows x 16 tenants 36.4
        // against 33.8-33.9 us, 11008x4096 16 x 16 78.9-79.0 against 76.1-76.2).
        let suffix = if tiles == 4 && rt2 == 1 && nw == 4 && table.n_groups > 16 {
            "_b6"
        } else {
            ""
        };
        let cfg = LaunchConfig {
            grid_dim: (to_u32(n.div_ceil(16 * tiles))?, table.n_groups, 1),
            block_dim: (to_u32(32 * nw)?, 1, 1),
            shared_mem_bytes: 0,
        };
        let name = format!("ds_tci8_bf16_t{tiles}_r{rt2}_w{nw}{suffix}");
        fx.launch_product(dev, &name, cfg, table, base, y, n, on)?;
    }
    Ok(scratch)
}

/// x in the fixed-point form of the int8 and binary paths, as its prep kernel wrote it (device
/// addresses): the encoding, partial sums of the rounded x and 2^-E per row.
struct FixedPointX {
    enc: u64,
    xsum: u64,
    rscale: u64,
    /// ceil(K/32), and the padded length the prep kernel took (`kp` or `wp`).
    w: i32,
    padded: i32,
}

impl FixedPointX {
    /// Runs prep kernel `name` (parameters x, enc, xsum, rscale, K, padded; grid (m, slices) of
    /// 256 threads) into buffers kept in `scratch`: `enc_u32` u32 of encoding and `slices` partial
    /// sums per row.
    #[allow(clippy::too_many_arguments)]
    fn prep(
        dev: &CudaDevice,
        name: &str,
        x: u64,
        m: usize,
        k: usize,
        padded: usize,
        enc_u32: usize,
        slices: usize,
        on: On,
        scratch: &mut Scratch,
    ) -> candle_core::Result<Self> {
        let (k_i, padded_i) = (to_i32(k, "K")?, to_i32(padded, "padded K")?);
        // SAFETY: the prep kernel writes every encoded value, partial sum and rscale of m rows.
        let enc = unsafe { dev.alloc::<u32>(m * enc_u32) }?;
        let xsum = unsafe { dev.alloc::<f64>(m * slices) }?;
        let rscale = unsafe { dev.alloc::<f64>(m) }?;
        let fx = Self {
            enc: slice_ptr(&enc, dev),
            xsum: slice_ptr(&xsum, dev),
            rscale: slice_ptr(&rscale, dev),
            w: to_i32(words_per_row(k), "ceil(K/32)")?,
            padded: padded_i,
        };
        scratch.keep(enc);
        scratch.keep(xsum);
        scratch.keep(rscale);
        let mut args = Args::default();
        args.arg(&x)
            .arg(&fx.enc)
            .arg(&fx.xsum)
            .arg(&fx.rscale)
            .arg(&k_i)
            .arg(&padded_i);
        let cfg = LaunchConfig {
            grid_dim: (to_u32(m)?, to_u32(slices)?, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match the prep kernels `ds_prepi8_bf16` and `ds_prepb1_bf16`; x
        // holds m * k values.
        unsafe { launch(dev, name, cfg, &mut args, on, false) }?;
        Ok(fx)
    }

    /// Launches product kernel `name` (parameters table, enc, xsum, rscale, base, y, N, W,
    /// padded) for one table, as a programmatic dependent of the prep.
    #[allow(clippy::too_many_arguments)]
    fn launch_product(
        &self,
        dev: &CudaDevice,
        name: &str,
        cfg: LaunchConfig,
        table: &GroupTable,
        base: u64,
        y: u64,
        n: usize,
        on: On,
    ) -> candle_core::Result<()> {
        let n_i = to_i32(n, "N")?;
        let mut args = Args::default();
        args.arg(table)
            .arg(&self.enc)
            .arg(&self.xsum)
            .arg(&self.rscale)
            .arg(&base)
            .arg(&y)
            .arg(&n_i)
            .arg(&self.w)
            .arg(&self.padded);
        // SAFETY: arguments match the int8 and binary product kernels; the table's rows are < m
        // with at most 8 per group, its words [n, w] with w % 4 == 0 and 16-byte aligned rows;
        // base is 0 or m * n bf16; the kernel waits for the prep kernel before reading its
        // outputs (`ds_wait_prerequisite`).
        unsafe { launch(dev, name, cfg, &mut args, on, true) }
    }
}

/// Groups of at most this many rows can take the binary kernel (`ds_tcb1_bf16_*`).
const B1_MAX_GROUP_ROWS: usize = 8;

/// The binary kernel sums its bit planes in int32, exact for K below this (`sign_matmul.cu`).
const B1_MAX_K: usize = 1 << 16;

/// Whether a table (with 16-byte aligned sign rows) takes the binary path, for `n` features and
/// `k` columns. Measured on the H100 against the int8 and bf16 kernels in the same calls
/// (BENCHMARKS.md, sessions 7 and 8; `ours` delta product / whole step `dl`, µs):
/// - every batch of one-row groups (4096x4096 8 x 8 13.7 -> 10.5, 32 x 32 36.0 -> 32.9);
/// - 3-8 rows per group with 8 or more tenants, since session 8's leaner loop and store
///   (4096x4096 32 x 8 16.4 -> 13.3 / 30.2 -> 28.4-28.8, 11008x4096 32 x 8 32.7 -> 27.5 /
///   66.0 -> 58.0);
/// - 2 rows per group with 8 or more tenants where K or N is at least 8192 (11008x4096 32 x 16
///   47.9 -> 40.5 / 79.4 -> 71.9; 4096x11008 since session 7). On 4096x4096 the product is faster
///   (21.3 -> 19.9) but the whole step beside cuBLAS slower (33.0-34.0 -> 35.0-35.8), so the int8
///   kernel keeps it;
/// - not one tenant of several rows (one group: 64 blocks for 4096 features, twice as slow).
///
/// K stays below [`B1_MAX_K`].
fn takes_b1(t: &GroupTable, n: usize, k: usize) -> bool {
    let (rows, tenants) = (t.max_delta_group_rows(), t.delta_groups());
    if k >= B1_MAX_K {
        return false;
    }
    rows <= 1
        || (rows <= B1_MAX_GROUP_ROWS && tenants >= 8 && (k >= 8192 || n >= 8192 || rows >= 3))
}

/// The binary path (`ds_prepb1_bf16`, then `ds_tcb1_bf16_*` per table; `sign_matmul.cu` explains
/// it): every group of `tables` with a delta has at most 8 rows, sign rows are 16-byte aligned.
/// `x` and `y` are device addresses of (m, k) and (m, n) bf16; the bit planes and row sums come
/// back as scratch. With `wgmma` (a device of compute capability 9.0) and 3-8 rows in the largest
/// group of every table, `ds_prepb1wg_bf16` and the warpgroup kernel `ds_wgb1_bf16_r4` / `_r8`
/// instead (`binary_wgmma.cu`). Measured on the H100 against `ds_tcb1` in the same calls
/// (BENCHMARKS.md, session 9; delta product / whole step `dl`, µs), 32 rows x 8 tenants:
/// 4096x4096 12.8 -> 10.9 / 27.7 -> 25.9, 11008x4096 25.6 -> 22.6 / 57.5 -> 55.0, 4096x11008
/// 28.3 -> 26.0 / 61.4 -> 60.3; 64 rows x 8 tenants (8-row groups) 19.4 -> 16.9, 33.6 -> 28.8,
/// 43.3 -> 37.6.
#[allow(clippy::too_many_arguments)]
fn forward_b1(
    dev: &CudaDevice,
    x: u64,
    m: usize,
    n: usize,
    k: usize,
    tables: &[GroupTable],
    base: u64,
    y: u64,
    on: On,
    wgmma: bool,
) -> candle_core::Result<Scratch> {
    let wp = words_per_row(k).div_ceil(16) * 16;
    let mut scratch = Scratch::default();
    // 16 planes of wp words per row; blocks of 32 words, each with its partial sum of x.
    let slices = wp.div_ceil(32);
    let rows_pow2 = |t: &GroupTable| {
        t.max_delta_group_rows()
            .clamp(1, B1_MAX_GROUP_ROWS)
            .next_power_of_two()
    };
    // One prep serves every table, and the two kernels take x in different layouts.
    let wgmma = wgmma && tables.iter().all(|t| rows_pow2(t) >= 4);
    let fx = FixedPointX::prep(
        dev,
        if wgmma {
            "ds_prepb1wg_bf16"
        } else {
            "ds_prepb1_bf16"
        },
        x,
        m,
        k,
        wp,
        16 * wp,
        slices,
        on,
        &mut scratch,
    )?;
    let sms = multiprocessors(dev);
    // `ds_tcb1_body`'s warps per block and ring slots.
    let (nw, slots) = (4, 6);
    for table in tables {
        let r = rows_pow2(table);
        if wgmma {
            // One warpgroup per 64 features; 6 ring slots of the 64 sign rows and 16 r plane rows
            // of 64 bytes.
            let cfg = LaunchConfig {
                grid_dim: (to_u32(n.div_ceil(64))?, table.n_groups, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: to_u32(6 * (64 + 16 * r) * 64)?,
            };
            let name = format!("ds_wgb1_bf16_r{r}");
            fx.launch_product(dev, &name, cfg, table, base, y, n, on)?;
            continue;
        }
        let groups = table.n_groups as usize;
        // 2 feature tiles per warp (x read once for twice the features) where the grid still
        // gives every SM two blocks, and the accumulators fit (rows x tiles <= 4).
        let tiles = if r <= 2 && groups * n.div_ceil(32 * nw) >= 2 * sms {
            2
        } else {
            1
        };
        // The ring: `slots` slots of the block's sign rows (64 bytes each) and the group's x
        // fragments (1 KB per row).
        let smem = slots * (nw * tiles * 16 * 64 + r * 1024);
        let cfg = LaunchConfig {
            grid_dim: (to_u32(n.div_ceil(16 * nw * tiles))?, table.n_groups, 1),
            block_dim: (to_u32(32 * nw)?, 1, 1),
            shared_mem_bytes: to_u32(smem)?,
        };
        // The L2 prefetch of whole 256-byte segments of sign rows: measured faster on K = 11008
        // and with 32 tenants, slower on K = 4096 with 8 tenants (BENCHMARKS.md, session 8).
        let pf = if k >= 8192 || table.delta_groups() >= 32 {
            "_pf"
        } else {
            ""
        };
        let name = format!("ds_tcb1_bf16_t{tiles}_r{r}{pf}");
        fx.launch_product(dev, &name, cfg, table, base, y, n, on)?;
    }
    Ok(scratch)
}

/// Runs `ds_prep_bf16`: `x` ((m, k) bf16 at device address `x`) scaled and rearranged for the
/// tensor-core kernels (`xp`, rows padded to `kp`), and the per-chunk correction sums.
fn prep(
    dev: &CudaDevice,
    x: u64,
    m: usize,
    k: usize,
    on: On,
) -> candle_core::Result<(CudaSlice<bf16>, CudaSlice<f32>, usize)> {
    let kp = k.div_ceil(TC_CHUNK) * TC_CHUNK;
    let chunks = kp / TC_CHUNK;
    // SAFETY: the prep kernel writes all m * kp values and all m * chunks partial sums.
    let xp = unsafe { dev.alloc::<bf16>(m * kp) }?;
    let corr = unsafe { dev.alloc::<f32>(m * chunks) }?;
    let (k_i, kp_i) = (to_i32(k, "K")?, to_i32(kp, "padded K")?);
    let (xp_ptr, corr_ptr) = (slice_ptr(&xp, dev), slice_ptr(&corr, dev));
    let mut args = Args::default();
    args.arg(&x)
        .arg(&xp_ptr)
        .arg(&corr_ptr)
        .arg(&k_i)
        .arg(&kp_i);
    let cfg = LaunchConfig {
        grid_dim: (to_u32(m)?, to_u32(chunks)?, 1),
        block_dim: (64, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: arguments match `ds_prep_bf16`; x holds m * k values.
    unsafe { launch(dev, "ds_prep_bf16", cfg, &mut args, on, false) }?;
    Ok((xp, corr, kp))
}

/// Whether the fused kernel ([`delta_linear_fused`]) applies: bf16 `x` (M ≤ 32 rows) and base
/// weight on CUDA, `K % 8 == 0`, `ceil(K/32) % 4 == 0`, 16-byte aligned starts, and at most
/// [`FUSED_MAX_GROUPS`] groups (distinct tenants, counting the base-only rows as one).
pub fn fused_ok(
    x: &Tensor,
    w_base: &Tensor,
    row_slot: &[Option<u32>],
    deltas: &[&SignDelta],
) -> bool {
    let aligned = |t: &Tensor, bytes: usize| {
        t.is_contiguous() && (t.layout().start_offset() * bytes).is_multiple_of(16)
    };
    let Some(first) = deltas.first() else {
        return false;
    };
    let k = first.k();
    let mut used: Vec<Option<u32>> = row_slot.to_vec();
    used.sort_unstable();
    used.dedup();
    x.device().is_cuda()
        && x.dtype() == DType::BF16
        && w_base.dtype() == DType::BF16
        && row_slot.len() <= GROUP_ROWS
        && k.is_multiple_of(8)
        && words_per_row(k).is_multiple_of(4)
        && used.len() <= FUSED_MAX_GROUPS
        && aligned(x, 2)
        && aligned(w_base, 2)
        && deltas.iter().all(|d| aligned(d.signs().words(), 4))
}

/// [`crate::delta_linear`] on the one-kernel path whatever the batch (`ds_fused_bf16_*`: each
/// group's rows times `W_base + scale · S`, merged in registers and rounded once to bf16), for
/// tests and benchmarks; an error where [`fused_ok`] is false.
pub fn delta_linear_fused(
    x: &Tensor,
    w_base: &Tensor,
    row_slot: &[Option<u32>],
    deltas: &[&SignDelta],
) -> candle_core::Result<Tensor> {
    let first = deltas.first().ok_or(KernelError::NoDeltas)?;
    let (m, k) = x.dims2()?;
    if w_base.dims() != [first.n(), k] || k != first.k() || row_slot.len() != m {
        candle_core::bail!(
            "delta_linear_fused: x {:?}, w_base {:?}, {} row slots do not match the deltas' [{}, {}]",
            x.dims(),
            w_base.dims(),
            row_slot.len(),
            first.n(),
            first.k()
        )
    }
    if !fused_ok(x, w_base, row_slot, deltas) {
        candle_core::bail!("delta_linear_fused: this batch does not fit the fused kernel (bf16, M <= 32, K % 8 == 0, ceil(K/32) % 4 == 0, <= {FUSED_MAX_GROUPS} groups); use delta_linear")
    }
    crate::ops::delta_linear_fused_op(x, w_base, row_slot, deltas)
}

/// `cuda_fwd` of [`crate::delta_linear`] on the fused kernel (the caller checked [`fused_ok`] and
/// the shapes).
pub(crate) fn delta_linear_fwd(
    x: &CudaStorage,
    x_layout: &Layout,
    w: &CudaStorage,
    w_layout: &Layout,
    row_slot: &[Option<u32>],
    deltas: &[&SignDelta],
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = x.device();
    let first = deltas.first().ok_or(KernelError::NoDeltas)?;
    let (n, k) = (first.n(), first.k());
    let m = row_slot.len();
    let mut groups: Vec<Group> = Vec::new();
    let mut locks = Vec::new();
    let mut base_rows = Vec::new();
    let mut slot_group: Vec<Option<usize>> = vec![None; deltas.len()];
    for (row, slot) in row_slot.iter().enumerate() {
        match *slot {
            None => base_rows.push(row),
            Some(slot) => {
                let s = slot as usize;
                let delta = deltas.get(s).ok_or(KernelError::SlotOutOfRange {
                    row,
                    slot,
                    num_deltas: deltas.len(),
                })?;
                if (delta.n(), delta.k()) != (n, k) {
                    return Err(KernelError::DeltaShapeMismatch {
                        index: s,
                        n: delta.n(),
                        k: delta.k(),
                        n0: n,
                        k0: k,
                    }
                    .into());
                }
                let g = match slot_group[s] {
                    Some(g) => g,
                    None => {
                        let words = DeviceWords::new(delta.signs(), dev, "delta_linear")?;
                        groups.push(Group {
                            words: words.address(dev)?,
                            scale: delta.scale(),
                            rows: Vec::new(),
                        });
                        locks.push(words);
                        slot_group[s] = Some(groups.len() - 1);
                        groups.len() - 1
                    }
                };
                groups[g].rows.push(row);
            }
        }
    }
    if !base_rows.is_empty() {
        groups.push(Group {
            words: 0,
            scale: 0.0,
            rows: base_rows,
        });
    }
    let tables = group_tables(&groups)?;
    if tables.len() > 1 || m > GROUP_ROWS {
        candle_core::bail!(
            "delta_linear: {m} rows in {} groups do not fit one fused launch. This is a bug.",
            groups.len()
        )
    }
    let (xs, xstart) = (x.as_cuda_slice::<bf16>()?, x_layout.start_offset());
    let (ws, wstart) = (w.as_cuda_slice::<bf16>()?, w_layout.start_offset());
    let xv = xs.slice(xstart..xstart + m * k);
    let wv = ws.slice(wstart..wstart + n * k);
    // SAFETY: every block writes its 32 features of all m rows.
    let mut y = unsafe { dev.alloc::<bf16>(m * n) }?;
    if m > 0 && n > 0 {
        let table = tables.first().copied().unwrap_or(GroupTable::empty(false));
        fused(dev, &table, &xv, &wv, &mut y, m, n, k)?;
    }
    drop(locks);
    Ok((
        CudaStorage::wrap_cuda_slice(y, dev.clone()),
        Shape::from((m, n)),
    ))
}

/// Launches `ds_fused_bf16_r*` for one table (at most [`FUSED_MAX_GROUPS`] groups, M <= 32 rows):
/// each block owns 32 features; the per-warp cp.async rings live in dynamic shared memory, sized
/// so that the whole grid is resident at once (blocks of one SM then share the memory system
/// evenly, with no tail wave), with as many warps (up to 8) as that leaves room for.
#[allow(clippy::too_many_arguments)]
fn fused(
    dev: &CudaDevice,
    table: &GroupTable,
    x: &CudaView<'_, bf16>,
    w: &CudaView<'_, bf16>,
    y: &mut CudaSlice<bf16>,
    m: usize,
    n: usize,
    k: usize,
) -> candle_core::Result<()> {
    /// Shared memory per SM on sm_90 (228 KiB), less 1 KiB the runtime reserves per block.
    const SMEM_PER_SM: usize = 228 * 1024;
    const SMEM_PER_BLOCK_MAX: usize = 227 * 1024;
    const MAX_WARPS: usize = 8;
    let groups = table.n_groups as usize;
    if groups > FUSED_MAX_GROUPS || m > GROUP_ROWS {
        candle_core::bail!("delta_linear (fused): {m} rows in {groups} groups. This is a bug.")
    }
    let rt = m.div_ceil(8).max(1);
    let blocks = n.div_ceil(32);
    let per_sm = blocks.div_ceil(multiprocessors(dev)).max(1);
    let budget = (SMEM_PER_SM / per_sm)
        .saturating_sub(1024)
        .min(SMEM_PER_BLOCK_MAX);
    // Stage width: KS k-steps of 32 columns (`KS` in `ds_fused_bf16_body`). One group: 64-column
    // stages, whose smaller ring slots let more warps and more stages in flight fit (sixth pass);
    // several groups: 128 columns, the multi-group kernel as the fourth pass measured it.
    let ks = if groups == 1 { 2 } else { 4 };
    // Bytes per ring slot: W (2 x 16 rows x 64 ks), x (rt x 8 rows x 64 ks), bits (groups x 32 x 16).
    let slot_bytes = 16 * (128 * ks + rt * 32 * ks + groups * 2 * 16);
    // Warps with `stages` slots each that keep the grid resident; where the resident grid leaves
    // no room for one warp (many blocks per SM), fewer blocks per SM instead.
    let fit = |stages: usize| match (budget / (stages * slot_bytes)).min(MAX_WARPS) {
        0 => (SMEM_PER_BLOCK_MAX / (stages * slot_bytes)).min(MAX_WARPS),
        w => w,
    };
    // Ring slots per warp (`S`): 3 (two stages in flight while one is multiplied) where 8 warps
    // still fit, else 2 (more warps, each double-buffered). On the H100 (BENCHMARKS.md, sixth
    // pass) 3 slots won where both keep 8 warps (4096x4096 32 rows 18.5 against 19.6 us) and lost
    // where they cost warps (11008x4096, 3 blocks per SM: 16 rows 42.3 against 40.0 us).
    let stages = if groups == 1 && fit(3) == MAX_WARPS {
        3
    } else {
        2
    };
    let warps = fit(stages);
    if warps == 0 {
        candle_core::bail!(
            "delta_linear (fused): {groups} groups need {} bytes of shared memory per warp, more than a block may have. This is a bug (fused_ok admits at most {FUSED_MAX_GROUPS}).",
            stages * slot_bytes
        )
    }
    let smem = warps * stages * slot_bytes;
    // `_1s2` / `_1s3`: the one-group kernel (no per-row group masks) with 2 / 3 ring slots; `_g`:
    // up to FUSED_MAX_GROUPS groups.
    let kname = if groups == 1 {
        format!("ds_fused_bf16_r{rt}_1s{stages}")
    } else {
        format!("ds_fused_bf16_r{rt}_g")
    };
    let f = dev.get_or_load_custom_func(&kname, MODULE, PTX)?;
    opt_in_smem(&f, SMEM_PER_BLOCK_MAX)?;
    let (m_i, n_i, k_i) = (to_i32(m, "M")?, to_i32(n, "N")?, to_i32(k, "K")?);
    let w_i = to_i32(words_per_row(k), "ceil(K/32)")?;
    let mut b = f.builder();
    b.arg(table)
        .arg(x)
        .arg(w)
        .arg(&mut *y)
        .arg(&m_i)
        .arg(&n_i)
        .arg(&k_i)
        .arg(&w_i);
    let cfg = LaunchConfig {
        grid_dim: (to_u32(blocks)?, 1, 1),
        block_dim: (to_u32(32 * warps)?, 1, 1),
        shared_mem_bytes: to_u32(smem)?,
    };
    // SAFETY: arguments match `ds_fused_bf16_r*`; x is (m, k), w (n, k), the table's words
    // (n, ceil(k/32)) with the alignment `fused_ok` checked; smem as the kernel computes it.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// The opt-in to `bytes` (> 48 KiB) of dynamic shared memory for the function handle that will be
/// launched. The handle's attribute is read first and set only while below, so that once a call
/// has run no attribute is set again (none inside a CUDA graph capture). It used to be recorded
/// once per kernel name and device, but each `CudaDevice` (and a racing first load) loads its own
/// module with its own handles, and the record made for one skipped the others: a launch failure
/// when two tests first ran a > 48 KB kernel at once.
fn opt_in_smem(
    f: &candle_core::cuda_backend::cudarc::driver::CudaFunction,
    bytes: usize,
) -> candle_core::Result<()> {
    let attr = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
    let want = to_i32(bytes, "shared memory")?;
    if f.get_attribute(attr).w()? < want {
        f.set_attribute(attr, want).w()?;
    }
    Ok(())
}

/// Whether `dev` can run the warpgroup kernels of `binary_wgmma.cu`: built for it (`build.rs`)
/// and of compute capability 9.0 exactly, the only one that loads sm_90a code.
fn warpgroup_mma(dev: &CudaDevice) -> bool {
    let stream = dev.cuda_stream();
    let cc = |a| stream.context().attribute(a).ok();
    !PTX_WGMMA.is_empty()
        && cc(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR) == Some(9)
        && cc(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR) == Some(0)
}

fn multiprocessors(dev: &CudaDevice) -> usize {
    dev.cuda_stream()
        .context()
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_or(132, |v| v.max(1) as usize)
}

fn dtype_suffix(dtype: DType) -> candle_core::Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F64 => "f64",
        other => {
            return Err(KernelError::UnsupportedDType {
                op: "sign matmul (CUDA)",
                dtype: format!("{other:?}"),
            }
            .into())
        }
    })
}

/// Calls a function generic over the element type with the type of `$dtype`, and wraps the
/// `CudaSlice` it returns as a `CudaStorage` on `$dev`.
macro_rules! dispatch {
    ($dtype:expr, $dev:expr, $fun:ident ( $($arg:expr),* )) => {
        match $dtype {
            DType::F32 => CudaStorage::wrap_cuda_slice($fun::<f32>($($arg),*)?, $dev.clone()),
            DType::F16 => CudaStorage::wrap_cuda_slice($fun::<f16>($($arg),*)?, $dev.clone()),
            DType::BF16 => CudaStorage::wrap_cuda_slice($fun::<bf16>($($arg),*)?, $dev.clone()),
            DType::F64 => CudaStorage::wrap_cuda_slice($fun::<f64>($($arg),*)?, $dev.clone()),
            other => {
                dtype_suffix(other)?;
                unreachable!("dtype_suffix accepts only the four dtypes above")
            }
        }
    };
}

/// [`forward`] with the element type of `$dtype`: the output as a `CudaStorage` on `$dev`, and
/// the scratch.
macro_rules! dispatch_forward {
    ($dtype:expr, $dev:expr, ( $($arg:expr),* )) => {{
        fn wrap<T: CudaDType + DeviceRepr>(
            r: (CudaSlice<T>, Scratch),
            dev: &CudaDevice,
        ) -> (CudaStorage, Scratch) {
            (CudaStorage::wrap_cuda_slice(r.0, dev.clone()), r.1)
        }
        match $dtype {
            DType::F32 => wrap(forward::<f32>($($arg),*)?, $dev),
            DType::F16 => wrap(forward::<f16>($($arg),*)?, $dev),
            DType::BF16 => wrap(forward::<bf16>($($arg),*)?, $dev),
            DType::F64 => wrap(forward::<f64>($($arg),*)?, $dev),
            other => {
                dtype_suffix(other)?;
                unreachable!("dtype_suffix accepts only the four dtypes above")
            }
        }
    }};
}

/// The input's shape with its last dimension replaced.
fn with_last_dim(layout: &Layout, last: usize) -> Shape {
    let mut dims = layout.dims().to_vec();
    if let Some(d) = dims.last_mut() {
        *d = last;
    }
    Shape::from(dims)
}

/// `cuda_fwd` of [`crate::sign_matmul_t`]: `x (.., K) · Sᵀ`.
pub(crate) fn sign_matmul_t_fwd(
    storage: &CudaStorage,
    layout: &Layout,
    signs: &SignBits,
    path: Bf16Path,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = storage.device();
    let (n, k) = (signs.n(), signs.k());
    let m = layout.shape().elem_count() / k;
    let words = DeviceWords::new(signs, dev, "sign_matmul_t")?;
    let tables = identity_tables(m, words.address(dev)?, 1.0)?;
    let (copy, start) = contiguous(storage, layout)?;
    let x = copy.as_ref().unwrap_or(storage);
    let (y, _scratch) = dispatch_forward!(
        storage.dtype(),
        dev,
        (dev, x, start, m, n, k, &tables, path, 0, On::Main)
    );
    drop(words);
    Ok((y, with_last_dim(layout, n)))
}

/// `cuda_fwd` of [`crate::tenant_delta_matmul`] (its public function has checked `row_slot`'s
/// length and `x`'s width).
pub(crate) fn tenant_delta_matmul_fwd(
    storage: &CudaStorage,
    layout: &Layout,
    row_slot: &[Option<u32>],
    deltas: &[&SignDelta],
    path: Bf16Path,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (y, shape, _scratch) =
        tenant_delta_fwd(storage, layout, row_slot, deltas, path, None, On::Main)?;
    Ok((y, shape))
}

/// `cuda_fwd` of [`crate::tenant_delta_matmul_add`]: `base + tenant_delta_matmul(x, ..)` with the
/// add fused into the kernel's store (bf16 `x` and `base`; the public function checked the
/// shapes and dtypes).
pub(crate) fn tenant_delta_matmul_add_fwd(
    x: &CudaStorage,
    x_layout: &Layout,
    base: &CudaStorage,
    base_layout: &Layout,
    row_slot: &[Option<u32>],
    deltas: &[&SignDelta],
    path: Bf16Path,
) -> candle_core::Result<(CudaStorage, Shape)> {
    if x.dtype() != DType::BF16 || base.dtype() != DType::BF16 || path == Bf16Path::Simple {
        candle_core::bail!(
            "tenant_delta_matmul_add on CUDA: bf16 x and base on tensor cores only. This is a bug."
        )
    }
    let (y, shape, _scratch) = tenant_delta_fwd(
        x,
        x_layout,
        row_slot,
        deltas,
        path,
        Some((base, base_layout)),
        On::Main,
    )?;
    Ok((y, shape))
}

/// The grouped forward of a multi-tenant batch on `on`, with its scratch (which must outlive the
/// join of a side stream).
fn tenant_delta_fwd(
    storage: &CudaStorage,
    layout: &Layout,
    row_slot: &[Option<u32>],
    deltas: &[&SignDelta],
    path: Bf16Path,
    base: Option<(&CudaStorage, &Layout)>,
    on: On,
) -> candle_core::Result<(CudaStorage, Shape, Scratch)> {
    let dev = storage.device();
    let first = deltas.first().ok_or(KernelError::NoDeltas)?;
    let (n, k) = (first.n(), first.k());
    for (index, d) in deltas.iter().enumerate() {
        if (d.n(), d.k()) != (n, k) {
            return Err(KernelError::DeltaShapeMismatch {
                index,
                n: d.n(),
                k: d.k(),
                n0: n,
                k0: k,
            }
            .into());
        }
    }
    let m = row_slot.len();
    // Rows of each slot, in batch order (the SGMV "segments"), and the base-only rows.
    let mut rows_of_slot: Vec<Vec<usize>> = vec![Vec::new(); deltas.len()];
    let mut base_rows = Vec::new();
    for (row, slot) in row_slot.iter().enumerate() {
        match *slot {
            Some(slot) => rows_of_slot
                .get_mut(slot as usize)
                .ok_or(KernelError::SlotOutOfRange {
                    row,
                    slot,
                    num_deltas: deltas.len(),
                })?
                .push(row),
            None => base_rows.push(row),
        }
    }
    let mut locks = Vec::new();
    let mut groups = Vec::new();
    for (delta, rows) in deltas.iter().zip(rows_of_slot) {
        if rows.is_empty() {
            continue;
        }
        let words = DeviceWords::new(delta.signs(), dev, "tenant_delta_matmul")?;
        groups.push(Group {
            words: words.address(dev)?,
            scale: delta.scale(),
            rows,
        });
        locks.push(words);
    }
    if !base_rows.is_empty() {
        groups.push(Group {
            words: 0,
            scale: 0.0,
            rows: base_rows,
        });
    }
    let tables = group_tables(&groups)?;
    let (copy, start) = contiguous(storage, layout)?;
    let x = copy.as_ref().unwrap_or(storage);
    // The base as a device address of m * n contiguous bf16 values (0: none).
    let mut base_copy = None;
    let mut base_addr = 0u64;
    if let Some((bs, bl)) = base {
        let (c, bstart) = contiguous(bs, bl)?;
        base_copy = c;
        let b = base_copy.as_ref().unwrap_or(bs).as_cuda_slice::<bf16>()?;
        base_addr = slice_ptr(b, dev) + 2 * bstart as u64;
    }
    let (y, mut scratch) = dispatch_forward!(
        storage.dtype(),
        dev,
        (dev, x, start, m, n, k, &tables, path, base_addr, on)
    );
    drop(locks);
    if let Some(c) = copy {
        scratch.keep(c);
    }
    if let Some(c) = base_copy {
        scratch.keep(c);
    }
    Ok((y, with_last_dim(layout, n), scratch))
}

/// Decode batches of at most this many rows take [`delta_linear_overlapped`] in
/// [`crate::delta_linear`] (the rows the bench's mixes measure; a prefill's base product is
/// compute-bound and keeps the plain order).
pub const OVERLAP_MAX_ROWS: usize = 32;

/// [`crate::delta_linear`] overlaps batches of at most this many distinct tenants too: the delta
/// part then reads at most the base product's bytes (1 bit against 16 per weight). With 32
/// tenants the overlap measured a loss on 4096x11008 (139.3 against 135.0 us) and small gains
/// elsewhere (BENCHMARKS.md, sixth pass).
pub const OVERLAP_MAX_TENANTS: usize = 16;

/// The unfused decode step with its two halves side by side: the delta product (prep and
/// product kernels) goes to a side stream while candle's stream computes the base product
/// `x · W_baseᵀ` (cuBLAS), then candle's stream waits for the side stream and adds the two.
///
/// Why: at decode both halves are far from the memory bandwidth on their own (on the H100, 32 rows
/// of 8 tenants: cuBLAS at ~97% of copy bandwidth for 14 µs, then the prep kernel for 3.8 µs and
/// the product kernel at 30% of DRAM with 0.6 eligible warps per scheduler for 17 µs, in series;
/// BENCHMARKS.md, fifth pass), so run together they share the memory system instead of
/// taking turns. The delta product is rounded to bf16 before the add (one more rounding than the
/// fused store of [`crate::tenant_delta_matmul_add`], `2⁻⁹` of the delta term). bf16 `x` on CUDA.
///
/// The base product stays candle's matmul (cuBLAS). On the H100 at 4096x4096, 32 rows of 8
/// tenants (BENCHMARKS.md, ninth pass), no other base product made this step faster: the 8
/// cuBLASLt heuristic algorithms, `CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET` 64-112, the transposed
/// call `(W · xᵀ)ᵀ`, the base issued first on a stream of its own, and the fused kernel run with
/// no delta at 1-8 warps per block (which leaves room on each SM for the delta's blocks) measured
/// 30.1-64.2 µs against 30.1-30.3 µs, equal within noise at best. The likely reason (not
/// profiled): the delta product is latency-bound, and a base product that keeps DRAM busy beside
/// it lengthens exactly the waits that bound it. So the 4096x4096 32x8 step has to get faster
/// from the delta's side.
pub(crate) fn delta_linear_overlapped(
    x: &Tensor,
    w_base: &Tensor,
    row_slot: &[Option<u32>],
    deltas: &[&SignDelta],
) -> candle_core::Result<Tensor> {
    let candle_core::Device::Cuda(dev) = x.device() else {
        candle_core::bail!("delta_linear_overlapped: x is not on CUDA. This is a bug.")
    };
    crate::ops::check_tenant_args("delta_linear", x, row_slot, deltas)?;
    let op = SideDelta {
        row_slot,
        deltas,
        scratch: std::sync::Mutex::new(Scratch::default()),
    };
    let delta = x.apply_op1_no_bwd(&op);
    // The base product is issued after the side stream's work, so that it runs beside it; the
    // join comes first whatever happened, so that no side work outlives this call.
    let base = delta
        .as_ref()
        .ok()
        .map(|_| w_base.t().and_then(|wt| x.matmul(&wt)));
    side_join(dev)?;
    drop(op); // the scratch, now that the side stream is done with it
    base.expect("present when delta is Ok. This is a bug.")?
        .add(&delta?)
}

/// The delta product of [`delta_linear_overlapped`], launched on the side stream; its scratch is
/// kept here until the caller has joined.
struct SideDelta<'a> {
    row_slot: &'a [Option<u32>],
    deltas: &'a [&'a SignDelta],
    scratch: std::sync::Mutex<Scratch>,
}

impl CustomOp1 for SideDelta<'_> {
    fn name(&self) -> &'static str {
        "delta_linear_side"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("delta_linear_side: CUDA only. This is a bug.")
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        if storage.dtype() != DType::BF16 {
            candle_core::bail!("delta_linear_side: bf16 x only. This is a bug.")
        }
        let (y, shape, scratch) = tenant_delta_fwd(
            storage,
            layout,
            self.row_slot,
            self.deltas,
            Bf16Path::TensorCore,
            None,
            On::Side,
        )?;
        let mut kept = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        kept.0.extend(scratch.0);
        Ok((y, shape))
    }
}

/// `cuda_fwd` of [`crate::sign_matmul_n`]: `g (.., N) · S`.
pub(crate) fn sign_matmul_n_fwd(
    storage: &CudaStorage,
    layout: &Layout,
    signs: &SignBits,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = storage.device();
    let (n, k) = (signs.n(), signs.k());
    let m = layout.shape().elem_count() / n.max(1);
    let words = DeviceWords::new(signs, dev, "sign_matmul_n")?;
    let address = words.address(dev)?;
    let (copy, start) = contiguous(storage, layout)?;
    let g = copy.as_ref().unwrap_or(storage);
    let y = dispatch!(
        storage.dtype(),
        dev,
        backward(dev, g, start, m, n, k, address)
    );
    drop(words);
    Ok((y, with_last_dim(layout, k)))
}

fn backward<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    g_storage: &CudaStorage,
    g_start: usize,
    m: usize,
    n: usize,
    k: usize,
    words: u64,
) -> candle_core::Result<CudaSlice<T>> {
    let g_all = g_storage.as_cuda_slice::<T>()?;
    let g = g_all.slice(g_start..g_start + m * n);
    // SAFETY: the kernel writes all m * k outputs (blocks cover every row and column).
    let mut out = unsafe { dev.alloc::<T>(m * k) }?;
    if m == 0 {
        return Ok(out);
    }
    let name = format!("ds_bwd_simple_{}", dtype_suffix(g_storage.dtype())?);
    let f = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    let (m_i, n_i, k_i) = (to_i32(m, "M")?, to_i32(n, "N")?, to_i32(k, "K")?);
    let w_i = to_i32(words_per_row(k), "ceil(K/32)")?;
    let mut b = f.builder();
    b.arg(&g)
        .arg(&mut out)
        .arg(&words)
        .arg(&m_i)
        .arg(&n_i)
        .arg(&k_i)
        .arg(&w_i);
    let cfg = LaunchConfig {
        grid_dim: (to_u32(k.div_ceil(64))?, to_u32(m.div_ceil(32))?, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: arguments match `ds_bwd_simple_*`; words holds [n, ceil(k/32)] u32.
    unsafe { b.launch(cfg) }.w()?;
    Ok(out)
}

/// [`crate::sign_matmul_t`] with a chosen bf16 kernel, forward only (tests and benchmarks compare
/// the two CUDA paths with it). Inputs on the CPU take the CPU kernels.
pub fn sign_matmul_t_with(
    x: &Tensor,
    signs: &SignBits,
    path: Bf16Path,
) -> candle_core::Result<Tensor> {
    if !x.device().is_cuda() {
        return crate::sign_matmul_t(x, signs);
    }
    let got = x.dims().last().copied().unwrap_or(0);
    if x.rank() == 0 || got != signs.k() {
        return Err(KernelError::InputLength {
            op: "sign_matmul_t",
            what: "last dim",
            expected: signs.k(),
            got,
        }
        .into());
    }
    x.apply_op1_no_bwd(&SignMatmulTWith { signs, path })
}

/// [`crate::tenant_delta_matmul`] with a chosen bf16 kernel. Inputs on the CPU take the CPU
/// kernels.
pub fn tenant_delta_matmul_with(
    x: &Tensor,
    row_slot: &[Option<u32>],
    deltas: &[&SignDelta],
    path: Bf16Path,
) -> candle_core::Result<Tensor> {
    if !x.device().is_cuda() || path == Bf16Path::TensorCore {
        return crate::tenant_delta_matmul(x, row_slot, deltas);
    }
    crate::ops::check_tenant_args("tenant_delta_matmul", x, row_slot, deltas)?;
    x.apply_op1_no_bwd(&TenantDeltaMatmulWith {
        row_slot,
        deltas,
        path,
    })
}

/// [`crate::tenant_delta_matmul_add`] with a chosen tensor-core kernel ([`Bf16Path::Simple`] and
/// inputs that are not bf16 on CUDA take the unfused `base + delta`).
pub fn tenant_delta_matmul_add_with(
    base: &Tensor,
    x: &Tensor,
    row_slot: &[Option<u32>],
    deltas: &[&SignDelta],
    path: Bf16Path,
) -> candle_core::Result<Tensor> {
    if path == Bf16Path::Simple || !x.device().is_cuda() || x.dtype() != DType::BF16 {
        return base.add(&tenant_delta_matmul_with(x, row_slot, deltas, path)?);
    }
    crate::ops::tenant_delta_matmul_add_path(base, x, row_slot, deltas, path)
}

struct SignMatmulTWith<'a> {
    signs: &'a SignBits,
    path: Bf16Path,
}

impl CustomOp1 for SignMatmulTWith<'_> {
    fn name(&self) -> &'static str {
        "sign_matmul_t_with"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!(
            "sign_matmul_t_with: CPU inputs take crate::sign_matmul_t. This is a bug."
        )
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        sign_matmul_t_fwd(storage, layout, self.signs, self.path)
    }
}

struct TenantDeltaMatmulWith<'a> {
    row_slot: &'a [Option<u32>],
    deltas: &'a [&'a SignDelta],
    path: Bf16Path,
}

impl CustomOp1 for TenantDeltaMatmulWith<'_> {
    fn name(&self) -> &'static str {
        "tenant_delta_matmul_with"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!(
            "tenant_delta_matmul_with: CPU inputs take crate::tenant_delta_matmul. This is a bug."
        )
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        tenant_delta_matmul_fwd(storage, layout, self.row_slot, self.deltas, self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_table_matches_the_cuda_struct_size() {
        // 32*8 + 32*4 + 33*4 + 512*2 + 4 + 4 = 1548, padded to 8.
        assert_eq!(std::mem::size_of::<GroupTable>(), 1552);
    }

    #[test]
    fn tables_split_groups_of_more_than_32_rows() {
        let groups = [
            Group {
                words: 16,
                scale: 1.0,
                rows: (0..70).collect(),
            },
            Group {
                words: 0,
                scale: 0.0,
                rows: vec![70, 71],
            },
        ];
        let tables = group_tables(&groups).unwrap();
        assert_eq!(tables.len(), 1);
        let t = &tables[0];
        assert_eq!(t.n_groups, 4);
        assert_eq!(&t.row_begin[..5], &[0, 32, 64, 70, 72]);
        assert_eq!(t.max_group_rows(), 32);
        assert_eq!(t.words[3], 0);
        let ids = identity_tables(2000, 16, 1.0).unwrap();
        assert_eq!(ids.len(), 2);
        assert_eq!(ids[0].row_begin[32], 1024);
        assert_eq!(ids[1].row_begin[0], 1024);
        assert_eq!(ids[1].row_begin[ids[1].n_groups as usize], 2000);
    }

    #[test]
    fn tables_respect_the_row_budget() {
        let groups: Vec<Group> = (0..20)
            .map(|g| Group {
                words: 16,
                scale: 1.0,
                rows: (g * 32..g * 32 + 32).collect(),
            })
            .collect();
        let tables = group_tables(&groups).unwrap();
        assert_eq!(tables.len(), 2);
        assert_eq!(tables[0].n_groups, 16);
        assert_eq!(tables[0].row_begin[16], 512);
        assert_eq!(tables[1].n_groups, 4);
    }
}
