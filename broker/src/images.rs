//! Image packages: the artifacts deployments hand to devices (applications, board
//! configurations).
//!
//! An image's id is the SHA-256 of its content, so an id always means the same bytes. Images
//! are immutable: adding the same content again returns the existing image, and a (name,
//! version) pair, once given, can never point at other content. `name:latest` resolves to
//! the highest version of a name, so a deployment can pin an exact image or follow a line.
//!
//! Content lives in `data_dir/images/{id}`, written to a temporary file, fsynced and renamed
//! before the metadata (in redb) is committed: an image the API acknowledged is complete on
//! disk, and a crash mid-upload leaves at most a stray temporary file.
//!
//! On a cluster node ([`Images::share`]) the records live in a table the nodes share and
//! the content in the cluster's PostgreSQL too (`cluster::images`); `images/` is then this
//! node's copy of what it has served or taken in. An add takes the table's cluster-wide lock,
//! so "a name and version never change content" holds across nodes.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use crate::storage::Store;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cluster::catalog::{json, Catalog};
use crate::cluster::rows::{Heard, SharedRows};
use crate::registry::now_rfc3339;
use crate::storage::JsonTable;

/// Key: image id (hex SHA-256). Value: JSON [`Image`].
const IMAGES: JsonTable<Image> = JsonTable::new("images");

/// Largest image accepted, in bytes.
pub const MAX_IMAGE_BYTES: usize = 256 * 1024 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    #[error("invalid {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("{0}")]
    Conflict(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("store: {0}")]
    Store(String),
}

crate::storage::store_errors!(ImageError, std::io::Error);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImageKind {
    Application,
    BoardConfig,
}

impl ImageKind {
    pub fn parse(s: &str) -> Result<ImageKind, ImageError> {
        match s {
            "application" => Ok(ImageKind::Application),
            "board-config" => Ok(ImageKind::BoardConfig),
            other => Err(ImageError::Invalid {
                field: "kind",
                message: format!("'{other}': expected application or board-config"),
            }),
        }
    }
}

/// `X.Y.Z`, compared numerically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(pub u64, pub u64, pub u64);

