//! The development provider: each email is written as the exact MIME message SMTP would send
//! (built by [`smtp`](super::smtp)) to `<EMAIL_FILE_DIR>/<idempotency key>.eml`, readable by
//! any mail client. Nothing leaves the machine.
//!
//! The file is written under a temporary name (starting with `.`, so `*.eml` never matches
//! it) and renamed into place, so a reader never sees half a message; the same key sent twice
//! replaces the same file, so a retry is one email here too.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::AsyncWriteExt;

use crate::message::{Accepted, EmailProvider, OutgoingEmail, SendError, SendFuture};
use crate::provider::smtp::build_message;

/// Writes emails as `.eml` files into a folder.
#[derive(Debug)]
pub struct FileProvider {
    dir: PathBuf,
    /// Tells apart the temporary files of sends running at once in this process.
    sequence: AtomicU64,
}

impl FileProvider {
    /// A provider writing into `dir`, which is created (with its parents) if missing. Errors:
    /// the folder cannot be created.
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
            sequence: AtomicU64::new(0),
        })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file an email with `idempotency_key` is written to.
    pub fn path_of(&self, idempotency_key: &str) -> PathBuf {
        self.dir.join(format!("{idempotency_key}.eml"))
    }

    async fn write(&self, key: &str, bytes: &[u8]) -> std::io::Result<()> {
        // The folder may have been removed since start-up (a developer clearing it).
        tokio::fs::create_dir_all(&self.dir).await?;
        let n = self.sequence.fetch_add(1, Ordering::Relaxed);
        let temp = self
            .dir
            .join(format!(".{key}.{}.{n}.tmp", std::process::id()));
        let result = async {
            let mut file = tokio::fs::File::create(&temp).await?;
            file.write_all(bytes).await?;
            file.flush().await?;
            // No fsync: a folder of emails for development is not worth a disk flush per
            // email; the rename still means a reader never sees half a file.
            drop(file);
            tokio::fs::rename(&temp, self.path_of(key)).await
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&temp).await;
        }
        result
    }
}

impl EmailProvider for FileProvider {
    fn name(&self) -> &'static str {
        "file"
    }

    fn send<'a>(&'a self, email: &'a OutgoingEmail) -> SendFuture<'a> {
        Box::pin(async move {
            // The key is checked there to be a safe file name (no `/`, no leading dot).
            let built = build_message(email)?;
            let bytes = built.message.formatted();
            self.write(&email.idempotency_key, &bytes)
                .await
                .map_err(|e| SendError::Transient {
                    reason: format!(
                        "cannot write {}: {e}",
                        self.path_of(&email.idempotency_key).display()
                    ),
                    retry_after: None,
                    rate_limited: false,
                })?;
            Ok(Accepted {
                provider_message_id: built.message_id,
            })
        })
    }
}
