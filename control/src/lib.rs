//! The gRPC control plane (MDS): topology, volumes, heartbeats, scheduling. (Not yet written.)
