//! The data directory holds every device's keys (the registry in `fleethub.redb`), the admin
//! token, the TLS private key, twins and queued messages: readable by the hub's user only.
//!
//! At start the directory is created 0700, the process umask is set to 077 so everything the
//! hub creates later (queue log generations, images, new stores) is 0600/0700 whatever umask
//! it was started with, and anything already there with wider modes is narrowed and logged.

use std::path::{Path, PathBuf};

/// The main store: registry, twins, fleet, images, deployments, sessions, C2D.
pub const STORE_FILE: &str = "fleethub.redb";
/// The store-and-forward queues (with their log in `queues.log/`).
pub const QUEUES_FILE: &str = "queues.redb";
/// The events endpoint's retained log (segment files).
pub const EVENTS_DIR: &str = "events";
/// The operator's bearer token (API) and service-connection password (MQTT).
pub const ADMIN_TOKEN_FILE: &str = "admin-token";
/// The addresses actually bound, for the CLI and tests (port 0 resolved).
pub const ENDPOINTS_FILE: &str = "endpoints.json";

/// Files and directories whose modes were narrowed.
#[derive(Debug, Default)]
pub struct Narrowed {
    pub paths: Vec<PathBuf>,
}

/// Creates `dir` (0700) if needed, sets the umask, and narrows what is there.
pub fn secure(dir: &Path) -> std::io::Result<Narrowed> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        // Owner only for everything this process creates from now on.
        // SAFETY: umask only swaps the process's file-mode mask; it cannot fail.
        unsafe {
            libc::umask(0o077);
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let mut narrowed = Narrowed::default();
        narrow(dir, &mut narrowed)?;
        Ok(narrowed)
    }
    #[cfg(not(unix))]
    {
        std::fs::create_dir_all(dir)?;
        Ok(Narrowed::default())
    }
}

#[cfg(unix)]
fn narrow(path: &Path, narrowed: &mut Narrowed) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        // Not followed: what it points to is the operator's choice.
        return Ok(());
    }
    let mode = meta.permissions().mode() & 0o777;
    let want = if meta.is_dir() { 0o700 } else { 0o600 };
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o700 | want))?;
        narrowed.paths.push(path.to_path_buf());
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            narrow(&entry?.path(), narrowed)?;
        }
    }
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &std::path::Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn wider_modes_are_narrowed_to_the_owner() {
        let dir =
            std::env::temp_dir().join(format!("fleethub-datadir-{:x}", rand::random::<u64>()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("a.redb"), "x").unwrap();
        std::fs::write(dir.join("sub/b"), "x").unwrap();
        for (p, m) in [
            (dir.clone(), 0o755),
            (dir.join("sub"), 0o775),
            (dir.join("a.redb"), 0o644),
            (dir.join("sub/b"), 0o666),
        ] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m)).unwrap();
        }
        let narrowed = super::secure(&dir).unwrap();
        assert_eq!(narrowed.paths.len(), 4);
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("sub")), 0o700);
        assert_eq!(mode(&dir.join("a.redb")), 0o600);
        assert_eq!(mode(&dir.join("sub/b")), 0o600);
        // Already narrow: nothing to report the second time.
        assert!(super::secure(&dir).unwrap().paths.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
