//! Adapter fine-tuning: gradients reach every adapter parameter and match central finite
//! differences in f64, AdamW matches a float64 reference, accumulation equals a larger batch,
//! the loss falls on a tiny task, a resumed run equals an uninterrupted one bit for bit, the
//! written delta reproduces the trained adapter, and bad input fails with a message.

mod common;

use candle_core::{DType, Device, Tensor};
use deltaserve_eval::EvalSequence;
use deltaserve_format::{DeltaFile, TensorEntry};
use deltaserve_model::{Checkpoint, LayerDelta, LinearDelta, Model, Proj, TenantWeights};
use deltaserve_train::finetune::{perplexity, AdamW};
use deltaserve_train::{
    finetune, AdapterKind, AdapterSet, AdapterSpec, FinetuneConfig, FinetuneJob, Finetuner, Quiet,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const KINDS: [AdapterKind; 3] = [AdapterKind::Lora, AdapterKind::Qbara, AdapterKind::Qahira];

fn spec(kind: AdapterKind) -> AdapterSpec {
    AdapterSpec::new(kind, 4)
}

/// Sequences over the test tokenizer's byte ids; the second half of each is scored only, so the
/// mask matters.
fn sequences(n: usize, len: usize, seed: u64) -> Vec<EvalSequence> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let tokens: Vec<u32> = (0..len).map(|_| rng.gen_range(0..256u32)).collect();
            let scored = (0..len).map(|t| t >= len / 2).collect();
            EvalSequence { tokens, scored }
        })
        .collect()
}

/// A repeating pattern (the tiny task the loss must learn).
fn pattern_sequences(n: usize, len: usize) -> Vec<EvalSequence> {
    (0..n)
        .map(|i| {
            let tokens: Vec<u32> = (0..len).map(|t| ((t + i) % 5) as u32 * 7 + 40).collect();
            EvalSequence::all(tokens)
        })
        .collect()
}

fn load(pair: &common::Pair, dtype: DType) -> (Checkpoint, Model) {
    let ckpt = Checkpoint::open(&pair.base).unwrap();
    let model = Model::load(&ckpt, dtype, &Device::Cpu).unwrap();
    (ckpt, model)
}

/// Sets every adapter parameter to small random values, so that no gradient is zero by
/// construction (LoRA's `A` has a zero gradient while `B` is zero).
fn randomize(set: &AdapterSet, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    for v in set.vars() {
        let n = v.as_tensor().elem_count();
        let vals: Vec<f64> = (0..n).map(|_| rng.gen_range(-0.05..0.05)).collect();
        let t = Tensor::from_vec(vals, v.as_tensor().dims(), &Device::Cpu)
            .unwrap()
            .to_dtype(v.dtype())
            .unwrap();
        v.set(&t).unwrap();
    }
}

