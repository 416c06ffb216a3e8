//! `kino info FILE`: a video's format, size, frames, fps, duration and generation parameters.

use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// An MP4, GIF, PNG, JPEG or WebP file.
    file: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let info = kino_media::probe(&a.file)?;
    let fps = info.fps.map(|f| f.as_f64());
    if a.json {
        let v = serde_json::json!({
            "file": a.file,
            "format": format!("{:?}", info.format).to_lowercase(),
            "width": info.width,
            "height": info.height,
            "frames": info.frame_count,
            "fps": fps,
            "duration_seconds": info.duration_secs,
            "generation": info.metadata,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("file:     {}", a.file.display());
    println!("format:   {:?}", info.format);
    println!("size:     {}x{}", info.width, info.height);
    println!("frames:   {}", info.frame_count);
    if let Some(f) = info.fps {
        println!("fps:      {f}");
    }
    if let Some(d) = info.duration_secs {
        println!("duration: {d:.3} s");
    }
    match &info.metadata {
        Some(serde_json::Value::Object(m)) => {
            println!("generation parameters:");
            for (k, v) in m {
                let v = match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                println!("  {k}: {v}");
            }
        }
        Some(other) => println!("generation parameters: {other}"),
        None => println!("generation parameters: none (not made by Kino)"),
    }
    Ok(())
}
