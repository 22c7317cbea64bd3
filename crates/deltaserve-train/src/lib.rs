//! deltaserve-train.
