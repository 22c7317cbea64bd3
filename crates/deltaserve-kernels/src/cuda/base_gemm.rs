//! The base product `x · W_baseᵀ` of the overlapped decode step ([`super::delta_linear_overlapped`])
//! through cuBLASLt, so that the algorithm (and the stream it runs on) can be chosen for running
//! beside the delta product rather than alone.
//!
//! EXPERIMENT (engineer K10): `DS_K10_BASE` picks the variant; unset, candle's matmul runs as before.
//! `lt` (cuBLASLt on candle's stream, after the delta is issued) or `first` (cuBLASLt on a base
//! stream, issued before the delta), then `:`-separated options: `a<I>` the I-th heuristic result,
//! `sm<N>` `CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET`, `ws<MiB>` the workspace limit, `tr` the
//! transposed call `(W · xᵀ)ᵀ` with a row-major result. `DS_K10_LIST=1` prints every heuristic.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::cuda_backend::cudarc::cublaslt::sys as lt;
use candle_core::cuda_backend::cudarc::driver::{result, sys};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{CustomOp2, DType, Layout, Shape, Tensor};
use half::bf16;

/// The experiment's variant, read once from `DS_K10_BASE`.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Variant {
    /// cuBLASLt instead of candle's matmul.
    pub lt: bool,
    /// Issue the base product on the base stream before the delta product.
    pub first: bool,
    /// Index into the heuristic results.
    pub algo: usize,
    /// `CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET` (0: unset).
    pub sm: i32,
    /// Workspace limit in bytes.
    pub ws: usize,
    /// `(W · xᵀ)ᵀ`: A = x, B = W, D row-major.
    pub tr: bool,
    /// Warps per block of the fused kernel run with no delta (`ds_fused_bf16_r*_1s*`; 0: cuBLASLt).
    pub fz: usize,
    /// Its ring slots per warp (2 or 3).
    pub stages: usize,
}

const WORKSPACE_BYTES: usize = 32 << 20;

pub(crate) fn variant() -> &'static Variant {
    static V: std::sync::OnceLock<Variant> = std::sync::OnceLock::new();
    V.get_or_init(|| {
        let spec = std::env::var("DS_K10_BASE").unwrap_or_default();
        let mut v = Variant {
            ws: WORKSPACE_BYTES,
            stages: 3,
            ..Variant::default()
        };
        for (i, tok) in spec.split(':').filter(|t| !t.is_empty()).enumerate() {
            match tok {
                "lt" if i == 0 => v.lt = true,
                "first" if i == 0 => {
                    v.lt = true;
                    v.first = true
                }
                "tr" => v.tr = true,
                t if t.starts_with("fz") => {
                    v.lt = true;
                    v.fz = t[2..].parse().unwrap_or(4)
                }
                "s2" => v.stages = 2,
                "s3" => v.stages = 3,
                t if t.starts_with("sm") => v.sm = t[2..].parse().unwrap_or(0),
                t if t.starts_with("ws") => v.ws = t[2..].parse::<usize>().unwrap_or(32) << 20,
                t if t.starts_with('a') => v.algo = t[1..].parse().unwrap_or(0),
                t => eprintln!("DS_K10_BASE: ignoring {t:?}"),
            }
        }
        if !spec.is_empty() {
            eprintln!("DS_K10_BASE={spec}: {v:?}");
        }
        v
    })
}

fn check(status: lt::cublasStatus_t, what: &str) -> candle_core::Result<()> {
    if status == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        candle_core::bail!("cuBLASLt {what}: {status:?}")
    }
}

/// Descriptors and the chosen algorithm of one `(m, n, k)`.
struct Plan {
    desc: lt::cublasLtMatmulDesc_t,
    a: lt::cublasLtMatrixLayout_t,
    b: lt::cublasLtMatrixLayout_t,
    d: lt::cublasLtMatrixLayout_t,
    algo: lt::cublasLtMatmulAlgo_t,
    workspace: usize,
}

/// cuBLASLt state of one stream: the handle, a workspace only this stream uses (so that two
/// streams never share a split-K scratch), and the plans.
struct Lt {
    stream: usize,
    handle: lt::cublasLtHandle_t,
    workspace: sys::CUdeviceptr,
    plans: HashMap<(usize, usize, usize), Plan>,
}

