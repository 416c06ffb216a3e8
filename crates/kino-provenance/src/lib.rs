//! Kino provenance: C2PA signing/reading and the prompt policy.
