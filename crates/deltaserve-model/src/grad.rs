//! Ops for the differentiable forward whose backward does less than candle's.
//!
//! candle's `matmul` backward computes the gradient of both operands whatever they are
//! (candle-core 0.11.1 backprop.rs, `Op::Matmul`): under calibration every frozen base weight
//! would get a weight-sized gradient per step that is computed, stored in the `GradStore` and
//! never used (a third more work in the backward pass, and for a 7B model another copy of the
//! model in memory). [`matmul_t`] routes `x · wᵀ` with a frozen `w` through a custom op whose
//! backward gives `x` its gradient and `w` none.
//!
//! candle's fused `softmax_last_dim` and `rope` have no backward pass (ANCHORS.md §0.1), and
//! their differentiable compositions cost five to eight kernels each and keep every
//! intermediate for the backward pass. [`softmax_last_dim`] and [`rope`] run the fused kernel
//! and attach the backward pass written out ([`with_backward`]), so the training path keeps
//! the speed of the serving path and a gradient.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, Layout, Shape, Tensor};

/// `x · wᵀ` for `x (M, K)`, `w (N, K)`. Where `x` carries a gradient and `w` does not, only
/// `x` receives one; otherwise this is `x.matmul(&w.t()?)`. The forward is the same product
/// either way.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if x.track_op() && !w.track_op() && x.rank() == 2 && w.rank() == 2 {
        x.apply_op2(w, FrozenMatmulT)
    } else {
        x.matmul(&w.t()?)
    }
}

/// `y`, computed from `x` by an op without a backward pass, with the backward pass
/// `bwd(y, ∂L/∂y) = ∂L/∂x` attached: the result has `y`'s values (one copy) and passes its
/// gradient to `x`. Without a graph on `x` this is `y` itself.
pub fn with_backward(
    x: &Tensor,
    y: Tensor,
    bwd: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor> + Send + Sync + 'static,
) -> candle_core::Result<Tensor> {
    if !x.track_op() {
        return Ok(y);
    }
    x.apply_op2(&y, AttachedBackward(Box::new(bwd)))
}

type Backward = Box<dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor> + Send + Sync>;

/// The op of [`with_backward`]: forward copies its second operand, backward calls the closure.
struct AttachedBackward(Backward);

/// Checks that `y` starts its storage and is contiguous. `y` must be a fused op's fresh result,
/// which owns its storage, so that a storage clone is exactly `y`.
fn whole(l: &Layout) -> candle_core::Result<()> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("with_backward: the fused result must be a fresh contiguous tensor");
    }
    Ok(())
}

impl CustomOp2 for AttachedBackward {
    fn name(&self) -> &'static str {
        "fused_with_backward"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        y: &CpuStorage,
        l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        whole(l)?;
        Ok((y.try_clone(l)?, l.shape().clone()))
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        y: &CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        whole(l)?;
        Ok((y.try_clone(l)?, l.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some((self.0)(&res.detach(), grad)?), None))
    }
}

/// Softmax over the last dimension: candle's fused kernel, and the backward pass
/// `∂L/∂x = y ⊙ (g − Σ_j g_j y_j)` (the softmax Jacobian `diag(y) − y yᵀ` applied to `g`).
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    let y = candle_nn::ops::softmax_last_dim(&x.contiguous()?.detach())?;
    with_backward(x, y, |y, g| {
        let dot = (g * y)?.sum_keepdim(candle_core::D::Minus1)?;
        y * g.broadcast_sub(&dot)?
    })
}

/// Rotary embedding of `x (b, h, t, d)` in the half-split layout with tables `cos`, `sin`
/// `(t, d/2)`: candle's fused kernel, and the backward pass, the inverse rotation (`sin`
/// negated: each pair is rotated by `R(θ)`, whose transpose is `R(−θ)`).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
    let y = candle_nn::rotary_emb::rope(&x.contiguous()?.detach(), &cos, &sin)?;
    let neg_sin = sin.neg()?;
    with_backward(x, y, move |_, g| {
        candle_nn::rotary_emb::rope(&g.contiguous()?, &cos, &neg_sin)
    })
}

/// `x · wᵀ` with no gradient for `w`; see [`matmul_t`].
struct FrozenMatmulT;