impl Version {
    pub fn parse(s: &str) -> Result<Version, ImageError> {
        let bad = || ImageError::Invalid {
            field: "version",
            message: format!("'{s}' is not X.Y.Z (three non-negative integers)"),
        };
        let mut parts = s.split('.');
        let mut next = || -> Result<u64, ImageError> {
            let p = parts.next().ok_or_else(bad)?;
            if p.is_empty()
                || !p.bytes().all(|b| b.is_ascii_digit())
                || (p.len() > 1 && p.starts_with('0'))
            {
                return Err(bad());
            }
            p.parse().map_err(|_| bad())
        };
        let v = Version(next()?, next()?, next()?);
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(v)
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// Image names: 1 to 64 characters of ASCII letters, digits, `-`, `_` and `.` (no `:`,
/// which separates a name from a version in a reference).
pub fn check_name(s: &str) -> Result<(), ImageError> {
    let invalid = |message: String| ImageError::Invalid {
        field: "name",
        message,
    };
    if s.is_empty() || s.len() > 64 {
        return Err(invalid(format!("'{s}' must be 1 to 64 characters")));
    }
    if let Some((i, c)) = s
        .chars()
        .enumerate()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(invalid(format!(
            "'{s}': character {} ({c:?}) is not a letter, digit, '-', '_' or '.'",
            i + 1
        )));
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Image {
    /// Hex SHA-256 of the content.
    pub id: String,
    pub name: String,
    pub version: String,
    pub kind: ImageKind,
    pub size: u64,
    pub created_time: String,
}

impl Image {
    fn version(&self) -> Version {
        Version::parse(&self.version).unwrap_or(Version(0, 0, 0))
    }
}

/// What an add did.
#[derive(Debug, PartialEq, Eq)]
pub enum Added {
    New(Image),
    /// The same content was added before, with the same name, version and kind.
    Existing(Image),
}

pub struct Images {
    db: Arc<Store>,
    dir: PathBuf,
    by_id: RwLock<BTreeMap<String, Image>>,
    writer: Mutex<()>,
    /// On a cluster node: the table the nodes share (`cluster::catalog`) and the content
    /// beside it.
    shared: std::sync::OnceLock<Catalog>,
}

impl Images {
    pub fn open(db: Arc<Store>, dir: &Path) -> Result<Images, ImageError> {
        std::fs::create_dir_all(dir)?;
        let by_id: BTreeMap<String, Image> = IMAGES.load::<ImageError>(&db)?.into_iter().collect();
        Ok(Images {
            db,
            dir: dir.to_path_buf(),
            by_id: RwLock::new(by_id),
            writer: Mutex::new(()),
            shared: std::sync::OnceLock::new(),
        })
    }

    /// Makes this catalog a cluster node's: records and content live in the cluster's
    /// PostgreSQL from now on. The first node of a new cluster brings its own.
    pub fn share(&self, rows: Arc<SharedRows>) -> Result<(), ImageError> {
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        rows.create_image_content().map_err(ImageError::Store)?;
        // Content first, outside the table's lock (the lock holds the table's connection).
        let (existing, _) = rows.load().map_err(ImageError::Store)?;
        if existing.is_empty() {
            for image in self.read().values() {
                let content = std::fs::read(self.dir.join(&image.id))?;
                rows.put_image_content(&image.id, &content)
                    .map_err(ImageError::Store)?;
            }
        }
        let catalog = Catalog::share_into(rows, &self.by_id).map_err(ImageError::Store)?;
        let _ = self.shared.set(catalog);
        Ok(())
    }

    /// The shared table, on a cluster node.
    pub fn shared_rows(&self) -> Option<Arc<SharedRows>> {
        self.shared.get().map(Catalog::rows)
    }

    /// Applies what another node changed (newer records only).
    pub fn heard(&self, heard: Heard) {
        if let Some(catalog) = self.shared.get() {
            let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            catalog.heard_into(heard, &self.by_id);
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Image>> {
        self.by_id.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds an image, or returns the one with this content.
    pub fn add(
        &self,
        name: &str,
        version: &str,
        kind: ImageKind,
        content: &[u8],
    ) -> Result<Added, ImageError> {
        check_name(name)?;
        let v = Version::parse(version)?;
        if content.is_empty() {
            return Err(ImageError::Invalid {
                field: "content",
                message: "an image cannot be empty".into(),
            });
        }
        let id = hex(&Sha256::digest(content));
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        // On a cluster node: the content first (by digest, so a refused add leaves only
        // bytes nobody names), then the checks and the record under the cluster-wide lock,
        // against the table as it is.
        let held = match self.shared.get() {
            Some(catalog) => {
                if self.get(&id).is_none() {
                    catalog
                        .rows()
                        .put_image_content(&id, content)
                        .map_err(ImageError::Store)?;
                }
                Some(catalog.hold_into(&self.by_id).map_err(ImageError::Store)?)
            }
            None => None,
        };
        if let Some(existing) = self.get(&id) {
            if existing.name == name && existing.version() == v && existing.kind == kind {
                return Ok(Added::Existing(existing));
            }
            return Err(ImageError::Conflict(format!(
                "this content is already image {} ({} {})",
                existing.id, existing.name, existing.version
            )));
        }
        if let Some(other) = self
            .read()
            .values()
            .find(|i| i.name == name && i.version() == v)
        {
            return Err(ImageError::Conflict(format!(
                "{name} {v} is already image {}; a name and version never change content \
                 (add a new version)",
                other.id
            )));
        }
        // Content first, durable, then the record that makes it visible.
        let path = self.dir.join(&id);
        let tmp = self.dir.join(format!("{id}.tmp"));
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(content)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        let image = Image {
            id: id.clone(),
            name: name.to_string(),
            version: v.to_string(),
            kind,
            size: content.len() as u64,
            created_time: now_rfc3339(),
        };
        match (held, self.shared.get()) {
            (Some(held), Some(catalog)) => catalog
                .commit(held, vec![(id.clone(), Some(json(&image)))])
                .map_err(ImageError::Store)?,
            _ => {
                let tx = self.db.begin_write()?;
                IMAGES.put::<ImageError>(&tx, &id, &image)?;
                tx.commit()?;
            }
        }
        self.by_id
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, image.clone());
        Ok(Added::New(image))
    }

    pub fn get(&self, id: &str) -> Option<Image> {
        self.read().get(id).cloned()
    }

    /// Every image, by name then version.
    pub fn list(&self) -> Vec<Image> {
        let mut v: Vec<Image> = self.read().values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name).then(a.version().cmp(&b.version())));
        v
    }

    /// An image by id, `name:X.Y.Z`, or `name:latest` (the highest version of that name).
    pub fn resolve(&self, reference: &str) -> Result<Image, ImageError> {
        if let Some(i) = self.get(reference) {
            return Ok(i);
        }
        let Some((name, version)) = reference.split_once(':') else {
            return Err(ImageError::NotFound(format!(
                "image '{reference}' (give an id, name:X.Y.Z or name:latest)"
            )));
        };
        let images = self.read();
        let named = images.values().filter(|i| i.name == name);
        let found = if version == "latest" {
            named.max_by(|a, b| a.version().cmp(&b.version()).then(Ordering::Equal))
        } else {
            let v = Version::parse(version)?;
            named.into_iter().find(|i| i.version() == v)
        };
        found
            .cloned()
            .ok_or_else(|| ImageError::NotFound(format!("image '{reference}'")))
    }

    /// The content of an image.
    pub fn content(&self, image: &Image) -> Result<Vec<u8>, ImageError> {
        let path = self.dir.join(&image.id);
        match (std::fs::read(&path), self.shared.get()) {
            (Ok(bytes), _) => Ok(bytes),
            // Taken in by another node: fetched by digest once, kept here after.
            (Err(e), Some(catalog)) if e.kind() == std::io::ErrorKind::NotFound => {
                let bytes = catalog
                    .rows()
                    .image_content(&image.id)
                    .map_err(ImageError::Store)?
                    .ok_or_else(|| {
                        ImageError::NotFound(format!("content of image {}", image.id))
                    })?;
                let tmp = self.dir.join(format!("{}.tmp", image.id));
                std::fs::write(&tmp, &bytes)?;
                std::fs::rename(&tmp, &path)?;
                Ok(bytes)
            }
            (Err(e), _) => Err(e.into()),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(Version::parse("1.2.3").unwrap(), Version(1, 2, 3));
        assert!(Version::parse("1.10.0").unwrap() > Version::parse("1.9.9").unwrap());
        for bad in [
            "1.2",
            "1.2.3.4",
            "1.a.3",
            "",
            "01.2.3",
            "1..3",
            "-1.2.3",
            "1.2.3-rc1",
        ] {
            assert!(Version::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names() {
        assert!(check_name("blink-app_v2.bin").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a:b")
            .unwrap_err()
            .to_string()
            .contains("character 2"));
        assert!(check_name(&"a".repeat(65)).is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_reference_parses_or_is_refused(s in "\\PC{0,40}") {
            let _ = Version::parse(&s);
            let _ = check_name(&s);
        }
    }

    #[test]
    fn immutable_content_and_latest() {
        let dir = std::env::temp_dir().join(format!("images-test-{:x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let db = Arc::new(Store::create(&dir.join("t.redb")).unwrap());
        let images = Images::open(db, &dir.join("images")).unwrap();
        let Added::New(a) = images
            .add("app", "1.0.0", ImageKind::Application, b"one")
            .unwrap()
        else {
            panic!("new")
        };
        assert_eq!(a.id.len(), 64);
        assert_eq!(
            images
                .add("app", "1.0.0", ImageKind::Application, b"one")
                .unwrap(),
            Added::Existing(a.clone())
        );
        // The same name and version never point at other content.
        assert!(matches!(
            images.add("app", "1.0.0", ImageKind::Application, b"two"),
            Err(ImageError::Conflict(_))
        ));
        // The same content is one image.
        assert!(matches!(
            images.add("other", "1.0.0", ImageKind::Application, b"one"),
            Err(ImageError::Conflict(_))
        ));
        images
            .add("app", "1.10.0", ImageKind::Application, b"ten")
            .unwrap();
        images
            .add("app", "1.9.0", ImageKind::Application, b"nine")
            .unwrap();
        assert_eq!(images.resolve("app:latest").unwrap().version, "1.10.0");
        assert_eq!(images.resolve("app:1.0.0").unwrap().id, a.id);
        assert_eq!(images.content(&a).unwrap(), b"one");
        assert!(images.resolve("app:2.0.0").is_err());
        assert!(images.resolve("nope").is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}
