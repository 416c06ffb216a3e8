//! WanPipeline (being written).
