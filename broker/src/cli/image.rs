//! `image`: the packages deployments hand out.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use serde::Serialize;

use super::Ctx;
use crate::api::wire::{Image, ImageKind};

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Upload an image; its id is the SHA-256 of its content. Adding the same content again
    /// returns the existing image
    Add {
        file: PathBuf,
        #[arg(long)]
        name: String,
        /// X.Y.Z
        #[arg(long)]
        version: String,
        #[arg(long, value_parser = ["application", "board-config"])]
        kind: String,
    },
    List,
    /// An image by id, name:X.Y.Z or name:latest
    Show {
        reference: String,
    },
    /// Write an image's content to a file
    Download {
        reference: String,
        /// Where to write it [default: NAME-VERSION.bin in the current directory]
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn kind_str(k: ImageKind) -> &'static str {
    match k {
        ImageKind::Application => "application",
        ImageKind::BoardConfig => "board-config",
    }
}

fn row(i: &Image) -> String {
    format!(
        "{:<64} {:<24} {:<10} {:<12} {:>10}",
        i.id,
        i.name,
        i.version,
        kind_str(i.kind),
        i.size
    )
}

fn header() -> String {
    format!(
        "{:<64} {:<24} {:<10} {:<12} {:>10}",
        "ID", "NAME", "VERSION", "KIND", "BYTES"
    )
}

/// What `image download --output json` prints.
#[derive(Serialize)]
struct Downloaded {
    id: String,
    path: PathBuf,
    bytes: usize,
}

impl ImageCmd {
    pub async fn run(&self, ctx: &Ctx) -> Result<()> {
        match self {
            ImageCmd::Add {
                file,
                name,
                version,
                kind,
            } => {
                let content =
                    std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
                ctx.progress(&format!(
                    "uploading {} ({} bytes)…",
                    file.display(),
                    content.len()
                ));
                let (image, existed) = ctx.api.add_image(name, version, kind, content).await?;
                ctx.print(&image, |i| {
                    format!(
                        "{} image {} ({} {})",
                        if existed { "Existing" } else { "Added" },
                        i.id,
                        i.name,
                        i.version
                    )
                });
            }
            ImageCmd::List => {
                let list = ctx.api.images().await?;
                ctx.print(&list, |l| {
                    let mut out = header();
                    for i in &l.items {
                        out += &format!("\n{}", row(i));
                    }
                    out
                });
            }
            ImageCmd::Show { reference } => {
                let image = ctx.api.image(reference).await?;
                ctx.print(&image, |i| format!("{}\n{}", header(), row(i)));
            }
            ImageCmd::Download { reference, out } => {
                let image = ctx.api.image(reference).await?;
                let bytes = ctx.api.image_content(reference).await?;
                let path = out.clone().unwrap_or_else(|| {
                    PathBuf::from(format!("{}-{}.bin", image.name, image.version))
                });
                std::fs::write(&path, &bytes)
                    .with_context(|| format!("writing {}", path.display()))?;
                let done = Downloaded {
                    id: image.id,
                    path,
                    bytes: bytes.len(),
                };
                ctx.print(&done, |d| {
                    format!("Wrote {} bytes to {}", d.bytes, d.path.display())
                });
            }
        }
        Ok(())
    }
}
