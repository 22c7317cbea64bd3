//! QA-HiRA's promise (arXiv 2407.17029 §3.3): trained on a base quantized block-wise with blocks
//! equal to the adapter's groups, the adapter folds into the quantization offsets, and the folded
//! quantized model (no adapter) computes what the quantized base plus the adapter computes.

mod common;

use candle_core::{DType, Device, Tensor};
use deltaserve_codecs::qahira::BlockQuantized;
use deltaserve_eval::EvalSequence;
use deltaserve_model::{Checkpoint, ForwardOptions, LogitsWanted, Model, Proj, SeqInput};
use deltaserve_train::{AdapterKind, AdapterSet, AdapterSpec, FinetuneConfig, Finetuner};

/// Largest |logit difference| allowed between the folded model and quantized base + adapter, in
/// f32: the two compute the same weights up to one f32 rounding per weight (≈ 1e-8 here), then
/// differ in summation order (base product + adapter product vs one product), ≈ 1e-6 · |logit|.
const TOLERANCE: f32 = 1e-4;

#[test]
fn folded_quantized_model_equals_quantized_base_plus_adapter() {
    let pair = common::pair();
    let mut tensors = common::random_base(1);
    let (gi, go) = (4, 8);
    let mut quant = Vec::new();
    for (name, shape, values) in tensors.iter_mut() {
        if let Some((l, p, false)) = Proj::parse_tensor_name(name) {
            let q = BlockQuantized::quantize(values, shape[0], shape[1], 4, go, gi).unwrap();
            *values = q.dequantize();
            quant.push((l, p, name.clone(), q));
        }
    }
    let qdir = pair.path("quantized");
    common::write_model(&qdir, &tensors, &common::config());
    let model = Model::load(&Checkpoint::open(&qdir).unwrap(), DType::F32, &Device::Cpu).unwrap();

    let mut spec = AdapterSpec::new(AdapterKind::Qahira, 4);
    spec.hira_in_group = gi;
    spec.hira_out_group = go;
    let set = AdapterSet::new(&model, spec, 0).unwrap();
    let data: Vec<EvalSequence> = (0..4)
        .map(|i| EvalSequence::all((0..20).map(|t| ((t * 3 + i) % 50) as u32 + 60).collect()))
        .collect();
    let mut ft = Finetuner::new(
        &model,
        set,
        data.clone(),
        FinetuneConfig {
            steps: 5,
            batch: 4,
            lr: 1e-2,
            ..Default::default()
        },
    )
    .unwrap();
    ft.train_until(5, 0, None, |_| {}).unwrap();
    let tenant = ft.adapters().tenant(false).unwrap();

    // Fold every projection's adapter into its offsets; the codes stay as they are.
    for (l, p, name, q) in quant.iter_mut() {
        let delta = tenant.layers[*l].linears[p.index()]
            .as_ref()
            .unwrap()
            .to_dense_f32()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(
            delta.iter().any(|&d| d != 0.0),
            "{name}: adapter did not train"
        );
        let codes = q.codes.clone();
        q.fold(&delta, 1e-6).unwrap();
        assert_eq!(q.codes, codes);
        let t = tensors.iter_mut().find(|t| &t.0 == name).unwrap();
        t.2 = q.dequantize();
    }
    let fdir = pair.path("folded");
    common::write_model(&fdir, &tensors, &common::config());
    let folded = Model::load(&Checkpoint::open(&fdir).unwrap(), DType::F32, &Device::Cpu).unwrap();

    let logits = |m: &Model, t| -> Vec<Tensor> {
        let mut seqs: Vec<SeqInput<'_>> = data
            .iter()
            .map(|s| SeqInput {
                tokens: &s.tokens,
                cache: None,
                tenant: t,
                logits: LogitsWanted::All,
            })
            .collect();
        m.forward(&mut seqs, ForwardOptions::default()).unwrap()
    };
    let a = logits(&model, Some(&tenant));
    let b = logits(&folded, None);
    let base = logits(&model, None);
    let mut worst = 0f32;
    let mut moved = 0f32;
    for ((x, y), z) in a.iter().zip(&b).zip(&base) {
        let d = (x - y).unwrap().abs().unwrap().max_all().unwrap();
        worst = worst.max(d.to_scalar::<f32>().unwrap());
        let m = (x - z).unwrap().abs().unwrap().max_all().unwrap();
        moved = moved.max(m.to_scalar::<f32>().unwrap());
    }
    eprintln!("max |logit| difference folded vs base+adapter: {worst:e}; adapter moved logits by up to {moved}");
    assert!(worst < TOLERANCE, "{worst}");
    assert!(
        moved > 100.0 * TOLERANCE,
        "the adapter barely changed the model ({moved})"
    );
}