// SAFETY: library handles, only used under the `LTS` lock.
unsafe impl Send for Lt {}

static LTS: Mutex<Vec<Lt>> = Mutex::new(Vec::new());

fn algo_attr(
    algo: &lt::cublasLtMatmulAlgo_t,
    attr: lt::cublasLtMatmulAlgoConfigAttributes_t,
) -> i64 {
    let mut v = 0i64;
    let mut written = 0usize;
    // SAFETY: `v` holds 8 bytes; the attributes are 4- or 8-byte integers (little endian).
    unsafe {
        lt::cublasLtMatmulAlgoConfigGetAttribute(
            algo,
            attr,
            &mut v as *mut i64 as *mut c_void,
            8,
            &mut written,
        );
    }
    if written == 4 {
        v & 0xffff_ffff
    } else {
        v
    }
}

fn describe(r: &lt::cublasLtMatmulHeuristicResult_t) -> String {
    use lt::cublasLtMatmulAlgoConfigAttributes_t as A;
    format!(
        "id {} tile {} stages {} splitK {} reduction {} swizzle {} inner {} cluster {} ws {} waves {:.2}",
        algo_attr(&r.algo, A::CUBLASLT_ALGO_CONFIG_ID),
        algo_attr(&r.algo, A::CUBLASLT_ALGO_CONFIG_TILE_ID),
        algo_attr(&r.algo, A::CUBLASLT_ALGO_CONFIG_STAGES_ID),
        algo_attr(&r.algo, A::CUBLASLT_ALGO_CONFIG_SPLITK_NUM),
        algo_attr(&r.algo, A::CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME),
        algo_attr(&r.algo, A::CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING),
        algo_attr(&r.algo, A::CUBLASLT_ALGO_CONFIG_INNER_SHAPE_ID),
        algo_attr(&r.algo, A::CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID),
        r.workspaceSize,
        r.wavesCount
    )
}

fn layout(
    rows: usize,
    cols: usize,
    ld: usize,
    row_major: bool,
) -> candle_core::Result<lt::cublasLtMatrixLayout_t> {
    let mut l = std::ptr::null_mut();
    // SAFETY: plain descriptor calls.
    unsafe {
        check(
            lt::cublasLtMatrixLayoutCreate(
                &mut l,
                lt::cudaDataType_t::CUDA_R_16BF,
                rows as u64,
                cols as u64,
                ld as i64,
            ),
            "layout",
        )?;
        if row_major {
            let order = lt::cublasLtOrder_t::CUBLASLT_ORDER_ROW as i32;
            check(
                lt::cublasLtMatrixLayoutSetAttribute(
                    l,
                    lt::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_ORDER,
                    &order as *const i32 as *const c_void,
                    4,
                ),
                "layout order",
            )?;
        }
    }
    Ok(l)
}

