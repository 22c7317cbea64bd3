//! NF quantization (`nf`) against a float64 reference written here from the definitions
//! (QLoRA arXiv 2305.14314 §3, LQ-LoRA arXiv 2311.12023 §2) and against bitsandbytes' NF4 table.

use deltaserve_codecs::nf::{
    code_values, pack_bits, probit, unpack_bits, NfConfig, NfTensor, NF_OFFSET,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// bitsandbytes' NF4 table (`bitsandbytes/functional.py`, `get_4bit_type("nf4")`), FP32.
const BNB_NF4: [f64; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// Φ(x) by composite Simpson integration of the normal density from 0 to x (independent of
/// the erfc the library uses).
fn ref_cdf(x: f64) -> f64 {
    let n = 20_000;
    let h = x / n as f64;
    let f = |t: f64| (-t * t / 2.0).exp();
    let mut s = f(0.0) + f(x);
    for i in 1..n {
        s += f(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
    }
    0.5 + s * h / 3.0 / (2.0 * std::f64::consts::PI).sqrt()
}

/// Φ⁻¹ by bisection on [`ref_cdf`].
fn ref_probit(p: f64) -> f64 {
    let (mut lo, mut hi) = (-10.0, 10.0);
    for _ in 0..80 {
        let mid = (lo + hi) / 2.0;
        if ref_cdf(mid) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    (lo + hi) / 2.0
}

fn ref_codes(bits: u32) -> Vec<f64> {
    let half = 1usize << (bits - 1);
    let mut q: Vec<f64> = (0..half - 1)
        .map(|i| (1.0 - NF_OFFSET) + (0.5 - (1.0 - NF_OFFSET)) * i as f64 / (half - 1) as f64)
        .collect();
    q.extend((0..=half).map(|i| 0.5 + (NF_OFFSET - 0.5) * i as f64 / half as f64));
    let norm = ref_probit(NF_OFFSET);
    q.iter().map(|&p| ref_probit(p) / norm).collect()
}

#[test]
fn probit_matches_bisection() {
    for p in [1e-6, 0.01, 0.0322917, 0.2, 0.5, 0.77, 0.9677083, 0.999] {
        let (a, b) = (probit(p), ref_probit(p));
        // The reference loses digits to cancellation (0.5 + ∫) in the far tail; Acklam's
        // unrefined approximation alone would be off by ~1e-9 relative.
        let tol = if (0.01..=0.99).contains(&p) {
            1e-11
        } else {
            1e-9
        };
        assert!((a - b).abs() < tol, "probit({p}) = {a}, reference {b}");
    }
}

#[test]
fn nf4_is_bitsandbytes_table() {
    let v = code_values(4);
    assert_eq!(v.len(), 16);
    for (a, b) in v.iter().zip(BNB_NF4) {
        // bitsandbytes builds its quantiles with `torch.linspace` in FP32 and stores FP32
        // values, so it agrees with the exact definition to about two FP32 ulps.
        assert!((a - b).abs() < 2e-7, "{a} vs bitsandbytes {b}");
    }
}

#[test]
fn code_values_match_reference_for_2_3_4_bits() {
    for bits in [2, 3, 4] {
        let (v, r) = (code_values(bits), ref_codes(bits));
        assert_eq!(v.len(), 1 << bits);
        assert_eq!(v[0], -1.0);
        assert!((v[v.len() - 1] - 1.0).abs() < 1e-15);
        assert_eq!(v[(1 << (bits - 1)) - 1], 0.0, "exact zero");
        for (a, b) in v.iter().zip(&r) {
            assert!((a - b).abs() < 1e-10, "NF{bits}: {a} vs reference {b}");
        }
    }
    // NF2 by hand: quantiles {1-δ, ½, (½+δ)/2, δ} → {-1, 0, Φ⁻¹(0.73385)/Φ⁻¹(δ), 1}.
    let v = code_values(2);
    assert!((v[2] - ref_probit((0.5 + NF_OFFSET) / 2.0) / ref_probit(NF_OFFSET)).abs() < 1e-10);
}

/// The whole double-quantized scheme in f64, from the definitions.
struct RefQuant {
    codes: Vec<usize>,
    scale_codes: Vec<u32>,
    deq: Vec<f64>,
    bits: u64,
}

fn ref_quantize(w: &[f32], bits: u32, block: usize) -> RefQuant {
    let vals = ref_codes(bits);
    let absmax: Vec<f64> = w
        .chunks(block)
        .map(|b| b.iter().map(|x| (*x as f64).abs()).fold(0.0, f64::max))
        .collect();
    let m = absmax.iter().copied().fold(f64::INFINITY, f64::min);
    let groups: Vec<f64> = absmax
        .chunks(256)
        .map(|g| g.iter().map(|s| s - m).fold(0.0, f64::max))
        .collect();
    let scale_codes: Vec<u32> = absmax
        .iter()
        .enumerate()
        .map(|(j, s)| ((s - m) / groups[j / 256] * 255.0).round() as u32)
        .collect();
    let shat: Vec<f64> = scale_codes
        .iter()
        .enumerate()
        .map(|(j, &q)| q as f64 * groups[j / 256] / 255.0 + m)
        .collect();
    let mut codes = Vec::new();
    let mut deq = Vec::new();
    for (i, &x) in w.iter().enumerate() {
        let s = shat[i / block];
        let y = x as f64 / s;
        let k = (0..vals.len())
            .min_by(|&a, &b| (y - vals[a]).abs().total_cmp(&(y - vals[b]).abs()))
            .unwrap();
        codes.push(k);
        deq.push(vals[k] * s);
    }
    let n = w.len() as u64;
    let nb = absmax.len() as u64;
    RefQuant {
        codes,
        scale_codes,
        deq,
        bits: n * bits as u64 + nb * 8 + (nb.div_ceil(256)) * 32 + 32,
    }
}

#[test]
fn quantize_dequantize_match_f64_reference() {
    let mut rng = StdRng::seed_from_u64(4);
    // 3·(256·16)+37 weights: several scale groups and a ragged last block.
    let n = 3 * 256 * 16 + 37;
    let w: Vec<f32> = (0..n)
        .map(|i| {
            // Heavy-ish tails and block-to-block scale variation, like real weights.
            let s = 0.02 * (1.0 + (i / 16 % 7) as f32);
            let u: f32 = rng.gen_range(-1.0..1.0);
            s * u * u * u.signum() * 3.0
        })
        .collect();
    for bits in [2, 3, 4] {
        for block in [16, 64, 256] {
            let cfg = NfConfig::new(bits, block).unwrap();
            let t = NfTensor::quantize(&w, cfg);
            let r = ref_quantize(&w, bits, block);
            assert_eq!(t.storage_bits(), r.bits, "{cfg}: bit count");
            assert_eq!(cfg.storage_bits(n), r.bits, "{cfg}: config bit count");
            // Scale codes: identical except where f32 and f64 round a value within 1e-4 of .5
            // differently (none expected with this data).
            let sc_diff = t
                .scale_codes
                .iter()
                .zip(&r.scale_codes)
                .filter(|(a, b)| **a as u32 != **b)
                .count();
            assert_eq!(sc_diff, 0, "{cfg}: scale codes differ");
            let code_diff = t
                .codes
                .iter()
                .zip(&r.codes)
                .filter(|(a, b)| **a as usize != **b)
                .count();
            // A weight sitting within f32 rounding of a midpoint may go either way.
            assert!(code_diff <= 2, "{cfg}: {code_diff} codes differ");
            let deq = t.dequantize();
            let mut max_err = 0.0f64;
            for ((&c, &rc), (&y, &ry)) in t.codes.iter().zip(&r.codes).zip(deq.iter().zip(&r.deq)) {
                if c as usize == rc {
                    max_err = max_err.max((y as f64 - ry).abs());
                }
            }
            // f32 arithmetic on values ≤ 0.2: a few ulps.
            assert!(max_err < 1e-7, "{cfg}: dequantized differs by {max_err}");
        }
    }
}

#[test]
fn bits_per_param_and_errors() {
    let c = NfConfig::new(4, 64).unwrap();
    assert!((c.bits_per_param() - (4.0 + 8.0 / 64.0 + 32.0 / (256.0 * 64.0))).abs() < 1e-12);
    // 4096×4096, NF3/64: 3·2²⁴ + 2¹⁸·8 + 2¹⁰·32 + 32 bits.
    let c = NfConfig::new(3, 64).unwrap();
    assert_eq!(
        c.storage_bits(4096 * 4096),
        3 * (1 << 24) + (1 << 18) * 8 + (1 << 10) * 32 + 32
    );
    let e = NfConfig::new(5 - 4, 64).unwrap_err().to_string();
    assert!(e.contains("use 2 to 8"), "{e}");
    let e = NfConfig::new(4, 48).unwrap_err().to_string();
    assert!(e.contains("power of two"), "{e}");
    assert_eq!(NfConfig::lqlora_grid().len(), 20);
}

#[test]
fn more_bits_less_error_and_zero_is_exact() {
    let mut rng = StdRng::seed_from_u64(5);
    let w: Vec<f32> = (0..8192).map(|_| rng.gen_range(-0.1f32..0.1)).collect();
    let mut last = f64::INFINITY;
    for bits in [2, 3, 4, 8] {
        let t = NfTensor::quantize(&w, NfConfig::new(bits, 64).unwrap());
        let e = deltaserve_codecs::nf::sq_error(&w, &t.dequantize());
        assert!(e < last, "NF{bits} error {e} not below {last}");
        last = e;
    }
    let z = vec![0.0f32; 1000];
    let t = NfTensor::quantize(&z, NfConfig::new(3, 16).unwrap());
    assert!(t.dequantize().iter().all(|&x| x == 0.0));
}

#[test]
fn packing_round_trips() {
    // 2-bit codes 1, 2, 3, 0 → 0b00_11_10_01.
    assert_eq!(pack_bits(&[1, 2, 3, 0], 2), vec![0b0011_1001]);
    // 3-bit codes 5, 7, 1 → bits 101 111 001 → 0b01_111_101, 0b0000000_0.
    assert_eq!(pack_bits(&[5, 7, 1], 3), vec![0b0111_1101, 0b0000_0000]);
    let mut rng = StdRng::seed_from_u64(6);
    for bits in 2..=8u32 {
        let codes: Vec<u8> = (0..1001)
            .map(|_| rng.gen_range(0..(1u16 << bits)) as u8)
            .collect();
        let p = pack_bits(&codes, bits);
        assert_eq!(p.len(), (1001 * bits as usize).div_ceil(8));
        assert_eq!(unpack_bits(&p, bits, codes.len()), codes);
    }
}
