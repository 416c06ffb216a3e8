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
                if k == "conditioning" {
                    print_conditioning(v);
                    continue;
                }
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

/// The inputs a video was made from (`conditioning` in its metadata, as `kino generate` and
/// `kino serve` write it): one line per file with its role, name, size and sha256.
fn print_conditioning(c: &serde_json::Value) {
    let Some(m) = c.as_object() else {
        println!("  conditioning: {c}");
        return;
    };
    let kind = m.get("kind").and_then(|k| k.as_str()).unwrap_or("?");
    println!("  conditioning: {kind}");
    for (role, label) in [
        ("image", "first image"),
        ("last_image", "last image"),
        ("video", "source video"),
    ] {
        let Some(f) = m.get(role) else { continue };
        let s = |k: &str| f.get(k).and_then(|v| v.as_str()).unwrap_or("?").to_string();
        let mut line = format!("    {label}: {} ({}", s("name"), s("size"));
        if let Some(n) = f.get("frames") {
            line.push_str(&format!(", {n} frames"));
        }
        if let Some(fps) = f.get("fps").and_then(|v| v.as_f64()) {
            line.push_str(&format!(" at {} fps", (fps * 1000.0).round() / 1000.0));
        }
        line.push_str(&format!("), sha256 {}", s("sha256")));
        if let Some(fit) = f.get("fitted").and_then(|v| v.as_str()) {
            line.push_str(&format!("; {fit}"));
        }
        println!("{line}");
    }
    if let Some(st) = m.get("strength") {
        println!("    strength: {st}");
    }
    for (k, v) in m {
        if !["kind", "image", "last_image", "video", "strength"].contains(&k.as_str()) {
            println!("    {k}: {v}");
        }
    }
}
