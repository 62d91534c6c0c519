//! openraft's own storage test suite (`openraft::testing::Suite`) against
//! our log storage on the shared log engine (real files, io_uring, O_DIRECT).
//! The suite needs a state machine too: `common::RecordingMachine`, which
//! only records what it applied (the chunk-store state machine is separate).

mod common;

use std::sync::Arc;

use common::RecordingMachine;
use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;
use quiver_raft::log::{LogConfig, LogEngine};
use quiver_raft::store::{LogStore, TypeConfig};

/// Each suite case gets a fresh directory and engine (the directory is the
/// guard the suite keeps alive), with copyset 7 as the group under test and
/// another group writing beside it.
struct Builder;

impl StoreBuilder<TypeConfig, LogStore, RecordingMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, RecordingMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            segment_bytes: 1 << 20,
            ..LogConfig::new(dir.path())
        };
        let engine = Arc::new(LogEngine::open(config).unwrap());
        Ok((dir, LogStore::new(engine, 7), RecordingMachine::default()))
    }
}

#[test]
fn openraft_storage_suite_passes_on_the_log_engine() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    Suite::test_all(Builder).unwrap();
}
