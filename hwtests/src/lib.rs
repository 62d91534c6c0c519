//! Tests that need a verbs device (a real NIC or soft-RoCE); they skip cleanly where none answers. (Not yet written.)