fn plan(
    handle: lt::cublasLtHandle_t,
    m: usize,
    n: usize,
    k: usize,
    v: &Variant,
) -> candle_core::Result<Plan> {
    // Column-major view: y (m, n) row-major is yᵀ (n x m) column-major = Wᵀ(op T on W's k x n) · xᵀ (k x m).
    // With `tr`: A = x (k x m, op T), B = W (k x n, op N), D = y as m x n row-major.
    let (op_a, op_b) = (1i32, 0i32);
    let (a, b, d) = if v.tr {
        (
            layout(k, m, k, false)?,
            layout(k, n, k, false)?,
            layout(m, n, n, true)?,
        )
    } else {
        (
            layout(k, n, k, false)?,
            layout(k, m, k, false)?,
            layout(n, m, n, false)?,
        )
    };
    let mut desc = std::ptr::null_mut();
    let mut pref = std::ptr::null_mut();
    const N: usize = 32;
    // SAFETY: plain descriptor calls; `results` holds N entries.
    let (results, count) = unsafe {
        check(
            lt::cublasLtMatmulDescCreate(
                &mut desc,
                lt::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                lt::cudaDataType_t::CUDA_R_32F,
            ),
            "desc",
        )?;
        use lt::cublasLtMatmulDescAttributes_t as D;
        for (attr, val) in [
            (D::CUBLASLT_MATMUL_DESC_TRANSA, op_a),
            (D::CUBLASLT_MATMUL_DESC_TRANSB, op_b),
        ] {
            check(
                lt::cublasLtMatmulDescSetAttribute(
                    desc,
                    attr,
                    &val as *const i32 as *const c_void,
                    4,
                ),
                "desc trans",
            )?;
        }
        if v.sm > 0 {
            check(
                lt::cublasLtMatmulDescSetAttribute(
                    desc,
                    D::CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET,
                    &v.sm as *const i32 as *const c_void,
                    4,
                ),
                "desc sm count",
            )?;
        }
        check(lt::cublasLtMatmulPreferenceCreate(&mut pref), "pref")?;
        let ws = v.ws as u64;
        check(
            lt::cublasLtMatmulPreferenceSetAttribute(
                pref,
                lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const c_void,
                8,
            ),
            "pref workspace",
        )?;
        let mut results: [lt::cublasLtMatmulHeuristicResult_t; N] = std::mem::zeroed();
        let mut count = 0i32;
        check(
            lt::cublasLtMatmulAlgoGetHeuristic(
                handle,
                desc,
                a,
                b,
                d,
                d,
                pref,
                N as i32,
                results.as_mut_ptr(),
                &mut count,
            ),
            "heuristic",
        )?;
        lt::cublasLtMatmulPreferenceDestroy(pref);
        (results, count.max(0) as usize)
    };
    if count == 0 {
        candle_core::bail!("cuBLASLt: no algorithm for m {m} n {n} k {k} ({v:?})")
    }
    let pick = v.algo.min(count - 1);
    if std::env::var_os("DS_K10_LIST").is_some() || v.lt {
        eprintln!("cuBLASLt m {m} n {n} k {k} {v:?}: {count} algorithms, using #{pick}");
        for (i, r) in results[..count].iter().enumerate() {
            if std::env::var_os("DS_K10_LIST").is_some() || i == pick {
                eprintln!("  #{i}: {}", describe(r));
            }
        }
    }
    Ok(Plan {
        desc,
        a,
        b,
        d,
        algo: results[pick].algo,
        workspace: results[pick].workspaceSize,
    })
}

/// `y = x · wᵀ` (bf16, contiguous) on `stream` through cuBLASLt.
fn matmul_on(
    dev: &CudaDevice,
    stream: sys::CUstream,
    x: u64,
    w: u64,
    y: u64,
    (m, n, k): (usize, usize, usize),
) -> candle_core::Result<()> {
    let v = variant();
    if v.fz > 0
        && k.is_multiple_of(8)
        && super::words_per_row(k).is_multiple_of(4)
        && m <= super::GROUP_ROWS
        && x % 16 == 0
        && w % 16 == 0
    {
        return fused_base(dev, stream, x, w, y, (m, n, k), v);
    }
    let mut lts = LTS.lock().unwrap_or_else(|e| e.into_inner());
    let key = stream as usize;
    let i = match lts.iter().position(|l| l.stream == key) {
        Some(i) => i,
        None => {
            dev.cuda_stream().context().bind_to_thread().w()?;
            let mut handle = std::ptr::null_mut();
            // SAFETY: plain library calls; the workspace lives for the process, like the stream.
            let workspace = unsafe {
                check(lt::cublasLtCreate(&mut handle), "create")?;
                result::malloc_sync(WORKSPACE_BYTES.max(v.ws).max(1)).w()?
            };
            lts.push(Lt {
                stream: key,
                handle,
                workspace,
                plans: HashMap::new(),
            });
            lts.len() - 1
        }
    };
    let l = &mut lts[i];
    if !l.plans.contains_key(&(m, n, k)) {
        let p = plan(l.handle, m, n, k, v)?;
        l.plans.insert((m, n, k), p);
    }
    let p = &l.plans[&(m, n, k)];
    let (alpha, beta) = (1f32, 0f32);
    let (pa, pb) = if v.tr { (x, w) } else { (w, x) };
    // SAFETY: the pointers address m·k, n·k and m·n bf16 values that live until the stream has
    // run this call (the caller's tensors); the workspace is this stream's alone.
    unsafe {
        check(
            lt::cublasLtMatmul(
                l.handle,
                p.desc,
                &alpha as *const f32 as *const c_void,
                pa as *const c_void,
                p.a,
                pb as *const c_void,
                p.b,
                &beta as *const f32 as *const c_void,
                y as *const c_void,
                p.d,
                y as *mut c_void,
                p.d,
                &p.algo,
                l.workspace as *mut c_void,
                p.workspace,
                stream as lt::cudaStream_t,
            ),
            "matmul",
        )
    }
}