fn host(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Relative error allowed between autograd and central differences in f64 (step 1e-5 on values
/// of order 0.05: truncation O(h²) ≈ 1e-10 relative, rounding ≈ 1e-16·L/h ≈ 1e-11).
const FD_TOLERANCE: f64 = 1e-6;

#[test]
fn every_adapter_parameter_gets_a_gradient_that_matches_finite_differences_f64() {
    let pair = common::pair();
    let (_, model) = load(&pair, DType::F64);
    for kind in KINDS {
        let set = AdapterSet::new(&model, spec(kind), 0).unwrap();
        randomize(&set, 7);
        assert_eq!(set.adapters.len(), 7 * common::LAYERS);
        let ft = Finetuner::new(
            &model,
            set,
            sequences(3, 10, 1),
            FinetuneConfig {
                batch: 2,
                accum: 1,
                ..Default::default()
            },
        )
        .unwrap();
        let micro = vec![vec![0, 1], vec![2]];
        let (_, grads) = ft.loss_and_grads(&micro).unwrap();
        let vars = ft.adapters().vars();
        let names = ft.adapters().var_names();
        let mut worst = 0f64;
        for ((name, var), g) in names.iter().zip(&vars).zip(&grads) {
            let g = host(g);
            let norm: f64 = g.iter().map(|x| x.abs()).sum();
            assert!(
                norm > 0.0 && norm.is_finite(),
                "{kind} {name}: gradient norm {norm}"
            );
            // Three coordinates per tensor: first, middle, last.
            let n = g.len();
            let p0 = host(var.as_tensor());
            for &i in &[0, n / 2, n - 1] {
                let h = 1e-5;
                let at = |x: f64| {
                    let mut p = p0.clone();
                    p[i] = x;
                    var.set(&Tensor::from_vec(p, var.as_tensor().dims(), &Device::Cpu).unwrap())
                        .unwrap();
                    ft.loss_and_grads(&micro).unwrap().0
                };
                let numeric = (at(p0[i] + h) - at(p0[i] - h)) / (2.0 * h);
                at(p0[i]);
                let rel = (g[i] - numeric).abs() / numeric.abs().max(g[i].abs()).max(1e-12);
                worst = worst.max(rel);
                assert!(
                    rel < FD_TOLERANCE,
                    "{kind} {name}[{i}]: autograd {:e}, finite difference {numeric:e}, relative error {rel:e}",
                    g[i]
                );
            }
        }
        eprintln!(
            "{kind}: worst relative error {worst:e} over {} tensors",
            vars.len()
        );
    }
}

/// Gradient checkpointing per decoder layer (and the LM head + cross-entropy in blocks of 5 rows,
/// which split sequences and leave blocks with no scored target) gives the gradients of the
/// plain one-graph backward: in f64 to 1e-10 relative (only the summation order differs), in
/// f32 to 1e-5 relative to the largest entry of each tensor.
#[test]
fn checkpointed_gradients_equal_the_plain_backward() {
    let pair = common::pair();
    for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-5)] {
        let (_, model) = load(&pair, dtype);
        for kind in KINDS {
            let run = |checkpoint: bool, chunk: usize| {
                let set = AdapterSet::new(&model, spec(kind), 0).unwrap();
                randomize(&set, 5);
                let mut ft = Finetuner::new(
                    &model,
                    set,
                    sequences(3, 11, 4),
                    FinetuneConfig {
                        batch: 2,
                        ..Default::default()
                    },
                )
                .unwrap();
                ft.set_checkpoint_layers(checkpoint);
                ft.set_loss_chunk(chunk);
                ft.loss_and_grads(&[vec![0, 1], vec![2]]).unwrap()
            };
            let (l0, g0) = run(false, 0);
            for chunk in [0, 5] {
                let (l1, g1) = run(true, chunk);
                assert!(
                    (l0 - l1).abs() <= tol * l0.abs(),
                    "{kind} {dtype:?} chunk {chunk}: loss {l0} vs {l1}"
                );
                let mut worst = 0f64;
                for (a, b) in g0.iter().zip(&g1) {
                    let (a, b) = (host(a), host(b));
                    let scale = a.iter().fold(0f64, |m, x| m.max(x.abs()));
                    assert!(scale > 0.0, "{kind}: a zero gradient");
                    for (x, y) in a.iter().zip(&b) {
                        worst = worst.max((x - y).abs() / scale);
                    }
                }
                eprintln!("{kind} {dtype:?} chunk {chunk}: worst relative difference {worst:e}");
                assert!(worst <= tol, "{kind} {dtype:?} chunk {chunk}: {worst:e}");
            }
        }
    }
}

#[test]
fn adamw_matches_a_float64_reference() {
    // torch.optim.AdamW's update written out in f64 for three steps with changing gradients.
    let cfg = FinetuneConfig {
        weight_decay: 0.1,
        ..Default::default()
    };
    let p0 = [0.5f64, -1.0, 2.0];
    let var = candle_core::Var::from_tensor(&Tensor::new(&p0, &Device::Cpu).unwrap()).unwrap();
    let mut opt = AdamW::new(std::slice::from_ref(&var)).unwrap();
    let (mut p, mut m, mut v) = (p0.to_vec(), [0f64; 3], [0f64; 3]);
    for t in 1..=3 {
        let g: Vec<f64> = (0..3)
            .map(|i| (i as f64 + 1.0) * 0.3 - t as f64 * 0.2)
            .collect();
        let lr = 0.01 * t as f64;
        opt.step(
            std::slice::from_ref(&var),
            &[Tensor::new(g.as_slice(), &Device::Cpu).unwrap()],
            lr,
            &cfg,
        )
        .unwrap();
        for i in 0..3 {
            p[i] *= 1.0 - lr * cfg.weight_decay;
            m[i] = cfg.beta1 * m[i] + (1.0 - cfg.beta1) * g[i];
            v[i] = cfg.beta2 * v[i] + (1.0 - cfg.beta2) * g[i] * g[i];
            let mh = m[i] / (1.0 - cfg.beta1.powi(t));
            let vh = v[i] / (1.0 - cfg.beta2.powi(t));
            p[i] -= lr * mh / (vh.sqrt() + cfg.eps);
        }
        let ours = host(var.as_tensor());
        for i in 0..3 {
            assert!(
                (ours[i] - p[i]).abs() < 1e-15,
                "step {t}: {ours:?} vs {p:?}"
            );
        }
    }
}

