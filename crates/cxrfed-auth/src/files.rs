//! File handling for keys and certificates: atomic replacement (a watching server never reads
//! half a file) and owner-only private keys.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::AuthError;

pub fn create_private_dir(dir: &Path) -> Result<(), AuthError> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| AuthError::io(dir, e))
}

/// Writes a private key readable by its owner only (0600), atomically.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), AuthError> {
    write_atomic(path, contents, 0o600)
}

/// Writes a certificate, CRL or profile (0644), atomically.
pub fn write_public(path: &Path, contents: &[u8]) -> Result<(), AuthError> {
    write_atomic(path, contents, 0o644)
}

fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), AuthError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // The mode of a pre-existing temporary file is not changed by `open`.
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| AuthError::io(path, e))
}

pub fn read_to_string(path: &Path) -> Result<String, AuthError> {
    std::fs::read_to_string(path).map_err(|e| AuthError::io(path, e))
}

/// Reads a PEM private key, refusing one that its group or others can read: a key anyone on
/// the machine can copy is an identity anyone can take.
pub fn read_private_key_pem(path: &Path) -> Result<String, AuthError> {
    check_private_mode(path)?;
    read_to_string(path)
}

pub fn check_private_mode(path: &Path) -> Result<(), AuthError> {
    let meta = std::fs::metadata(path).map_err(|e| AuthError::io(path, e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(AuthError::KeyPermissions {
            path: path.display().to_string(),
            mode,
        });
    }
    Ok(())
}
