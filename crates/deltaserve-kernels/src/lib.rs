//! Matrix products with packed sign matrices, the core of serving BitDelta fine-tunes.
//!
//! A fine-tune ("tenant") is stored against the shared base model as, per linear layer,
//! `W_ft ≈ W_base + s · S` with `S ∈ {±1}^{N×K}` packed one bit per entry and one `f32` scale `s`
//! (BitDelta, arXiv 2402.10193, eq. 1). The layer then computes
//! `y = x · W_baseᵀ + s · (x · Sᵀ)`, and this crate computes the second term straight from the
//! bits, never expanding `S` to floats. It sits between the codecs (which produce the bits) and the
//! model (which calls these ops); it knows nothing of models, files or HTTP.
//!
//! # Layout
//! ```text
//! signs: (N, words_per_row) u32, words_per_row = ceil(K / 32), row-major
//! bit b (LSB = 0) of word w of row n  =  sign of S[n, 32*w + b]:  1 -> +1,  0 -> -1
//! padding bits (columns >= K) are ignored, whatever their value
//! ```
//!
//! # What is here
//! - [`reference`](mod@reference): the specification, plain loops in `f64`. Every fast path is
//!   tested against it (`tests/matches_reference.rs`).
//! - [`cpu`]: the fast CPU kernels on host slices, with AVX-512, AVX2+FMA and portable versions
//!   chosen at run time ([`cpu::SimdLevel`]), multi-threaded with rayon.
//! - [`ops`] (re-exported here): the kernels as candle ops. [`sign_matmul_t`] (`x · Sᵀ`, with a
//!   backward pass for training), [`sign_matmul_n`] (`g · S`, its gradient) and
//!   [`tenant_delta_matmul`] (many tenants in one batch, scales fused, forward only) and
//!   [`tenant_delta_matmul_add`] (the same plus the base product, added in the kernel's store),
//!   and [`delta_linear`] (a whole delta linear layer, `x · W_baseᵀ` included: one fused kernel
//!   at decode on CUDA).
//!
//! With the `cuda` feature, the `cuda` module gives each op a `cuda_fwd`: sm_90 kernels compiled
//! by `build.rs`, tensor cores for bf16 inputs, checked against the reference by `tests/cuda.rs`
//! on a GPU.
//!
//! # Example
//! ```
//! use candle_core::{Device, Tensor};
//! use deltaserve_kernels::{sign_matmul_t, tenant_delta_matmul, SignBits, SignDelta};
//!
//! # fn main() -> candle_core::Result<()> {
//! let dev = Device::Cpu;
//! // S = [[+1, -1, +1], [-1, -1, -1]]: row 0 has bits 0 and 2 set.
//! let signs = SignBits::from_words(vec![0b101, 0], 2, 3, &dev)?;
//! let x = Tensor::new(&[[1f32, 2., 3.]], &dev)?;
//! assert_eq!(sign_matmul_t(&x, &signs)?.to_vec2::<f32>()?, [[2., -6.]]);
//!
//! // Two rows of a batch: one uses the tenant in slot 0 (scale 0.5), one only the base model.
//! let delta = SignDelta::new(signs, 0.5);
//! let x2 = Tensor::new(&[[1f32, 2., 3.], [1., 1., 1.]], &dev)?;
//! let y = tenant_delta_matmul(&x2, &[Some(0), None], &[&delta])?;
//! assert_eq!(y.to_vec2::<f32>()?, [[1., -3.], [0., 0.]]);
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod error;
pub mod ops;
pub mod reference;
mod signs;

pub use error::KernelError;
pub use ops::{
    delta_linear, sign_matmul_n, sign_matmul_t, tenant_delta_matmul, tenant_delta_matmul_add,
};
pub use signs::{words_per_row, SignBits, SignDelta, SignLayout, SignsView};
