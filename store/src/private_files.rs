//! Files and directories only their owner may read: the data directory (0700), the SQLite
//! database with its WAL and shared-memory files, the lock and the operator token (0600).
//! The modes are set whatever the umask, and again on every start, so that a directory
//! made by an older version or by hand is taken back.

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of every file EKM keeps in its data directory.
pub const FILE_MODE: u32 = 0o600;
/// Mode of the data directory.
pub const DIR_MODE: u32 = 0o700;

/// Creates `dir` (and its parents) if needed, and makes it the owner's only.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    if !dir.exists() {
        DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)?;
    }
    std::fs::set_permissions(dir, Permissions::from_mode(DIR_MODE))
}

/// Sets `path` to 0600 if it exists.
pub fn restrict_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::set_permissions(path, Permissions::from_mode(FILE_MODE)) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Opens (creating if needed) `path` for writing without truncating it, 0600.
pub fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .open(path)?;
    file.set_permissions(Permissions::from_mode(FILE_MODE))?;
    Ok(file)
}

/// The SQLite database at `path` and its companions, before SQLite opens them. SQLite
/// creates a new database 0644 (less the umask) and gives `-wal`, `-shm` and `-journal`
/// the database file's mode, so an empty 0600 database file is enough for new ones;
/// existing ones are set to 0600 too.
pub fn prepare_sqlite_files(path: &Path) -> std::io::Result<()> {
    drop(open_private(path)?);
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut companion = path.as_os_str().to_owned();
        companion.push(suffix);
        restrict_if_present(&PathBuf::from(companion))?;
    }
    Ok(())
}

/// Writes `contents` and a newline to `path` atomically, 0600: a temporary file beside
/// it, synced, renamed over it, and the directory synced. A reader sees the old contents
/// or the new, never a part.
pub fn write_private_atomically(path: &Path, contents: &str) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    // A leftover from an interrupted write is replaced.
    match std::fs::remove_file(&temporary) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(&temporary)?;
    file.set_permissions(Permissions::from_mode(FILE_MODE))?;
    file.write_all(contents.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temporary, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn modes_are_set_whatever_was_there() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a").join("data");
        private_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        std::fs::set_permissions(&dir, Permissions::from_mode(0o755)).unwrap();
        private_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);

        let db = dir.join("ekm.db");
        std::fs::write(&db, b"x").unwrap();
        std::fs::write(dir.join("ekm.db-wal"), b"x").unwrap();
        for path in [&db, &dir.join("ekm.db-wal")] {
            std::fs::set_permissions(path, Permissions::from_mode(0o644)).unwrap();
        }
        prepare_sqlite_files(&db).unwrap();
        assert_eq!(mode(&db), 0o600);
        assert_eq!(mode(&dir.join("ekm.db-wal")), 0o600);
        assert_eq!(std::fs::read(&db).unwrap(), b"x", "nothing is truncated");
        assert!(!dir.join("ekm.db-shm").exists());
    }

    #[test]
    fn an_atomic_write_replaces_the_whole_file_and_leaves_it_private() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("operator.token");
        std::fs::write(&path, "old\n").unwrap();
        std::fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
        write_private_atomically(&path, "new").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new\n");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
    }
}
