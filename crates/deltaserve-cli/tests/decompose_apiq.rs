//! `deltaserve decompose --init apiq` end to end on the tiny Llama fixture: a missing `--data`
//! is a one-line error, the outputs are the LQ-LoRA path's (with `init: apiq` recorded), the
//! model they describe runs, and at the same Q bits and rank its perplexity is closer to the
//! base than LQ-LoRA's weight-space initialisation.

mod common;

use std::path::Path;

use common::{fixture, ok_args, ppl, run};

#[test]
fn apiq_init_needs_data_and_beats_lqlora_init_on_the_fixture() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/demo/data");
    let held = std::fs::read_to_string(root.join("heldout_code.txt")).unwrap();
    std::fs::write(dir.join("text.txt"), &held[..6000]).unwrap();
    let calib = std::fs::read_to_string(root.join("calib.txt")).unwrap();
    std::fs::write(dir.join("calib.txt"), &calib[..20000]).unwrap();
    let fx = fixture();
    let fx = fx.to_str().unwrap();
    let common = [
        "decompose",
        "--model",
        fx,
        "--rank",
        "4",
        "--budget-bits",
        "2.5",
        "--configs",
        "nf2-b16,nf2-b64,nf3-b16,nf3-b64",
        "--iters",
        "5",
        "--quiet",
    ];

    // No --data: one line naming the flag and the fix.
    let mut args = common.to_vec();
    args.extend(["--init", "apiq", "--out", "x"]);
    let (success, _, stderr) = run(dir, &args);
    assert!(!success);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--init apiq needs --data"), "{stderr}");
    assert!(!dir.join("x").exists());

    let mut args = common.to_vec();
    args.extend(["--init", "apiq", "--data", "calib.txt", "--seq-len", "64"]);
    args.extend(["--apiq-windows", "16", "--out", "a"]);
    ok_args(dir, &args);
    let mut args = common.to_vec();
    args.extend(["--out", "l"]);
    ok_args(dir, &args);
    for f in [
        "model.safetensors",
        "nf_codes.safetensors",
        "decompose.json",
        "lqlora_init.delta",
    ] {
        assert!(dir.join("a").join(f).is_file(), "a/{f} missing");
    }
    let report = |d: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join(d).join("decompose.json")).unwrap())
            .unwrap()
    };
    let (ra, rl) = (report("a"), report("l"));
    assert_eq!(ra["init"], "apiq");
    assert_eq!(rl["init"], "lqlora");
    // Equal bits for Q: both allocations stay within the same budget.
    let bits =
        |r: &serde_json::Value| r["q_bits"].as_f64().unwrap() / r["params"].as_f64().unwrap();
    assert!(
        bits(&ra) <= 2.5 && bits(&rl) <= 2.5,
        "{} {}",
        bits(&ra),
        bits(&rl)
    );

    let base = ppl(dir, fx, None);
    let p_apiq = ppl(dir, "a", Some("a/lqlora_init.delta"));
    let p_lq = ppl(dir, "l", Some("l/lqlora_init.delta"));
    let gap = |p: f64| (p / base).ln().abs();
    assert!(
        gap(p_apiq) < gap(p_lq),
        "ApiQ init {p_apiq} should be closer to the base {base} than LQ-LoRA init {p_lq}"
    );
}