/// EXPERIMENT: the base product on the fused decode kernel with no delta (one identity group with
/// null words, so `W_base + 0` is W itself), `v.fz` warps per block, `v.stages` ring slots each.
fn fused_base(
    dev: &CudaDevice,
    stream: sys::CUstream,
    x: u64,
    w: u64,
    y: u64,
    (m, n, k): (usize, usize, usize),
    v: &Variant,
) -> candle_core::Result<()> {
    let rt = m.div_ceil(8).max(1);
    let name = format!("ds_fused_bf16_r{rt}_1s{}", v.stages);
    let f = dev.get_or_load_custom_func(&name, super::MODULE, super::PTX)?;
    super::opt_in_smem(dev, &f, &name, 227 * 1024)?;
    let table = super::identity_tables(m, 0, 0.0)?[0];
    // One ring slot of 64 columns (`KS` = 2): W 32 rows, x 8 rt rows, bits of one group.
    let slot_bytes = 16 * (128 * 2 + rt * 32 * 2 + 2 * 16);
    let smem = v.fz * v.stages * slot_bytes;
    let (mi, ni, ki) = (m as i32, n as i32, k as i32);
    let wi = super::words_per_row(k) as i32;
    let mut args = super::Args::default();
    args.arg(&table)
        .arg(&x)
        .arg(&w)
        .arg(&y)
        .arg(&mi)
        .arg(&ni)
        .arg(&ki)
        .arg(&wi);
    let f = f.into_cuda_function();
    dev.cuda_stream().context().bind_to_thread().w()?;
    // SAFETY: the arguments match `ds_fused_bf16_r*_1s*`; x (m, k), w (n, k), y (m, n), 16-byte
    // aligned, K as `fused_ok` admits; null words: no bits are read.
    unsafe {
        result::launch_kernel(
            f.cu_function(),
            (n.div_ceil(32) as u32, 1, 1),
            ((32 * v.fz) as u32, 1, 1),
            smem as u32,
            stream,
            &mut args.0,
        )
    }
    .w()
}

/// The base product as a candle op on a chosen stream.
struct BaseGemm {
    stream: Option<sys::CUstream>,
}

impl CustomOp2 for BaseGemm {
    fn name(&self) -> &'static str {
        "base_gemm"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("base_gemm: CUDA only. This is a bug.")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = x.device();
        let (m, k) = xl.shape().dims2()?;
        let (n, k2) = wl.shape().dims2()?;
        if k != k2 || x.dtype() != DType::BF16 || w.dtype() != DType::BF16 {
            candle_core::bail!(
                "base_gemm: x {:?}, w {:?}. This is a bug.",
                xl.shape(),
                wl.shape()
            )
        }
        let (Some((xs, _)), Some((ws, _))) = (xl.contiguous_offsets(), wl.contiguous_offsets())
        else {
            candle_core::bail!("base_gemm: strided inputs. This is a bug.")
        };
        let xp = super::slice_ptr(x.as_cuda_slice::<bf16>()?, dev) + 2 * xs as u64;
        let wp = super::slice_ptr(w.as_cuda_slice::<bf16>()?, dev) + 2 * ws as u64;
        // SAFETY: cuBLASLt writes all m·n outputs.
        let y = unsafe { dev.alloc::<bf16>(m * n) }?;
        let yp = super::slice_ptr(&y, dev);
        if m > 0 && n > 0 {
            let stream = match self.stream {
                Some(s) => s,
                None => dev.cuda_stream().cu_stream(),
            };
            matmul_on(dev, stream, xp, wp, yp, (m, n, k))?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(y, dev.clone()),
            Shape::from((m, n)),
        ))
    }
}

/// `x · w_baseᵀ` as the overlapped step computes its base product (bf16 `x (m, k)` and
/// `w_base (n, k)`), on candle's stream.
pub fn base_product(x: &Tensor, w_base: &Tensor) -> candle_core::Result<Tensor> {
    if variant().lt && x.is_contiguous() && w_base.is_contiguous() {
        x.apply_op2_no_bwd(w_base, &BaseGemm { stream: None })
    } else {
        x.matmul(&w_base.t()?)
    }
}

