//! Kino media (being written).
