//! Bit budgets as a multiple-choice knapsack, solved exactly as an integer linear program.
//!
//! LQ-LoRA (Guo et al., arXiv 2311.12023, §3.2, eq. 5) picks one quantization configuration
//! per matrix so that the summed reconstruction error is smallest while the total storage
//! stays within a budget:
//!
//! ```text
//!   min  Σ_i Σ_c  err(i, c) · x(i, c)
//!   s.t. Σ_i Σ_c  bits(i, c) · x(i, c) ≤ B,     Σ_c x(i, c) = 1 for every i,     x ∈ {0, 1}
//! ```
//!
//! [`solve`] builds exactly that program through `good_lp` and solves it with the pure-Rust
//! `microlp` branch-and-bound. It knows nothing about quantization: an [`Item`] is anything
//! with [`Choice`]s of (bits, error), so the same solver serves LQ-LoRA's NF configurations
//! and per-matrix codec budgets (`compress --budget-bits`).
//!
//! Two preparations keep the program small and well-conditioned, neither changes the optimum:
//! options that another option of the same item beats on both bits and error are dropped
//! (they can never be in an optimal solution once ties are broken), and bits and errors are
//! rescaled to order one before they reach the solver (a 7B model's budget is ~10¹⁰ bits,
//! far outside the range where simplex tolerances mean anything). The chosen allocation is
//! then re-checked in exact integer arithmetic against the budget.

use std::fmt;
use std::time::Instant;

use good_lp::{
    constraint, microlp, variable, Expression, ProblemVariables, Solution, SolutionStatus,
    SolverModel, Variable, WithInitialSolution, WithMipGap, WithTimeLimit,
};

use crate::CodecError;

/// One way to store an item: how many bits it takes and the error it leaves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Choice {
    /// Storage, in bits, everything included (codes, scales, side data).
    pub bits: u64,
    /// The error this option leaves (any non-negative, additive measure; smaller is better).
    pub error: f64,
}

/// Something to be stored in exactly one of several ways (a weight matrix).
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// A name for messages (the tensor name).
    pub name: String,
    /// The options; the solver picks exactly one.
    pub choices: Vec<Choice>,
}

/// The solver's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Allocation {
    /// For each item (in input order), the index into its `choices` that was picked.
    pub picks: Vec<usize>,
    /// Σ bits of the picked options (≤ the budget, exactly).
    pub total_bits: u64,
    /// Σ error of the picked options.
    pub total_error: f64,
    /// Wall-clock seconds the solver took.
    pub solve_seconds: f64,
    /// How the search ended.
    pub status: SolveStatus,
}

/// How the branch-and-bound search ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SolveStatus {
    /// Proven optimal (or no search was needed).
    Optimal,
    /// Within the requested relative MIP gap of the optimum.
    WithinGap,
    /// The time limit ran out; the best allocation found (never worse than the greedy one the
    /// search starts from) is returned.
    TimeLimit,
}

/// Knobs of [`solve_with`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetOptions {
    /// Number of parameters, so an infeasible budget is also reported per parameter (0: unknown).
    pub params: u64,
    /// Relative optimality gap at which the search may stop (0: prove optimality).
    pub mip_gap: f64,
    /// Seconds after which the best allocation found so far is returned.
    pub time_limit_s: f64,
}

impl Default for BudgetOptions {
    fn default() -> Self {
        Self {
            params: 0,
            mip_gap: 1e-6,
            time_limit_s: 60.0,
        }
    }
}

