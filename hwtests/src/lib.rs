//! Tests that need a verbs device (a real RDMA NIC or soft-RoCE) and the check
//! of our verbs declarations against the installed `infiniband/verbs.h`. Each
//! test skips, saying why, where its prerequisite is missing; CI runs them in a
//! qemu guest with a soft-RoCE device (`soft-roce/run-in-qemu.sh`).

/// Prints why a test is skipped, in one greppable form.
pub fn skip(test: &str, reason: &str) {
    println!("SKIP {test}: {reason}");
}

/// The device and GID index the soft-RoCE guest names, if any.
pub fn configured_device() -> Option<(String, u32)> {
    let device = std::env::var("QUIVER_RDMA_DEVICE").ok()?;
    let gid = std::env::var("QUIVER_RDMA_GID_INDEX")
        .ok()
        .and_then(|g| g.parse().ok())
        .unwrap_or(1);
    Some((device, gid))
}
