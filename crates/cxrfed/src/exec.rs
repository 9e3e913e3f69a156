//! git-style sibling binaries: `cxrfed node serve ...` runs `cxrfed-node serve ...` and
//! `cxrfed model ...` runs `cxrfed-node model ...`, so this CLI links no libtorch while docs,
//! scripts and units keep their commands. The sibling replaces this process (exec): its PID,
//! signals, exit code and output are the command's own.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use clap::Args;

/// Every argument after the subcommand, handed to the sibling unparsed (its own `--help`
/// included).
#[derive(Debug, Args)]
#[command(disable_help_flag = true)]
pub struct PassThrough {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    args: Vec<OsString>,
}

/// Where the sibling is: next to this executable (a build or an install puts them together),
/// else on PATH.
fn locate(binary: &str) -> Option<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(binary)))
        .filter(|path| path.is_file());
    beside.or_else(|| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(binary))
                .find(|path| path.is_file())
        })
    })
}

/// Replaces this process with `binary PREFIX... ARGS...`; returns only when that fails. The
/// sibling's argv[0] is `shown_as` (`cxrfed node`), so its help and usage lines name the
/// command the user typed.
pub fn sibling(
    binary: &str,
    shown_as: &str,
    prefix: &[&str],
    args: PassThrough,
) -> anyhow::Result<ExitCode> {
    use std::os::unix::process::CommandExt;
    let Some(path) = locate(binary) else {
        bail!(
            "{binary} was not found next to {} or on PATH (install it beside cxrfed)",
            std::env::current_exe()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| "cxrfed".into())
        );
    };
    let error = std::process::Command::new(&path)
        .arg0(shown_as)
        .args(prefix)
        .args(args.args)
        .exec();
    bail!("cannot run {}: {error}", path.display())
}
