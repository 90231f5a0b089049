//! Master-key providers. The `local` provider keeps the platform master key in a file of the
//! data directory (0600), created on first start.

use std::path::{Path, PathBuf};

use crate::kek::{CryptoError, Kek, KEK_BYTES};
use crate::key_file::{self, KeyFileError};

pub const MASTER_KEY_FILE: &str = "master.key";

#[derive(Debug, thiserror::Error)]
pub enum MasterKeyError {
    #[error("cannot read or create the master key file {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the master key file {path} is not {KEK_BYTES} hex-encoded bytes")]
    Malformed { path: String },
    #[error("the master key file {path} must be readable by its owner only (mode 0600)")]
    Permissions { path: String },
    #[error(
        "the master key file {path} must be a regular file, not a symbolic link or anything else"
    )]
    NotAFile { path: String },
}

/// The platform master key, held in memory for the process's life (zeroized on drop).
#[derive(Debug, Clone)]
pub struct LocalMasterKey {
    key: Kek,
    path: PathBuf,
}

impl LocalMasterKey {
    /// Loads the key file, or creates it (0600) when `create` is true and it does not exist.
    pub fn load(path: &Path, create: bool) -> Result<Option<LocalMasterKey>, MasterKeyError> {
        let shown = || path.display().to_string();
        let bytes = match key_file::read(path) {
            Ok(Some(bytes)) => bytes,
            Ok(None) if create => {
                let created = LocalMasterKey::generate(path);
                created.write_new()?;
                return Ok(Some(created));
            }
            Ok(None) => return Ok(None),
            Err(KeyFileError::Io(source)) => {
                return Err(MasterKeyError::Io {
                    path: shown(),
                    source,
                })
            }
            Err(KeyFileError::NotAFile) => return Err(MasterKeyError::NotAFile { path: shown() }),
            Err(KeyFileError::Permissions) => {
                return Err(MasterKeyError::Permissions { path: shown() })
            }
            Err(KeyFileError::Malformed) => {
                return Err(MasterKeyError::Malformed { path: shown() })
            }
        };
        let key =
            Kek::from_bytes(&bytes).map_err(|_| MasterKeyError::Malformed { path: shown() })?;
        Ok(Some(LocalMasterKey {
            key,
            path: path.to_owned(),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A platform key held elsewhere than in a file (a KMS wraps it): it has no path.
    pub fn held(key: Kek) -> LocalMasterKey {
        LocalMasterKey {
            key,
            path: PathBuf::new(),
        }
    }

    /// The key itself, to hand to the KMS that holds it.
    pub fn as_kek(&self) -> &Kek {
        &self.key
    }

    /// Where the key is kept from now on (a rotated key moves from `master.key.new`).
    pub fn set_path(&mut self, path: &Path) {
        path.clone_into(&mut self.path);
    }

    /// A new random key that lives at `path` once written there with `write_new`.
    pub fn generate(path: &Path) -> LocalMasterKey {
        LocalMasterKey {
            key: Kek::generate(),
            path: path.to_owned(),
        }
    }

    /// Writes the key to its path, which must not exist yet (0600, synced with its
    /// directory entry: the database will need this key once it commits).
    pub fn write_new(&self) -> Result<(), MasterKeyError> {
        self.key
            .with_bytes(|bytes| key_file::create(&self.path, bytes))
            .map_err(|source| MasterKeyError::Io {
                path: self.path.display().to_string(),
                source,
            })
    }

    pub fn fingerprint(&self) -> String {
        self.key.fingerprint()
    }

    /// Wraps an organization's key, bound to the organization and version (the local
    /// equivalent of a KMS encryption context).
    pub fn wrap(&self, org_key: &Kek, org_id: &str, version: u32) -> Result<Vec<u8>, CryptoError> {
        let version = version.to_string();
        self.key.wrap(
            org_key,
            &[b"ekm-org-kek-v1", org_id.as_bytes(), version.as_bytes()],
        )
    }

    /// Wraps a key with explicit associated data (the master-key provider's binding).
    pub fn wrap_bound(&self, key: &Kek, binding: &[Vec<u8>]) -> Result<Vec<u8>, CryptoError> {
        let parts: Vec<&[u8]> = binding.iter().map(Vec::as_slice).collect();
        self.key.wrap(key, &parts)
    }

    pub fn unwrap_bound(&self, wrapped: &[u8], binding: &[Vec<u8>]) -> Result<Kek, CryptoError> {
        let parts: Vec<&[u8]> = binding.iter().map(Vec::as_slice).collect();
        self.key.unwrap_key(wrapped, &parts)
    }

    /// Seals a customer KMS's ciphertext of an organization key (BYOK): both this key and
    /// the customer's are then needed to open it, so rotating this key retires every old
    /// copy of the database on every tier (ADR 0013).
    pub fn seal_outer(&self, inner: &[u8], binding: &[Vec<u8>]) -> Result<Vec<u8>, CryptoError> {
        let mut headers: Vec<&[u8]> = vec![b"ekm-byok-outer-v1"];
        headers.extend(binding.iter().map(Vec::as_slice));
        self.key.seal(&headers, inner)
    }

    pub fn open_outer(
        &self,
        sealed: &[u8],
        binding: &[Vec<u8>],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, CryptoError> {
        let mut headers: Vec<&[u8]> = vec![b"ekm-byok-outer-v1"];
        headers.extend(binding.iter().map(Vec::as_slice));
        self.key.open(&headers, sealed)
    }

    pub fn unwrap(&self, wrapped: &[u8], org_id: &str, version: u32) -> Result<Kek, CryptoError> {
        let version = version.to_string();
        self.key.unwrap_key(
            wrapped,
            &[b"ekm-org-kek-v1", org_id.as_bytes(), version.as_bytes()],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_with_owner_only_permissions_and_reloaded() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MASTER_KEY_FILE);
        assert!(LocalMasterKey::load(&path, false).unwrap().is_none());
        let created = LocalMasterKey::load(&path, true).unwrap().unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = LocalMasterKey::load(&path, true).unwrap().unwrap();
        assert_eq!(created.fingerprint(), again.fingerprint());
        let org = Kek::generate();
        let wrapped = created.wrap(&org, "org", 1).unwrap();
        assert_eq!(
            again.unwrap(&wrapped, "org", 1).unwrap().fingerprint(),
            org.fingerprint()
        );
        assert!(again.unwrap(&wrapped, "other-org", 1).is_err());
    }

    #[test]
    fn a_symbolic_link_is_refused_even_to_a_good_key() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("elsewhere.key");
        LocalMasterKey::load(&real, true).unwrap();
        let link = dir.path().join(MASTER_KEY_FILE);
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(matches!(
            LocalMasterKey::load(&link, false),
            Err(MasterKeyError::NotAFile { .. } | MasterKeyError::Io { .. })
        ));
        assert!(LocalMasterKey::load(&link, true).is_err());
        // A directory in its place is not a key either.
        let dir_key = dir.path().join("dir.key");
        std::fs::create_dir(&dir_key).unwrap();
        assert!(LocalMasterKey::load(&dir_key, false).is_err());
    }

    #[test]
    fn a_world_readable_key_file_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MASTER_KEY_FILE);
        LocalMasterKey::load(&path, true).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            LocalMasterKey::load(&path, false),
            Err(MasterKeyError::Permissions { .. })
        ));
    }
}
