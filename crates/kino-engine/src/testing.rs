//! Helpers for parity tests: relative error and the fixture folder.

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

/// ‖out − ref‖ / ‖ref‖ over all elements, computed in f64.
pub fn rel_error(out: &Tensor, reference: &Tensor) -> crate::Result<f64> {
    if out.dims() != reference.dims() {
        return Err(crate::Error::InvalidRequest(format!(
            "shape {:?} does not match the reference shape {:?}",
            out.dims(),
            reference.dims()
        )));
    }
    let a = out.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let b = reference
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(&b) {
        num += (x - y) * (x - y);
        den += y * y;
    }
    if den == 0.0 {
        return Ok(if num == 0.0 { 0.0 } else { f64::INFINITY });
    }
    Ok((num / den).sqrt())
}

/// `fixtures/data` at the repository root.
pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/data")
}

/// The strings of a fixture's JSON array (e.g. `case.json`'s prompt lists); empty if it is none.
pub fn json_strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Copies a folder and everything below it (tests edit copies of fixture model folders).
pub fn copy_dir(from: &Path, to: &Path) -> crate::Result<()> {
    let io = |e: std::io::Error| crate::Error::InvalidRequest(format!("{}: {e}", from.display()));
    std::fs::create_dir_all(to).map_err(io)?;
    for e in std::fs::read_dir(from).map_err(io)? {
        let e = e.map_err(io)?;
        if e.file_type().map_err(io)?.is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()))?;
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).map_err(io)?;
        }
    }
    Ok(())
}

/// Writes the random weights ([`crate::loading::RandomWeights`], seed `seed`) that `build` asks
/// for to a safetensors file, so tests can make real-size model folders without a download.
pub fn save_random_weights(
    seed: u64,
    path: &Path,
    build: impl FnOnce(candle_nn::VarBuilder<'static>) -> candle_core::Result<()>,
) -> crate::Result<()> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use candle_core::{Device, Shape};
    use candle_nn::var_builder::SimpleBackend;

    struct Recording {
        random: Box<dyn SimpleBackend>,
        seen: Arc<Mutex<HashMap<String, Tensor>>>,
    }
    impl SimpleBackend for Recording {
        fn get(
            &self,
            s: Shape,
            name: &str,
            h: candle_nn::Init,
            dtype: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            let t = self.random.get(s, name, h, dtype, dev)?;
            if let Ok(mut seen) = self.seen.lock() {
                seen.insert(name.to_string(), t.clone());
            }
            Ok(t)
        }
        fn get_unchecked(
            &self,
            name: &str,
            dtype: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            self.random.get_unchecked(name, dtype, dev)
        }
        fn contains_tensor(&self, name: &str) -> bool {
            self.random.contains_tensor(name)
        }
    }
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let random = crate::loading::RandomWeights::backend(seed);
    let backend: Box<dyn SimpleBackend> = Box::new(Recording {
        random,
        seen: seen.clone(),
    });
    let vb = candle_nn::VarBuilder::from_backend(backend, DType::F32, Device::Cpu);
    build(vb)?;
    let seen = seen
        .lock()
        .map_err(|_| crate::Error::InvalidRequest("poisoned".into()))?;
    candle_core::safetensors::save(&seen, path)?;
    Ok(())
}