#[test]
fn accumulating_two_micro_batches_equals_one_batch_of_two() {
    let pair = common::pair();
    let (_, model) = load(&pair, DType::F64);
    let grads_for = |batch: usize, accum: usize| {
        let set = AdapterSet::new(&model, spec(AdapterKind::Lora), 0).unwrap();
        randomize(&set, 3);
        let mut ft = Finetuner::new(
            &model,
            set,
            sequences(5, 9, 2),
            FinetuneConfig {
                batch,
                accum,
                ..Default::default()
            },
        )
        .unwrap();
        let micro = ft.step_examples(0);
        ft.loss_and_grads(&micro).unwrap()
    };
    let (l1, g1) = grads_for(2, 1);
    let (l2, g2) = grads_for(1, 2);
    assert!((l1 - l2).abs() < 1e-12, "{l1} vs {l2}");
    for (a, b) in g1.iter().zip(&g2) {
        for (x, y) in host(a).iter().zip(host(b)) {
            assert!((x - y).abs() < 1e-12, "{x} vs {y}");
        }
    }
}

#[test]
fn loss_falls_on_a_tiny_task_for_every_adapter() {
    let pair = common::pair();
    let (_, model) = load(&pair, DType::F32);
    let data = pattern_sequences(8, 24);
    for kind in KINDS {
        let set = AdapterSet::new(&model, spec(kind), 0).unwrap();
        let before = perplexity(&model, None, &data, 8).unwrap();
        let mut ft = Finetuner::new(
            &model,
            set,
            data.clone(),
            FinetuneConfig {
                steps: 40,
                batch: 8,
                lr: 1e-2,
                ..Default::default()
            },
        )
        .unwrap();
        let losses = ft.train_until(40, 0, None, |_| {}).unwrap();
        let t = ft.adapters().tenant(false).unwrap();
        let after = perplexity(&model, Some(&t), &data, 8).unwrap();
        eprintln!(
            "{kind}: loss {:.3} -> {:.3}, ppl {before:.2} -> {after:.2}",
            losses[0],
            losses[losses.len() - 1]
        );
        // Starting exactly at the base: the first loss is the base's.
        assert!(
            (losses[0] - before.ln()).abs() < 1e-4,
            "{kind}: {} vs {}",
            losses[0],
            before.ln()
        );
        assert!(after < 0.5 * before, "{kind}: ppl {before} -> {after}");
    }
}

fn adapter_bytes(set: &AdapterSet) -> Vec<Vec<u8>> {
    set.vars()
        .iter()
        .map(|v| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect()
        })
        .collect()
}

#[test]
fn resumed_training_equals_uninterrupted_training_bit_for_bit() {
    let pair = common::pair();
    let (_, model) = load(&pair, DType::F32);
    let data = sequences(7, 12, 5);
    let cfg = FinetuneConfig {
        steps: 6,
        batch: 2,
        accum: 2,
        lr: 5e-3,
        weight_decay: 0.01,
        seed: 11,
        ..Default::default()
    };
    for kind in KINDS {
        let straight = {
            let set = AdapterSet::new(&model, spec(kind), 11).unwrap();
            let mut ft = Finetuner::new(&model, set, data.clone(), cfg.clone()).unwrap();
            ft.train_until(6, 0, None, |_| {}).unwrap();
            adapter_bytes(ft.adapters())
        };
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("run.ckpt");
        {
            let set = AdapterSet::new(&model, spec(kind), 11).unwrap();
            let mut ft = Finetuner::new(&model, set, data.clone(), cfg.clone()).unwrap();
            // Interrupted after step 3; the checkpoint is written every 3 steps.
            ft.train_until(3, 3, Some(&ckpt), |_| {}).unwrap();
        }
        // A fresh process: new (differently initialised) adapters, then the checkpoint.
        let set = AdapterSet::new(&model, spec(kind), 999).unwrap();
        let mut ft = Finetuner::new(&model, set, data.clone(), cfg.clone()).unwrap();
        ft.load_checkpoint(&ckpt).unwrap();
        assert_eq!(ft.step_index(), 3);
        ft.train_until(6, 3, Some(&ckpt), |_| {}).unwrap();
        assert_eq!(
            adapter_bytes(ft.adapters()),
            straight,
            "{kind}: resumed run differs from the uninterrupted one"
        );
        let moved = straight.iter().any(|b| b.iter().any(|&x| x != 0));
        assert!(moved, "{kind}: training changed nothing");
    }
}

