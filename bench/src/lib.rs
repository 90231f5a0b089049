//! What the benchmarks share with the tests: the kill -9 tool (`chaos`).

pub mod chaos;
