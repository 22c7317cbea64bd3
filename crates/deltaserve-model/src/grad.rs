//! Ops for the differentiable forward whose backward does less than candle's.
//!
//! candle's `matmul` backward computes the gradient of both operands whatever they are
//! (candle-core 0.11.1 backprop.rs, `Op::Matmul`): under calibration every frozen base weight
//! would get a weight-sized gradient per step that is computed, stored in the `GradStore` and
//! never used (a third more work in the backward pass, and for a 7B model another copy of the
//! model in memory). [`matmul_t`] routes `x · wᵀ` with a frozen `w` through a custom op whose
//! backward gives `x` its gradient and `w` none.

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