/// Why a budget could not be allocated.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum BudgetError {
    /// There is nothing to allocate.
    #[error("bit budget: no items to allocate bits to")]
    NoItems,
    /// An item has no options at all.
    #[error("bit budget: item {item} has no storage options; give it at least one")]
    NoChoices {
        /// The item.
        item: String,
    },
    /// An error is NaN, infinite or negative.
    #[error(
        "bit budget: item {item} option {choice} has error {error}; errors must be finite and ≥ 0"
    )]
    BadError {
        /// The item.
        item: String,
        /// The option's index.
        choice: usize,
        /// The offending value.
        error: f64,
    },
    /// Even the smallest option of every item does not fit.
    #[error(
        "bit budget of {budget_bits} bits is infeasible: the smallest option of every item already \
         needs {min_bits} bits ({min_per_param:.4} bits/param over {params} params); raise the budget \
         to at least that or offer smaller options"
    )]
    Infeasible {
        /// The budget asked for.
        budget_bits: u64,
        /// The least any allocation needs.
        min_bits: u64,
        /// Number of parameters, for the per-parameter figure (0 if unknown).
        params: u64,
        /// `min_bits / params`.
        min_per_param: f64,
    },
    /// The solver failed (or returned an allocation that does not fit, which would be a bug).
    #[error("bit budget: the integer program solver failed: {detail}")]
    Solver {
        /// What went wrong.
        detail: String,
    },
}

impl From<BudgetError> for CodecError {
    fn from(e: BudgetError) -> Self {
        CodecError::BadOption {
            option: "--budget-bits",
            detail: e.to_string(),
        }
    }
}

impl fmt::Display for Allocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} items, {} bits, total error {:.6e} ({:?}, {:.3} s)",
            self.picks.len(),
            self.total_bits,
            self.total_error,
            self.status,
            self.solve_seconds
        )
    }
}

/// Picks one choice per item minimising Σ error subject to Σ bits ≤ `budget_bits`.
///
/// With [`BudgetOptions::default`]: optimal to a relative gap of 10⁻⁶, or the best found in
/// 60 s (see [`Allocation::status`]). Errors: [`BudgetError::Infeasible`] when even the
/// smallest options overflow the budget (the message says how many bits are needed), the
/// other variants for malformed input.
pub fn solve(items: &[Item], budget_bits: u64) -> Result<Allocation, BudgetError> {
    solve_with(items, budget_bits, &BudgetOptions::default())
}

/// [`solve`] with explicit options.
pub fn solve_with(
    items: &[Item],
    budget_bits: u64,
    opts: &BudgetOptions,
) -> Result<Allocation, BudgetError> {
    let params = opts.params;
    let start = Instant::now();
    if items.is_empty() {
        return Err(BudgetError::NoItems);
    }
    for item in items {
        if item.choices.is_empty() {
            return Err(BudgetError::NoChoices {
                item: item.name.clone(),
            });
        }
        for (c, ch) in item.choices.iter().enumerate() {
            if !ch.error.is_finite() || ch.error < 0.0 {
                return Err(BudgetError::BadError {
                    item: item.name.clone(),
                    choice: c,
                    error: ch.error,
                });
            }
        }
    }
    let min_bits: u64 = items
        .iter()
        .map(|it| it.choices.iter().map(|c| c.bits).min().unwrap_or(0))
        .sum();
    if min_bits > budget_bits {
        return Err(BudgetError::Infeasible {
            budget_bits,
            min_bits,
            params,
            min_per_param: if params > 0 {
                min_bits as f64 / params as f64
            } else {
                f64::NAN
            },
        });
    }

    // Pareto front per item: drop options beaten (or tied) on both axes. Keeps the indices.
    let fronts: Vec<Vec<usize>> = items.iter().map(|it| pareto(&it.choices)).collect();

    // If the largest option of every item fits, no program is needed: take each item's
    // least-error option.
    let max_bits: u64 = fronts
        .iter()
        .zip(items)
        .map(|(f, it)| it.choices[*f.last().expect("front nonempty")].bits)
        .sum();
    let (picks, status): (Vec<usize>, SolveStatus) = if min_bits == budget_bits {
        // No slack at all: every item takes its smallest (least-error among smallest) option.
        (fronts.iter().map(|f| f[0]).collect(), SolveStatus::Optimal)
    } else if max_bits <= budget_bits {
        (
            fronts
                .iter()
                .map(|f| *f.last().expect("front nonempty"))
                .collect(),
            SolveStatus::Optimal,
        )
    } else {
        solve_ilp(items, &fronts, budget_bits, min_bits, opts)?
    };

    let total_bits: u64 = picks
        .iter()
        .zip(items)
        .map(|(&p, it)| it.choices[p].bits)
        .sum();
    if total_bits > budget_bits {
        return Err(BudgetError::Solver {
            detail: format!(
                "allocation uses {total_bits} bits, over the budget of {budget_bits} (numerical tolerance)"
            ),
        });
    }
    let total_error = picks
        .iter()
        .zip(items)
        .map(|(&p, it)| it.choices[p].error)
        .sum();
    Ok(Allocation {
        picks,
        total_bits,
        total_error,
        solve_seconds: start.elapsed().as_secs_f64(),
        status,
    })
}

