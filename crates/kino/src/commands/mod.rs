pub mod bench;
pub mod eval;
pub mod extend;
pub mod generate;
pub mod info;
pub mod models;
pub mod parity;
pub mod serve;
