//! The example `Echo` backend used by the README demo, the tests and the benchmarks.
