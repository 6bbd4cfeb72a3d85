//! An in-memory [`Backend`](crate::backend::Backend) for tests, fuzzing and examples.
