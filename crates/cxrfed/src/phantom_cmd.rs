//! `cxrfed phantom`: synthetic chest X-rays with exact ground truth (no libtorch needed).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

#[derive(Debug, Args)]
pub struct PhantomArgs {
    /// Output folder (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Number of images.
    #[arg(long, default_value_t = 100)]
    count: u64,
    /// Seed: the same seed gives byte-identical files.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Site profile(s), comma-separated: university (DR, 12-bit, JPEG 2000/explicit LE),
    /// community (CR, MONOCHROME1, 10-bit, implicit LE, no window), icu (portable AP, 14-bit,
    /// RLE, sicker), screening (3000 px, 16-bit, JPEG lossless). Without it: a mix of all.
    #[arg(long)]
    site: Option<String>,
    /// Cap the image width in pixels (keeps the aspect ratio), for quick experiments.
    #[arg(long)]
    max_size: Option<u32>,
    /// Transfer syntax for every image instead of the profile's: explicit, implicit, rle,
    /// jpeg-lossless, j2k.
    #[arg(long)]
    transfer_syntax: Option<String>,
    /// Also write an 8-bit PNG of every image.
    #[arg(long)]
    png: bool,
    /// Also write an 8-bit JPEG of every image.
    #[arg(long)]
    jpeg: bool,
    /// Write the contact sheet (every finding value on one baseline chest) to this PNG.
    #[arg(long)]
    contact_sheet: Option<PathBuf>,
    /// Generator threads [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub fn phantom(args: PhantomArgs) -> anyhow::Result<ExitCode> {
    let encoding = match args.transfer_syntax.as_deref() {
        None => None,
        Some(name) => Some(cxrfed_phantom::Encoding::parse(name).with_context(|| {
            format!(
                "unknown transfer syntax {name:?} (explicit, implicit, rle, jpeg-lossless, j2k)"
            )
        })?),
    };
    let generator = cxrfed_phantom::Generator::new(args.seed, args.site.as_deref())?
        .with_max_columns(args.max_size)
        .with_encoding(encoding);
    let started = std::time::Instant::now();
    let count = args.count;
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let summary = cxrfed_phantom::write_folder(
        &generator,
        &args.out,
        count,
        cxrfed_phantom::Variants {
            png: args.png,
            jpeg: args.jpeg,
        },
        args.threads.unwrap_or_else(cores),
        &|done| {
            if interactive && (done % 10 == 0 || done == count) {
                eprint!("\r{done}/{count} phantoms");
            }
        },
    )?;
    if interactive {
        eprintln!();
    }
    println!(
        "wrote {} images ({} files, {:.1} MiB) to {} in {:.1}s; labels: {}, {}",
        summary.images,
        summary.files,
        summary.bytes as f64 / (1024.0 * 1024.0),
        args.out.display(),
        started.elapsed().as_secs_f64(),
        summary.labels_json.display(),
        summary.labels_csv.display()
    );
    if let Some(path) = args.contact_sheet {
        cxrfed_phantom::sheet::contact_sheet(args.seed)?
            .save(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("contact sheet: {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