/// The tenant read back from a written adapter delta, decoded by hand from the `lowrank`
/// convention (docs/FORMAT.md): `ΔW = up · down`.
fn tenant_from_file(file: &DeltaFile, layers: usize) -> TenantWeights {
    let mut t = TenantWeights::empty(layers);
    for (name, entry) in &file.header().tensors {
        let TensorEntry::Coded { codec, .. } = entry else {
            panic!("{name}: not coded")
        };
        assert_eq!(codec, "lowrank");
        let (l, p, _) = Proj::parse_tensor_name(name).unwrap();
        let part = |role: &str| {
            let (b, _, s) = file.part(entry, role).unwrap();
            Tensor::from_raw_buffer(b, DType::F32, s, &Device::Cpu).unwrap()
        };
        t.layers[l].linears[p.index()] = Some(LinearDelta::LowRank {
            down: part("down"),
            up: part("up"),
        });
    }
    t
}

#[test]
fn the_written_delta_reproduces_the_trained_adapter() {
    let pair = common::pair();
    let (ckpt, model) = load(&pair, DType::F32);
    let data = pattern_sequences(4, 16);
    for kind in KINDS {
        let set = AdapterSet::new(&model, spec(kind), 0).unwrap();
        let mut ft = Finetuner::new(
            &model,
            set,
            data.clone(),
            FinetuneConfig {
                steps: 3,
                batch: 2,
                lr: 1e-2,
                ..Default::default()
            },
        )
        .unwrap();
        ft.train_until(3, 0, None, |_| {}).unwrap();
        let out = pair.path(&format!("{kind}.delta"));
        ft.adapters()
            .write_delta(&ckpt, &out, serde_json::json!({}), false)
            .unwrap();
        let file = DeltaFile::open(&out).unwrap();
        let fp = deltaserve_format::fingerprint_safetensors(&ckpt.weight_files()).unwrap();
        file.check_base(&fp, ckpt.dir()).unwrap();
        assert_eq!(file.header().tensors.len(), 7 * common::LAYERS);
        let from_file = tenant_from_file(&file, common::LAYERS);
        let trained = ft.adapters().tenant(false).unwrap();
        let a = perplexity(&model, Some(&from_file), &data, 4).unwrap();
        let b = perplexity(&model, Some(&trained), &data, 4).unwrap();
        assert!((a - b).abs() < 1e-9 * b, "{kind}: {a} vs {b}");
        // And each entry decodes to the adapter's dense difference.
        for (l, layer) in from_file.layers.iter().enumerate() {
            for k in 0..7 {
                let x = layer.linears[k].as_ref().unwrap().to_dense_f32().unwrap();
                let y = trained.layers[l].linears[k]
                    .as_ref()
                    .unwrap()
                    .to_dense_f32()
                    .unwrap();
                let d = (x - y).unwrap().abs().unwrap().max_all().unwrap();
                assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
            }
        }
        let _ = LayerDelta::default();
    }
}

fn job(pair: &common::Pair, kind: AdapterKind) -> FinetuneJob {
    FinetuneJob {
        model: pair.base.clone(),
        data: vec![pair.data.clone()],
        eval: None,
        out: pair.path(&format!("{kind}-job.delta")),
        overwrite: false,
        spec: spec(kind),
        init: None,
        config: FinetuneConfig {
            steps: 4,
            batch: 2,
            ..Default::default()
        },
        seq_len: 32,
        save_every: 2,
        checkpoint: pair.path(&format!("{kind}-job.ckpt")),
        resume: false,
        stop_after: None,
        device: Device::Cpu,
        dtype: DType::F32,
        checkpoint_layers: true,
        loss_chunk: 7,
        profile: true,
    }
}

