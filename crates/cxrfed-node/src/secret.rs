//! The per-site secret that keys patient pseudonyms. Created at first start with 0600
//! permissions; it never leaves the data directory and is never logged.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use cxrfed_imaging::SiteSecret;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("site secret {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "site secret {path} is readable by other users (mode {mode:o}); run `chmod 600 {path}`"
    )]
    Permissions { path: String, mode: u32 },
    #[error(
        "site secret {path} is not 32 bytes; it is damaged. Restore it from backup: pseudonyms depend on it"
    )]
    Damaged { path: String },
    #[error("could not generate random bytes: {0}")]
    Random(String),
}

/// Loads the site secret from `path`, creating it (32 random bytes, mode 0600) if absent.
pub fn load_or_create(path: &Path) -> Result<SiteSecret, SecretError> {
    let display = path.display().to_string();
    let io = |source| SecretError::Io {
        path: display.clone(),
        source,
    };
    match std::fs::read(path) {
        Ok(bytes) => {
            let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(SecretError::Permissions {
                    path: display,
                    mode,
                });
            }
            let bytes: [u8; 32] = bytes.try_into().map_err(|_| SecretError::Damaged {
                path: display.clone(),
            })?;
            Ok(SiteSecret::from_bytes(bytes))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = [0u8; 32];
            getrandom::fill(&mut bytes).map_err(|e| SecretError::Random(e.to_string()))?;
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(io)?;
            }
            // create_new: two nodes starting at once cannot both write a secret.
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io)?;
            file.write_all(&bytes).map_err(io)?;
            file.sync_all().map_err(io)?;
            Ok(SiteSecret::from_bytes(bytes))
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_private_and_stable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("site.secret");
        let a = load_or_create(&path).expect("create");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = load_or_create(&path).expect("load");
        assert_eq!(a.pseudonym("x"), b.pseudonym("x"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(
            load_or_create(&path),
            Err(SecretError::Permissions { .. })
        ));
    }
}
