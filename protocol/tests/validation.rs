//! Validation tests (being written).