#[test]
fn the_job_trains_on_chat_data_stops_resumes_and_starts_from_an_init_delta() {
    let pair = common::pair();
    let chat = pair.path("chat.jsonl");
    let mut lines = String::new();
    for i in 0..12 {
        lines.push_str(
            &serde_json::json!({"messages": [
            {"role": "user", "content": format!("say {i}")},
            {"role": "assistant", "content": format!("value {} for {i}", i * 3)}]})
            .to_string(),
        );
        lines.push('\n');
    }
    std::fs::write(&chat, lines).unwrap();
    let mut j = job(&pair, AdapterKind::Lora);
    j.data = vec![chat.clone()];
    j.eval = Some(chat.clone());
    j.stop_after = Some(2);
    let first = finetune(&j, &mut Quiet).unwrap();
    assert_eq!(first.steps_done, 2);
    assert!(first.wrote.is_none() && !j.out.exists());
    j.stop_after = None;
    j.resume = true;
    let second = finetune(&j, &mut Quiet).unwrap();
    assert_eq!(second.steps_done, 4);
    assert_eq!(second.losses.len(), 2);
    let prof = second.profile.expect("profile was asked for");
    assert!(
        prof.forward > 0.0 && prof.loss > 0.0 && prof.backward > 0.0 && prof.optimizer > 0.0,
        "{prof:?}"
    );
    assert!(j.out.exists());
    assert!(second.eval_ppl_adapter.unwrap() < second.eval_ppl_base.unwrap());

    // Starting from the written (lowrank) delta: the starting delta is the file's.
    let mut k = job(&pair, AdapterKind::Lora);
    k.init = Some(j.out.clone());
    k.out = pair.path("from-init.delta");
    k.checkpoint = pair.path("from-init.ckpt");
    k.config.lr = 0.0;
    finetune(&k, &mut Quiet).unwrap();
    let (ckpt, model) = load(&pair, DType::F32);
    let _ = ckpt;
    let a = tenant_from_file(&DeltaFile::open(&j.out).unwrap(), common::LAYERS);
    let b = tenant_from_file(&DeltaFile::open(&k.out).unwrap(), common::LAYERS);
    let seqs = pattern_sequences(2, 10);
    let pa = perplexity(&model, Some(&a), &seqs, 2).unwrap();
    let pb = perplexity(&model, Some(&b), &seqs, 2).unwrap();
    assert!((pa - pb).abs() < 1e-5 * pa, "{pa} vs {pb}");
}

#[test]
fn bad_input_fails_with_a_message() {
    let pair = common::pair();
    let err = |j: &FinetuneJob| finetune(j, &mut Quiet).unwrap_err().to_string();

    let mut j = job(&pair, AdapterKind::Lora);
    j.config.steps = 0;
    assert!(err(&j).contains("--steps 0"), "{}", err(&j));

    let mut j = job(&pair, AdapterKind::Lora);
    j.spec.rank = 0;
    assert!(err(&j).contains("--rank 0"), "{}", err(&j));

    let mut j = job(&pair, AdapterKind::Qahira);
    j.spec.hira_out_group = 5;
    let e = err(&j);
    assert!(e.contains("qahira") && e.contains("not divisible"), "{e}");

    let mut j = job(&pair, AdapterKind::Lora);
    j.seq_len = 100_000;
    assert!(err(&j).contains("max_position_embeddings"), "{}", err(&j));

    let mut j = job(&pair, AdapterKind::Lora);
    j.data = vec![pair.path("missing.txt")];
    assert!(err(&j).contains("missing.txt"), "{}", err(&j));

    let mut j = job(&pair, AdapterKind::Lora);
    j.resume = true;
    let e = err(&j);
    assert!(e.contains("checkpoint") && e.contains("--resume"), "{e}");

    // Resuming with other settings than the checkpoint's.
    let mut j = job(&pair, AdapterKind::Lora);
    j.stop_after = Some(2);
    finetune(&j, &mut Quiet).unwrap();
    j.stop_after = None;
    j.resume = true;
    j.config.lr = 1.0;
    let e = err(&j);
    assert!(e.contains("settings") && e.contains("drop --resume"), "{e}");

    // --init is LoRA only, and needs a lowrank delta.
    let mut j = job(&pair, AdapterKind::Qbara);
    j.init = Some(pair.delta.clone());
    assert!(err(&j).contains("--adapter lora"), "{}", err(&j));
    let mut j = job(&pair, AdapterKind::Lora);
    j.init = Some(pair.delta.clone());
    assert!(err(&j).contains("lowrank"), "{}", err(&j));

    // An existing output is not replaced without --force.
    let j = job(&pair, AdapterKind::Lora);
    std::fs::write(&j.out, b"x").unwrap();
    assert!(err(&j).contains("--force"), "{}", err(&j));
}