/// Indices of the options on the (bits, error) Pareto front, sorted by bits ascending
/// (so error strictly descending).
fn pareto(choices: &[Choice]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..choices.len()).collect();
    idx.sort_by(|&a, &b| {
        choices[a]
            .bits
            .cmp(&choices[b].bits)
            .then(choices[a].error.total_cmp(&choices[b].error))
    });
    let mut front: Vec<usize> = Vec::new();
    for i in idx {
        match front.last() {
            Some(&last) if choices[i].error >= choices[last].error => {}
            _ => front.push(i),
        }
    }
    front
}

/// The classic multiple-choice knapsack greedy (Sinha & Zoltners 1979): on each item's
/// lower convex hull, take upgrades in order of error saved per extra bit while they fit.
/// Feasible, so it seeds the branch and bound with an incumbent.
fn greedy(items: &[Item], fronts: &[Vec<usize>], budget_bits: u64) -> Vec<usize> {
    // Lower convex hull of each front (bits ascending, error descending).
    let hulls: Vec<Vec<usize>> = items
        .iter()
        .zip(fronts)
        .map(|(it, f)| {
            let mut h: Vec<usize> = Vec::new();
            for &c in f {
                while h.len() >= 2 {
                    let (a, b) = (&it.choices[h[h.len() - 2]], &it.choices[h[h.len() - 1]]);
                    let p = &it.choices[c];
                    // Drop b if it lies on or above the segment a→p.
                    let cross = (b.bits - a.bits) as f64 * (p.error - a.error)
                        - (b.error - a.error) * (p.bits - a.bits) as f64;
                    if cross <= 0.0 {
                        h.pop();
                    } else {
                        break;
                    }
                }
                h.push(c);
            }
            h
        })
        .collect();
    let mut pos = vec![0usize; items.len()];
    let mut used: u64 = items
        .iter()
        .zip(&hulls)
        .map(|(it, h)| it.choices[h[0]].bits)
        .sum();
    let mut upgrades: Vec<(f64, usize, usize)> = Vec::new();
    for (i, (it, h)) in items.iter().zip(&hulls).enumerate() {
        for k in 1..h.len() {
            let (a, b) = (&it.choices[h[k - 1]], &it.choices[h[k]]);
            upgrades.push(((a.error - b.error) / (b.bits - a.bits) as f64, i, k));
        }
    }
    // Convex hulls have falling rates, so one item's upgrades come out in order.
    upgrades.sort_by(|a, b| b.0.total_cmp(&a.0));
    for (_, i, k) in upgrades {
        if pos[i] + 1 != k {
            continue;
        }
        let extra = items[i].choices[hulls[i][k]].bits - items[i].choices[hulls[i][k - 1]].bits;
        if used + extra <= budget_bits {
            used += extra;
            pos[i] = k;
        }
    }
    pos.iter().zip(&hulls).map(|(&p, h)| h[p]).collect()
}

