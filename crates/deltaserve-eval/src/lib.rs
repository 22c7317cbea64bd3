//! deltaserve-eval.
