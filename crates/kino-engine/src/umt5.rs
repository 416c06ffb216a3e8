//! Text encoder (see its module doc).