fn solve_ilp(
    items: &[Item],
    fronts: &[Vec<usize>],
    budget_bits: u64,
    min_bits: u64,
    opts: &BudgetOptions,
) -> Result<(Vec<usize>, SolveStatus), BudgetError> {
    let start = greedy(items, fronts, budget_bits);
    // Work in "bits above each item's minimum": the constraint becomes
    // Σ (bits − min_i) x ≤ B − Σ min_i, whose right-hand side is the slack actually
    // being shared out. Scale it to 1 and errors to max 1 so the simplex sees order-one numbers.
    let slack = (budget_bits - min_bits) as f64;
    let err_scale = items
        .iter()
        .flat_map(|it| it.choices.iter().map(|c| c.error))
        .fold(0.0f64, f64::max)
        .max(f64::MIN_POSITIVE);

    let mut vars = ProblemVariables::new();
    let mut x: Vec<Vec<Variable>> = Vec::with_capacity(items.len());
    let mut objective = Expression::from(0.0);
    let mut weight = Expression::from(0.0);
    for (it, front) in items.iter().zip(fronts) {
        let base = it.choices[front[0]].bits;
        let row: Vec<Variable> = front
            .iter()
            .map(|_| vars.add(variable().binary()))
            .collect();
        for (&c, &v) in front.iter().zip(&row) {
            objective += (it.choices[c].error / err_scale) * v;
            let extra = (it.choices[c].bits - base) as f64;
            if extra > 0.0 {
                weight += (extra / slack) * v;
            }
        }
        x.push(row);
    }
    let init: Vec<(Variable, f64)> = x
        .iter()
        .zip(fronts)
        .zip(&start)
        .flat_map(|((row, front), &pick)| {
            row.iter()
                .zip(front)
                .map(move |(&v, &c)| (v, if c == pick { 1.0 } else { 0.0 }))
        })
        .collect();
    let mut problem = vars
        .minimise(objective)
        .using(microlp)
        .with_initial_solution(init)
        .with_time_limit(opts.time_limit_s)
        .with_mip_gap(opts.mip_gap as f32)
        .map_err(|e| BudgetError::Solver {
            detail: format!("MIP gap {}: {e}", opts.mip_gap),
        })?;
    for row in &x {
        let one: Expression = row.iter().copied().sum();
        problem.add_constraint(constraint!(one == 1.0));
    }
    // Bits are integers, so Σ extra ≤ slack is the same constraint as Σ extra ≤ slack + ½:
    // the half bit absorbs the simplex's floating-point tolerance in both directions (the
    // caller re-checks the allocation in exact integers).
    let rhs = (slack + 0.5) / slack;
    problem.add_constraint(constraint!(weight <= rhs));
    let sol = problem.solve().map_err(|e| BudgetError::Solver {
        detail: e.to_string(),
    })?;
    let status = match sol.status() {
        SolutionStatus::Optimal => SolveStatus::Optimal,
        SolutionStatus::GapLimit => SolveStatus::WithinGap,
        SolutionStatus::TimeLimit => SolveStatus::TimeLimit,
    };
    let mut picks = Vec::with_capacity(items.len());
    for (row, front) in x.iter().zip(fronts) {
        let (k, _) = row
            .iter()
            .enumerate()
            .map(|(k, &v)| (k, sol.value(v)))
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .expect("row nonempty");
        picks.push(front[k]);
    }
    // Never return worse than the greedy incumbent (a time-limited search may not have
    // reported it back).
    let err = |p: &[usize]| -> f64 {
        p.iter()
            .zip(items)
            .map(|(&c, it)| it.choices[c].error)
            .sum()
    };
    if err(&start) < err(&picks) {
        return Ok((start, status));
    }
    Ok((picks, status))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pareto_drops_dominated() {
        let ch = [
            Choice {
                bits: 4,
                error: 1.0,
            },
            Choice {
                bits: 2,
                error: 5.0,
            },
            Choice {
                bits: 3,
                error: 6.0,
            }, // dominated by (2, 5)
            Choice {
                bits: 5,
                error: 1.0,
            }, // dominated by (4, 1)
        ];
        assert_eq!(pareto(&ch), vec![1, 0]);
    }
}
