//! Where a server keeps its files under its data directory, and which environment variables
//! configure it. One place, so `cxrfed node status` (which links no server code) finds the
//! same PID file the node writes.

use std::path::{Path, PathBuf};

/// The two kinds of cxrfed server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    Node,
    Coordinator,
}

impl ServerKind {
    /// `node` or `coordinator`: the PID and log file names, and the word in messages.
    pub fn name(self) -> &'static str {
        match self {
            ServerKind::Node => "node",
            ServerKind::Coordinator => "coordinator",
        }
    }

    /// The prefix of this kind's configuration variables (`CXRFED_NODE_DATA_DIR`, ...). The two
    /// kinds have distinct prefixes: a variable exported for a node never retargets a
    /// coordinator on the same machine.
    pub fn env_prefix(self) -> &'static str {
        match self {
            ServerKind::Node => "CXRFED_NODE_",
            ServerKind::Coordinator => "CXRFED_COORDINATOR_",
        }
    }

    /// The variable that names this kind's data directory.
    pub fn data_dir_env(self) -> &'static str {
        match self {
            ServerKind::Node => "CXRFED_NODE_DATA_DIR",
            ServerKind::Coordinator => "CXRFED_COORDINATOR_DATA_DIR",
        }
    }

    /// The executable that serves this kind (`cxrfed-node`, `cxrfed-coordinator`).
    pub fn binary(self) -> &'static str {
        match self {
            ServerKind::Node => "cxrfed-node",
            ServerKind::Coordinator => "cxrfed-coordinator",
        }
    }

    /// `$XDG_DATA_HOME/cxrfed/KIND`, or `./.cxrfed/KIND`.
    pub fn default_data_dir(self) -> PathBuf {
        dirs::data_local_dir()
            .map(|d| d.join("cxrfed").join(self.name()))
            .unwrap_or_else(|| PathBuf::from(".cxrfed").join(self.name()))
    }

    /// The layout of `data_dir` for this kind.
    pub fn layout(self, data_dir: impl Into<PathBuf>) -> Layout {
        Layout {
            kind: self,
            data_dir: data_dir.into(),
        }
    }
}

/// The variables every server reads for its TLS material, whatever its kind (`CXRFED_CA`,
/// `CXRFED_CERT`, `CXRFED_KEY`, `CXRFED_CRL`): one study's files, shared on purpose.
pub const SHARED_TLS_ENV_PREFIX: &str = "CXRFED_";
pub const SHARED_TLS_KEYS: &[&str] = &["ca", "cert", "key", "crl"];

/// The files of one server's data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    kind: ServerKind,
    data_dir: PathBuf,
}

impl Layout {
    pub fn kind(&self) -> ServerKind {
        self.kind
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The sled store.
    pub fn store_dir(&self) -> PathBuf {
        self.data_dir.join("store")
    }

    /// Written while the server runs (`KIND.pid`).
    pub fn pid_path(&self) -> PathBuf {
        self.data_dir.join(format!("{}.pid", self.kind.name()))
    }

    /// JSON logs (`KIND.log`) and the detached process's output (`serve.out`).
    pub fn log_dir(&self) -> PathBuf {
        self.data_dir.join("logs")
    }

    /// The JSON log file.
    pub fn log_file(&self) -> PathBuf {
        self.log_dir().join(format!("{}.log", self.kind.name()))
    }

    /// A node's site secret (0600).
    pub fn secret_path(&self) -> PathBuf {
        self.data_dir.join("site.secret")
    }

    /// Installed models (node) or the registry's weight files (coordinator).
    pub fn models_dir(&self) -> PathBuf {
        self.data_dir.join("models")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_keep_their_files_and_variables_apart() {
        let node = ServerKind::Node.layout("/d");
        let coordinator = ServerKind::Coordinator.layout("/d");
        assert_eq!(node.pid_path(), PathBuf::from("/d/node.pid"));
        assert_eq!(coordinator.pid_path(), PathBuf::from("/d/coordinator.pid"));
        assert_eq!(node.log_file(), PathBuf::from("/d/logs/node.log"));
        assert_ne!(
            ServerKind::Node.env_prefix(),
            ServerKind::Coordinator.env_prefix()
        );
        assert!(
            ServerKind::Node
                .data_dir_env()
                .starts_with(ServerKind::Node.env_prefix())
        );
        assert!(
            ServerKind::Coordinator
                .data_dir_env()
                .starts_with(ServerKind::Coordinator.env_prefix())
        );
    }
}
