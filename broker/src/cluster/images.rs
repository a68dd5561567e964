//! Image content in the cluster's PostgreSQL (`fleethub_image_content`, one row per
//! SHA-256 digest), beside the image records in the shared table `fleethub_images`: a node
//! serving an image another node took in fetches the bytes by digest once and keeps them in
//! its own `images/` directory. Content is written before the record that makes it
//! visible, and never changes (the digest is its name).

use super::rows::SharedRows;

impl SharedRows {
    /// Creates the content table if missing (under the lock table creation takes).
    pub fn create_image_content(&self) -> Result<(), String> {
        self.call(|c, _, _| {
            Box::pin(async move {
                c.batch_execute(&format!(
                    "BEGIN; SELECT pg_advisory_xact_lock({}, 0);
                     CREATE TABLE IF NOT EXISTS fleethub_image_content
                         (digest text PRIMARY KEY, content bytea NOT NULL);
                     COMMIT;",
                    super::LOCK.0
                ))
                .await
            })
        })
    }

    /// Stores the bytes of `digest` (nothing when they are there already).
    pub fn put_image_content(&self, digest: &str, content: &[u8]) -> Result<(), String> {
        let (digest, content) = (digest.to_string(), content.to_vec());
        self.call(move |c, _, _| {
            Box::pin(async move {
                c.execute(
                    "INSERT INTO fleethub_image_content (digest, content) VALUES ($1, $2)
                     ON CONFLICT (digest) DO NOTHING",
                    &[&digest, &content],
                )
                .await
                .map(|_| ())
            })
        })
    }

    /// The bytes of `digest`, if the cluster has them.
    pub fn image_content(&self, digest: &str) -> Result<Option<Vec<u8>>, String> {
        let digest = digest.to_string();
        self.call(move |c, _, _| {
            Box::pin(async move {
                c.query_opt(
                    "SELECT content FROM fleethub_image_content WHERE digest = $1",
                    &[&digest],
                )
                .await?
                .map(|r| r.try_get(0))
                .transpose()
            })
        })
    }
}
