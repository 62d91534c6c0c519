//! Device discovery through our dlopen'ed libibverbs: in the soft-RoCE guest
//! the configured device must be there, active, with an IPv4-mapped GID.

use quiver_fabric::verbs::{self, PortState};

#[test]
fn the_configured_device_is_found_and_active() {
    let listed = verbs::devices();
    let Some((device, gid_index)) = quiver_hwtests::configured_device() else {
        match listed {
            Ok(list) => println!(
                "devices here: {:?}",
                list.iter().map(|d| &d.name).collect::<Vec<_>>()
            ),
            Err(e) => quiver_hwtests::skip("devices", &e.to_string()),
        }
        return;
    };
    let list = listed.unwrap_or_else(|e| panic!("QUIVER_RDMA_DEVICE={device} but: {e}"));
    let dev = list
        .iter()
        .find(|d| d.name == device)
        .unwrap_or_else(|| panic!("{device} not in {list:?}"));
    let port = &dev.ports[0];
    assert_eq!(port.state, PortState::Active, "{dev:?}");
    assert!(port.active_mtu >= 1024, "{port:?}");
    let (index, gid) = port
        .gids
        .iter()
        .find(|(i, _)| *i == gid_index)
        .expect("the configured GID index exists");
    assert!(
        gid.ipv4().is_some(),
        "GID {index} is {gid}, not IPv4-mapped"
    );
    assert_eq!(port.preferred_gid_index(), Some(gid_index));
    let (name, _) = verbs::usable_port().unwrap();
    assert_eq!(name, device);
    println!(
        "{device}: port 1 active, mtu {}, gid[{index}] = {gid}",
        port.active_mtu
    );
}
