//! The data directory (`store.path`) holds every conversation agentbus has seen, its
//! sessions, pairings and generated tokens, so it belongs to agentbus's user alone:
//! directories 0700, files 0600.
//!
//! Two things make it so. The binary sets its umask to 077 before anything else
//! ([`restrict_umask`]), so every file created afterwards — including those the embedded
//! engines (fjall, sled) create themselves, which take no mode — is private whatever
//! umask the shell or service manager gave. And the directories agentbus creates itself,
//! and the files it opens itself, ask for 0700 / 0600 explicitly ([`create_dir`],
//! [`FILE_MODE`]), so a library user that keeps its own umask gets a private directory
//! too. A directory an older version created wider is not changed behind the operator's
//! back: [`exposed_entries`] finds what group or others can reach, and `agentbus check` and
//! `serve` say so.

use std::io;
use std::path::{Path, PathBuf};

/// The mode of every directory agentbus creates in the data directory.
pub const DIR_MODE: u32 = 0o700;

/// The mode of every file agentbus creates in the data directory.
pub const FILE_MODE: u32 = 0o600;

/// The permission bits that give group or others any access.
pub const SHARED_BITS: u32 = 0o077;

/// Sets this process's umask to 077, so every file and directory it creates from now on
/// is private to its user; returns the mask it had. For the binary's first line: the
/// mask is process-wide and read by every thread.
pub fn restrict_umask() -> u32 {
    let previous = rustix::process::umask(rustix::fs::Mode::from_raw_mode(SHARED_BITS as _));
    previous.as_raw_mode() as u32
}

/// Creates `dir` and any missing parents with mode 0700. An existing directory is left as
/// it is (see [`exposed_entries`]).
pub fn create_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
}

/// An entry of the data directory that group or others can access.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exposed {
    pub path: PathBuf,
    /// Its permission bits (`0o755`, say).
    pub mode: u32,
}

/// Every entry under `dir`, `dir` itself first, whose mode gives group or others any
/// access, in walk order. Symbolic links are not followed (their own mode means nothing);
/// entries that vanish during the walk (the store rotating a file) are skipped.
pub fn exposed_entries(dir: &Path) -> io::Result<Vec<Exposed>> {
    use std::os::unix::fs::PermissionsExt;
    let mut exposed = Vec::new();
    let mut pending = vec![dir.to_owned()];
    let mut top = true;
    while let Some(path) = pending.pop() {
        let metadata = match std::fs::symlink_metadata(&path) {
            Ok(metadata) => metadata,
            Err(e) if e.kind() == io::ErrorKind::NotFound && !top => continue,
            Err(e) => return Err(e),
        };
        top = false;
        if metadata.file_type().is_symlink() {
            continue;
        }
        let mode = metadata.permissions().mode() & 0o7777;
        if mode & SHARED_BITS != 0 {
            exposed.push(Exposed {
                path: path.clone(),
                mode,
            });
        }
        if metadata.is_dir() {
            let entries = match std::fs::read_dir(&path) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let mut children: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
            // Popped from the end: sorted backwards, walked in name order.
            children.sort_unstable_by(|a, b| b.cmp(a));
            pending.extend(children);
        }
    }
    Ok(exposed)
}

/// Sets `path`'s permission bits (tests of what a wider mode does).
#[cfg(test)]
pub(crate) fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn created_directories_are_private_down_from_the_first_missing_one() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b/data");
        create_dir(&dir).unwrap();
        for path in [root.path().join("a"), root.path().join("a/b"), dir.clone()] {
            assert_eq!(mode_of(&path), DIR_MODE, "{}", path.display());
        }
        // Again: an existing directory is fine, and left alone.
        set_mode(&dir, 0o750);
        create_dir(&dir).unwrap();
        assert_eq!(mode_of(&dir), 0o750);
    }

    #[test]
    fn every_shared_entry_is_found_and_private_ones_are_not() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("data");
        create_dir(&dir.join("fjall/event-log")).unwrap();
        let private = dir.join("fjall/event-log/0000000000000000.log");
        std::fs::write(&private, b"x").unwrap();
        set_mode(&private, 0o600);
        assert_eq!(exposed_entries(&dir).unwrap(), Vec::new());

        let tokens = dir.join("appservice-tokens.json");
        std::fs::write(&tokens, b"{}").unwrap();
        set_mode(&tokens, 0o640);
        set_mode(&dir.join("fjall"), 0o701);
        std::os::unix::fs::symlink("/etc/passwd", dir.join("link")).unwrap();
        assert_eq!(
            exposed_entries(&dir).unwrap(),
            vec![
                Exposed {
                    path: tokens,
                    mode: 0o640
                },
                Exposed {
                    path: dir.join("fjall"),
                    mode: 0o701
                },
            ]
        );

        set_mode(&dir, 0o755);
        assert_eq!(exposed_entries(&dir).unwrap()[0].path, dir);
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        let root = tempfile::tempdir().unwrap();
        let error = exposed_entries(&root.path().join("nope")).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
    }
}
