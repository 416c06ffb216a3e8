//! Prompt encoding (being written).
