//! `deltaserve bench kernels` on the CPU, the smoke check CI can run (the GPU numbers are in
//! BENCHMARKS.md): tiny shapes, two batch mixes, one prefill size.

use std::process::Command;

fn deltaserve(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_deltaserve"))
        .args(args)
        .output()
        .expect("running the deltaserve binary")
}

#[test]
fn bench_kernels_runs_on_the_cpu_and_prints_its_tables() {
    let json = std::env::temp_dir().join(format!("bench-kernels-{}.json", std::process::id()));
    let out = deltaserve(&[
        "bench",
        "kernels",
        "--shapes",
        "64x96",
        "--mixes",
        "1x1,4x2",
        "--prefill",
        "8",
        "--iters",
        "2",
        "--json",
        json.to_str().expect("utf-8 temp path"),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "copy bandwidth",
        "## 64x96",
        "prefill, one tenant",
        "Goals (issue 5)",
    ] {
        assert!(stdout.contains(needle), "no {needle:?} in:\n{stdout}");
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("the --json file")).unwrap();
    assert_eq!(report["rows"].as_array().map(Vec::len), Some(2));
    assert!(report["rows"][1]["ours_us"].as_f64().unwrap() > 0.0);
    // A copy the optimiser removed would report an absurd bandwidth.
    let copy = report["copy_gbps"].as_f64().unwrap();
    assert!(copy > 0.1 && copy < 10_000.0, "copy bandwidth {copy} GB/s");
    let _ = std::fs::remove_file(json);
}

#[test]
fn bench_kernels_rejects_more_tenants_than_rows() {
    let out = deltaserve(&["bench", "kernels", "--mixes", "2x4", "--iters", "1"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--mixes 2x4"), "{stderr}");
}