/// The base stream of a device (created on first use, kept for the process) with its fork and
/// join events.
struct BaseStream {
    device: String,
    stream: sys::CUstream,
    fork: sys::CUevent,
    join: sys::CUevent,
}

// SAFETY: driver handles, only used under the `BASES` lock.
unsafe impl Send for BaseStream {}

static BASES: Mutex<Vec<BaseStream>> = Mutex::new(Vec::new());

/// The base product on the device's base stream, forked from candle's stream now (so it is
/// issued before whatever candle's stream and the side stream get next); the caller calls
/// [`base_join`] before reading the result.
pub(crate) fn base_product_first(x: &Tensor, w_base: &Tensor) -> candle_core::Result<Tensor> {
    let candle_core::Device::Cuda(dev) = x.device() else {
        candle_core::bail!("base_product_first: x is not on CUDA. This is a bug.")
    };
    let key = format!("{:?}", dev.location());
    let main = dev.cuda_stream();
    main.context().bind_to_thread().w()?;
    let stream = {
        let mut bases = BASES.lock().unwrap_or_else(|e| e.into_inner());
        let b = match bases.iter().position(|s| s.device == key) {
            Some(i) => &bases[i],
            None => {
                let flags = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING;
                bases.push(BaseStream {
                    device: key,
                    stream: result::stream::create(result::stream::StreamKind::NonBlocking).w()?,
                    fork: result::event::create(flags).w()?,
                    join: result::event::create(flags).w()?,
                });
                bases.last().expect("just pushed. This is a bug.")
            }
        };
        b.stream
    };
    // The output is allocated on candle's stream before the fork, so the base stream sees it.
    let y = x.apply_op2_no_bwd(w_base, &ForkedGemm { stream })?;
    Ok(y)
}

/// Like [`BaseGemm`], but allocates on candle's stream, then forks the base stream.
struct ForkedGemm {
    stream: sys::CUstream,
}

impl CustomOp2 for ForkedGemm {
    fn name(&self) -> &'static str {
        "base_gemm_first"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("base_gemm_first: CUDA only. This is a bug.")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = x.device();
        let (m, k) = xl.shape().dims2()?;
        let (n, _) = wl.shape().dims2()?;
        let (Some((xs, _)), Some((ws, _))) = (xl.contiguous_offsets(), wl.contiguous_offsets())
        else {
            candle_core::bail!("base_gemm_first: strided inputs. This is a bug.")
        };
        let xp = super::slice_ptr(x.as_cuda_slice::<bf16>()?, dev) + 2 * xs as u64;
        let wp = super::slice_ptr(w.as_cuda_slice::<bf16>()?, dev) + 2 * ws as u64;
        // SAFETY: cuBLASLt writes all m·n outputs.
        let y = unsafe { dev.alloc::<bf16>(m * n) }?;
        let yp = super::slice_ptr(&y, dev);
        let key = format!("{:?}", dev.location());
        {
            let bases = BASES.lock().unwrap_or_else(|e| e.into_inner());
            let b = bases
                .iter()
                .find(|s| s.device == key)
                .expect("created. This is a bug.");
            // SAFETY: live handles of this device's context.
            unsafe {
                result::event::record(b.fork, dev.cuda_stream().cu_stream()).w()?;
                result::stream::wait_event(
                    b.stream,
                    b.fork,
                    sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                )
                .w()?;
            }
        }
        if m > 0 && n > 0 {
            matmul_on(dev, self.stream, xp, wp, yp, (m, n, k))?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(y, dev.clone()),
            Shape::from((m, n)),
        ))
    }
}

/// Makes candle's stream wait for the base stream.
pub(crate) fn base_join(dev: &CudaDevice) -> candle_core::Result<()> {
    let key = format!("{:?}", dev.location());
    let main = dev.cuda_stream();
    main.context().bind_to_thread().w()?;
    let bases = BASES.lock().unwrap_or_else(|e| e.into_inner());
    let Some(b) = bases.iter().find(|s| s.device == key) else {
        return Ok(());
    };
    // SAFETY: live handles of this device's context.
    unsafe {
        result::event::record(b.join, b.stream).w()?;
        result::stream::wait_event(
            main.cu_stream(),
            b.join,
            sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
        )
        .w()?;
    }
    Ok(())
}
