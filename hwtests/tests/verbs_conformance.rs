//! The fabric conformance suite (the tests the TCP backend passes) with every
//! endpoint on verbs: workers open the RDMA device, exchange queue pairs over
//! TCP, and run their connections over RC queue pairs. Skips, saying why,
//! where no device answers.

const TRANSPORT: quiver_fabric::TransportChoice = quiver_fabric::TransportChoice::Verbs;

#[path = "../../fabric/tests/conformance/mod.rs"]
mod conformance;
