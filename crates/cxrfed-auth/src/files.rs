//! File handling for keys and certificates: atomic replacement (a watching server never reads
//! half a file) and owner-only private keys.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
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

/// Through a temporary file in the same directory (created 0600 by tempfile, then given
/// `mode`), synced, then renamed over `path`; a failure leaves no temporary file behind.
fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), AuthError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let result = (|| {
        let mut file = tempfile::NamedTempFile::new_in(dir)?;
        file.as_file()
            .set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.as_file().sync_all()?;
        file.persist(path).map_err(|e| e.error)?;
        Ok(())
    })();
    result.map_err(|e: std::io::Error| AuthError::io(path, e))
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