/// (1, M, N, K) and the transposed layout of `w`, as `x.matmul(&w.t())` passes them to the backend.
fn dims(l1: &Layout, l2: &Layout) -> candle_core::Result<((usize, usize, usize, usize), Layout)> {
    let (m, k) = l1.shape().dims2()?;
    let (n, k2) = l2.shape().dims2()?;
    if k != k2 {
        candle_core::bail!("matmul_t: x is [{m}, {k}] but w is [{n}, {k2}]");
    }
    Ok(((1, m, n, k), l2.transpose(0, 1)?))
}

impl CustomOp2 for FrozenMatmulT {
    fn name(&self) -> &'static str {
        "frozen_matmul_t"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (bmnk, l2t) = dims(l1, l2)?;
        Ok((
            s1.matmul(s2, bmnk, l1, &l2t)?,
            Shape::from((bmnk.1, bmnk.2)),
        ))
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (bmnk, l2t) = dims(l1, l2)?;
        Ok((
            s1.matmul(s2, bmnk, l1, &l2t)?,
            Shape::from((bmnk.1, bmnk.2)),
        ))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(w)?), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(candle_core::DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// Values and input gradients of `fused` and `plain` on the same f64 input, against a random
    /// upstream gradient `r` (through the surrogate `Σ f(x) ⊙ r`).
    fn compare(
        shape: &[usize],
        fused: impl Fn(&Tensor) -> Tensor,
        plain: impl Fn(&Tensor) -> Tensor,
    ) -> (f64, f64) {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1., shape, &dev).unwrap()).unwrap();
        let r = Tensor::randn(0f64, 1., shape, &dev).unwrap();
        let (a, b) = (fused(x.as_tensor()), plain(x.as_tensor()));
        let ga = (&a * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&b * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let (ga, gb) = (
            ga.get(x.as_tensor()).unwrap(),
            gb.get(x.as_tensor()).unwrap(),
        );
        (max_abs(&a, &b), max_abs(ga, gb))
    }

    #[test]
    fn fused_softmax_and_rope_match_the_plain_ops_and_their_gradients() {
        // Plain softmax: exp(x − max) / Σ, every op with candle's own backward (f64, so only
        // rounding differs: 1e-14 on values of order 1).
        let (v, g) = compare(
            &[3, 5, 9],
            |x| softmax_last_dim(x).unwrap(),
            |x| candle_nn::ops::softmax(x, candle_core::D::Minus1).unwrap(),
        );
        assert!(
            v < 1e-14 && g < 1e-14,
            "softmax: values {v:e}, gradients {g:e}"
        );
        let cfg = crate::config::ModelConfig {
            arch: crate::config::Architecture::Llama,
            hidden_size: 16,
            intermediate_size: 32,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            num_key_value_heads: 2,
            head_dim: 8,
            vocab_size: 10,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_llama3: None,
            max_position_embeddings: 16,
            tie_word_embeddings: false,
            sliding_window: vec![None],
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            eos_token_ids: vec![],
        };
        let tables =
            crate::rope::RotaryTables::new(&cfg, candle_core::DType::F64, &Device::Cpu).unwrap();
        let (v, g) = compare(
            &[2, 6, 8],
            |x| tables.apply(x, 3, true).unwrap(),
            |x| tables.apply_plain(x, 3).unwrap(),
        );
        assert!(
            v < 1e-14 && g < 1e-14,
            "rope: values {v:e}, gradients {g:e}"
        );
        // Without a graph the fused result comes back as is.
        let x = Tensor::randn(0f64, 1., (2, 6, 8), &Device::Cpu).unwrap();
        assert!(!tables.apply(&x, 0, true).unwrap().track_op());
    }

    #[test]
    fn frozen_matmul_matches_matmul_and_its_x_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (5, 7), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1., (3, 7), &dev).unwrap();
        let r = Tensor::randn(0f32, 1., (5, 3), &dev).unwrap();
        let ours = matmul_t(x.as_tensor(), &w).unwrap();
        let plain = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        let diff = (&ours - &plain)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
        let g_ours = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g_plain = (plain * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gx =
            (g_ours.get(x.as_tensor()).unwrap() - g_plain.get(x.as_tensor()).unwrap()).unwrap();
        assert!(
            gx.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                < 1e-6
        );
        // candle's matmul keeps a gradient for `w.t()` as well (plus x's and the output's).
        let held = |g: &candle_core::backprop::GradStore| g.get_ids().count();
        assert_eq!(
            held(&g_plain),
            held(&g_ours) + 1,
            "a frozen weight gets no gradient"
        );
    }
}
