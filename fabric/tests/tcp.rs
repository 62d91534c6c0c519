//! The fabric conformance suite with every endpoint on TCP.

const TRANSPORT: quiver_fabric::TransportChoice = quiver_fabric::TransportChoice::Tcp;

mod conformance;
