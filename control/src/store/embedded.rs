//! The embedded store: one redb file in the control node's data directory.
//! A single control node leads always.

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableDatabase, TableDefinition};
use tokio::sync::watch;

use super::{Batch, LeaderRecord, MetaStore, StoreError};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

pub struct EmbeddedStore {
    db: Arc<Database>,
    me: LeaderRecord,
    leading: watch::Sender<bool>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl EmbeddedStore {
    /// Opens (or creates) `dir/meta.redb`.
    pub fn open(dir: &Path, me: LeaderRecord) -> Result<EmbeddedStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| backend(format!("{}: {e}", dir.display())))?;
        let path = dir.join("meta.redb");
        let db =
            Database::create(&path).map_err(|e| backend(format!("{}: {e}", path.display())))?;
        // Create the table so reads of an empty store find it.
        let txn = db.begin_write().map_err(backend)?;
        txn.open_table(META).map_err(backend)?;
        txn.commit().map_err(backend)?;
        Ok(EmbeddedStore {
            db: Arc::new(db),
            me,
            leading: watch::channel(true).0,
        })
    }
}

impl MetaStore for EmbeddedStore {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    async fn load(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let db = self.db.clone();
        let prefix = prefix.to_owned();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(META).map_err(backend)?;
            let mut out = Vec::new();
            for item in table.range(prefix.as_str()..).map_err(backend)? {
                let (k, v) = item.map_err(backend)?;
                if !k.value().starts_with(&prefix) {
                    break;
                }
                out.push((k.value().to_owned(), v.value().to_vec()));
            }
            Ok(out)
        })
        .await
        .map_err(backend)?
    }

    async fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        let db = self.db.clone();
        // A commit is durable when it returns (redb syncs), so off the runtime.
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_write().map_err(backend)?;
            {
                let mut table = txn.open_table(META).map_err(backend)?;
                for key in &batch.deletes {
                    table.remove(key.as_str()).map_err(backend)?;
                }
                for (key, value) in &batch.puts {
                    table
                        .insert(key.as_str(), value.as_slice())
                        .map_err(backend)?;
                }
            }
            txn.commit().map_err(backend)
        })
        .await
        .map_err(backend)?
    }

    async fn campaign(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn leadership(&self) -> watch::Receiver<bool> {
        self.leading.subscribe()
    }

    async fn leader(&self) -> Result<Option<LeaderRecord>, StoreError> {
        Ok(Some(self.me.clone()))
    }

    async fn resign(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
