//! The multiple-choice knapsack ILP (`budget::solve`) against exhaustive search and hand-checked
//! instances, its errors, and its speed at LQ-LoRA's size (a few hundred matrices × ~10 configs).

use deltaserve_codecs::budget::{
    solve, solve_with, BudgetError, BudgetOptions, Choice, Item, SolveStatus,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn item(name: &str, opts: &[(u64, f64)]) -> Item {
    Item {
        name: name.into(),
        choices: opts
            .iter()
            .map(|&(bits, error)| Choice { bits, error })
            .collect(),
    }
}

/// Exhaustive search over every combination: the independent reference.
fn brute_force(items: &[Item], budget: u64) -> Option<(f64, u64)> {
    let mut best: Option<(f64, u64)> = None;
    let mut idx = vec![0usize; items.len()];
    loop {
        let bits: u64 = idx
            .iter()
            .zip(items)
            .map(|(&i, it)| it.choices[i].bits)
            .sum();
        let err: f64 = idx
            .iter()
            .zip(items)
            .map(|(&i, it)| it.choices[i].error)
            .sum();
        if bits <= budget && best.is_none_or(|(e, _)| err < e) {
            best = Some((err, bits));
        }
        let mut k = 0;
        loop {
            if k == items.len() {
                return best;
            }
            idx[k] += 1;
            if idx[k] < items[k].choices.len() {
                break;
            }
            idx[k] = 0;
            k += 1;
        }
    }
}

/// Greedy by error saved per extra bit — the heuristic the ILP must beat here.
///
/// A: {2 bits: 10, 4 bits: 4} saves 6 for 2 bits (3/bit); B: {2: 9, 5: 1} saves 8 for 3 bits
/// (2.67/bit). Budget 7: greedy upgrades A first (6 bits, error 4 + 9 = 13) and then B no
/// longer fits; the optimum upgrades B (7 bits, error 10 + 1 = 11).
#[test]
fn beats_greedy_on_hand_checked_instance() {
    let items = vec![
        item("A", &[(2, 10.0), (4, 4.0)]),
        item("B", &[(2, 9.0), (5, 1.0)]),
    ];
    let a = solve(&items, 7).unwrap();
    assert_eq!(a.status, SolveStatus::Optimal);
    assert_eq!(a.picks, vec![0, 1]);
    assert_eq!(a.total_bits, 7);
    assert_eq!(a.total_error, 11.0);
    // And with room for both upgrades, both are taken.
    let a = solve(&items, 9).unwrap();
    assert_eq!(a.picks, vec![1, 1]);
    assert_eq!(a.total_error, 5.0);
    // Exactly the minimum: both smallest.
    let a = solve(&items, 4).unwrap();
    assert_eq!(a.picks, vec![0, 0]);
}

#[test]
fn matches_exhaustive_search_on_random_instances() {
    let mut rng = StdRng::seed_from_u64(9);
    for trial in 0..40 {
        let n = rng.gen_range(2..=6);
        let items: Vec<Item> = (0..n)
            .map(|i| {
                let k = rng.gen_range(1..=5);
                Item {
                    name: format!("m{i}"),
                    choices: (0..k)
                        .map(|_| Choice {
                            // Matrix-sized bit counts, so the scaling inside is exercised.
                            bits: rng.gen_range(1..=40) * 1_000_003,
                            error: rng.gen_range(0.0..100.0),
                        })
                        .collect(),
                }
            })
            .collect();
        let min: u64 = items
            .iter()
            .map(|it| it.choices.iter().map(|c| c.bits).min().unwrap())
            .sum();
        let max: u64 = items
            .iter()
            .map(|it| it.choices.iter().map(|c| c.bits).max().unwrap())
            .sum();
        let budget = rng.gen_range(min..=max);
        let (best_err, _) = brute_force(&items, budget).unwrap();
        let a = solve(&items, budget).unwrap();
        assert!(a.total_bits <= budget, "trial {trial}: over budget");
        assert!(
            (a.total_error - best_err).abs() <= 1e-9 * best_err.max(1.0),
            "trial {trial}: ILP error {} but the optimum is {best_err}",
            a.total_error
        );
        let recomputed: f64 = a
            .picks
            .iter()
            .zip(&items)
            .map(|(&p, it)| it.choices[p].error)
            .sum();
        assert_eq!(recomputed, a.total_error);
    }
}

#[test]
fn infeasible_budget_is_a_clear_error() {
    let items = vec![item("A", &[(2, 10.0), (4, 4.0)]), item("B", &[(3, 9.0)])];
    let opts = BudgetOptions {
        params: 2,
        ..BudgetOptions::default()
    };
    let err = solve_with(&items, 4, &opts).unwrap_err();
    assert!(matches!(
        err,
        BudgetError::Infeasible {
            budget_bits: 4,
            min_bits: 5,
            ..
        }
    ));
    let msg = err.to_string();
    assert!(
        msg.contains("needs 5 bits") && msg.contains("raise the budget"),
        "{msg}"
    );
    assert!(!msg.contains('\n'));

    assert!(matches!(solve(&[], 10), Err(BudgetError::NoItems)));
    assert!(matches!(
        solve(&[item("A", &[])], 10),
        Err(BudgetError::NoChoices { .. })
    ));
    assert!(matches!(
        solve(&[item("A", &[(1, f64::NAN)])], 10),
        Err(BudgetError::BadError { .. })
    ));
}

/// LQ-LoRA's size: a 7B Llama has 224 projection matrices; ~10 (bits, block) configs each.
/// Errors follow the usual convex curve (halving per extra bit) with per-matrix noise so
/// the instance is not trivially symmetric. The ILP optimum is bounded below by the LP
/// relaxation; here we check it is at least as good as the greedy heuristic and time it.
#[test]
fn solves_lqlora_sized_instance_quickly() {
    let mut rng = StdRng::seed_from_u64(2311);
    let n = 224;
    let configs: Vec<f64> = vec![2.25, 2.5, 2.625, 3.125, 3.25, 3.5, 4.125, 4.25, 4.5, 8.125];
    let items: Vec<Item> = (0..n)
        .map(|i| {
            let params: u64 = if i % 7 < 4 { 4096 * 4096 } else { 4096 * 11008 };
            let sens: f64 = rng.gen_range(0.2..5.0);
            Item {
                name: format!("m{i}"),
                choices: configs
                    .iter()
                    .map(|&b| Choice {
                        bits: (b * params as f64) as u64,
                        error: sens * params as f64 * 2f64.powf(-2.0 * b) * rng.gen_range(0.9..1.1),
                    })
                    .collect(),
            }
        })
        .collect();
    let params: u64 = (0..n)
        .map(|i| {
            if i % 7 < 4 {
                4096u64 * 4096
            } else {
                4096 * 11008
            }
        })
        .sum();
    let budget = (3.0 * params as f64) as u64;
    let limit: f64 = std::env::var("BUDGET_TIME_LIMIT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10.0);
    let opts = BudgetOptions {
        params,
        mip_gap: 1e-6,
        time_limit_s: limit,
    };
    let a = solve_with(&items, budget, &opts).unwrap();
    eprintln!("224 items x 10 options at 3.0 bits/param: {a}");
    assert!(a.total_bits <= budget);
    // Greedy (best error saved per bit first) as a lower bar for quality.
    let mut picks = vec![0usize; n];
    let mut used: u64 = items.iter().map(|it| it.choices[0].bits).sum();
    loop {
        let mut best: Option<(f64, usize)> = None;
        for (i, it) in items.iter().enumerate() {
            if let Some(next) = it.choices.get(picks[i] + 1) {
                let cur = it.choices[picks[i]];
                let extra = next.bits - cur.bits;
                if used + extra <= budget {
                    let rate = (cur.error - next.error) / extra as f64;
                    if best.is_none_or(|(r, _)| rate > r) {
                        best = Some((rate, i));
                    }
                }
            }
        }
        let Some((_, i)) = best else { break };
        used += items[i].choices[picks[i] + 1].bits - items[i].choices[picks[i]].bits;
        picks[i] += 1;
    }
    let greedy: f64 = picks
        .iter()
        .zip(&items)
        .map(|(&p, it)| it.choices[p].error)
        .sum();
    assert!(
        a.total_error <= greedy * (1.0 + 1e-9),
        "ILP {} worse than greedy {greedy}",
        a.total_error
    );
    assert!(
        a.solve_seconds < limit + 5.0,
        "solver took {} s",
        a.solve_seconds
    );
}
