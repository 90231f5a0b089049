//! Secret key files (the platform master key, the audit key): hex text in a regular file
//! only its owner may read, opened without following links and read into memory that wipes
//! itself; created once, 0600, synced with its directory entry.

use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use zeroize::Zeroizing;

/// Why a key file cannot be used.
pub(crate) enum KeyFileError {
    Io(std::io::Error),
    /// A symbolic link (someone who may write the directory could point it at a key of
    /// their choosing), a directory, or anything else that is not a regular file.
    NotAFile,
    /// Group or others may read it.
    Permissions,
    /// Not hex text.
    Malformed,
}

/// The key bytes in the file, or `None` if there is no file.
pub(crate) fn read(path: &Path) -> Result<Option<Zeroizing<Vec<u8>>>, KeyFileError> {
    let mut file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) if error.raw_os_error() == Some(libc::ELOOP) => {
            return Err(KeyFileError::NotAFile)
        }
        Err(error) => return Err(KeyFileError::Io(error)),
    };
    let metadata = file.metadata().map_err(KeyFileError::Io)?;
    if !metadata.is_file() {
        return Err(KeyFileError::NotAFile);
    }
    if metadata.permissions().mode() & 0o077 != 0 {
        return Err(KeyFileError::Permissions);
    }
    let mut text = Zeroizing::new(Vec::with_capacity(256));
    Read::take(&mut file, 4096)
        .read_to_end(&mut text)
        .map_err(KeyFileError::Io)?;
    let bytes = hex::decode(text.trim_ascii()).map_err(|_| KeyFileError::Malformed)?;
    Ok(Some(Zeroizing::new(bytes)))
}

/// Writes `key` as hex to a new file (0600; refused if the path exists), synced, and its
/// directory entry synced too: the key may be needed as soon as this returns.
pub(crate) fn create(path: &Path, key: &[u8]) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    let text = Zeroizing::new(hex::encode(key));
    file.write_all(text.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
